"""Channel groups: the channels structured pruning removes together, derived by tracing (torch.fx).

Every tensor of the traced graph carries a *channel space*, the channel index it shares with other
tensors, and a *layout* saying where that index is: dim 1 of a feature map (``spatial``), blocks of
``H*W`` columns of a flattened map (``flat``), dim 1 of a 2-D vector (``vector``) or the last dim of
a token / channels-last tensor (``last``, what a Linear reads and writes). A Conv2d/Linear output
opens a new space with that layer as its producer; per-channel and elementwise ops (BatchNorm,
activations, pooling or a mean over H and W, dropout, stochastic depth, flatten, NCHW <-> NHWC
permutes) keep their input's space, and so do a LayerNorm over the channels (the last dim, or dim 1 for a
``LayerNorm2d``; cut exactly by :mod:`~napkit.structured.norms`) and a product or sum with a parameter
holding one entry per channel (ConvNeXt's layer scale), both members of the group; a depthwise conv
(``groups == in == out channels``) keeps it too, its filters removed with their channels; the sum or
product of two tensors merges their spaces, which couples ResNet's residual stream and a
squeeze-and-excitation block's scale with the channels it scales (the SE's hidden units are a group
of their own). A concatenation along channels (DenseNet, GoogLeNet, Inception, SqueezeNet) keeps each
input's space as one *part* at its channel offset: a layer or BatchNorm reading the concatenation
reads every part's channels as a window of its own inputs, so each part stays a group of its own (a part
the concatenation repeats, as Swin's patch merging does, is read through one window per repeat). Token tensors
(``last`` after ViT's patches are flattened and transposed, or MaxViT's partitions) keep their channels through
indexing and concatenation along the tokens; a class token concatenated there is a member. A grouped conv
(``groups = g``) is a producer and a consumer too, but its channel groups must stay equal: both its spaces
get ``fold = g`` (the lcm over such convs), and a channel goes only together with the channels at the same
position in every one of the g blocks (torchvision's ResNeXt and RegNet). Every Conv2d/Linear that reads a space is a consumer of its channels, in blocks of
consecutive columns of ``W_h = weight.view(d_out, -1)``: ``kh*kw`` for a conv, ``H*W`` for a Linear
after a flatten of ``C x H x W`` features, 1 for a Linear reading its last dim (an MLP's hidden units:
ViT, Swin, ConvNeXt).

Spaces touched by anything else are frozen: never pruned. The network input and the logits are
frozen by nature. Self-attention (:mod:`~napkit.structured.attention`: what napkit runs for
``nn.MultiheadAttention`` and torchvision's Swin and MaxViT attention) makes its heads a group: producer rows per
head, the output projection reading ``head_dim`` columns per head; its input projection is a consumer of the
tokens it reads. The rest (channel shuffle, other attention, shared layers, layers the user ignores) are
reported by :func:`trace_groups` and named in one warning by :func:`warn_unpruned`, while every other group
of the model stays prunable.
"""

from __future__ import annotations

import math
import operator
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor, fx, nn
from torchvision.models.maxvit import SwapAxes, WindowDepartition, WindowPartition
from torchvision.models.swin_transformer import _patch_merging_pad
from torchvision.ops import stochastic_depth

from napkit.errors import NapkitError
from napkit.layers import PrunableLayer, is_depthwise, is_grouped, is_prunable
from napkit.structured.attention import ATTENTIONS, HeadAttention
from napkit.structured.blocks import ResidualBias
from napkit.structured.norms import channels_first, is_layer_norm, norm_width

_ELEMENTWISE = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish,
                nn.Hardsigmoid, nn.Mish, nn.ELU, nn.SELU, nn.CELU, nn.Softplus, nn.Hardtanh,
                nn.Dropout, nn.Dropout2d, nn.Identity)
_POOLS = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
_F = torch.nn.functional
_ELEMENTWISE_FUNCTIONS = {torch.relu, _F.relu, _F.relu6, torch.sigmoid, _F.sigmoid, torch.tanh, _F.gelu,
                          _F.silu, _F.hardswish, _F.hardsigmoid, _F.dropout, stochastic_depth}
_POOL_FUNCTIONS = {_F.adaptive_avg_pool2d, _F.adaptive_max_pool2d, _F.avg_pool2d, _F.max_pool2d}
_ELEMENTWISE_METHODS = {"relu", "relu_", "sigmoid", "tanh", "contiguous"}
_CONCATENATIONS = {torch.cat, torch.concat, torch.concatenate}
_BINARY = {operator.add, operator.iadd, operator.sub, operator.mul, torch.add, torch.sub, torch.mul}
_QUERIES = {"size", "dim"}  # methods returning shapes (``x.shape`` traces as getattr)

# layouts of a traced tensor (see the module docstring); OTHER: unknown, only behind a frozen space
SPATIAL, FLAT, VECTOR, LAST, OTHER = "spatial", "flat", "vector", "last", "other"
PARAM = "parameter"  # a model parameter read by the graph (get_attr), until it meets a channel space
SEQ = "sequence"  # dim 1 of a [N, C, L] map whose positions were flattened (ViT's patches before the transpose)
HEADS = "heads"  # an attention's per-head outputs, read by its out_proj in blocks of head_dim columns
# why a space is frozen when nothing is wrong with it
INPUT, OUTPUT, IGNORED = "network input", "network output", "ignored"
_NATURAL = {INPUT, OUTPUT, IGNORED}


class UnprunedLayersWarning(UserWarning):
    """Some layers stay unpruned because napkit does not understand how their channels are coupled."""


@dataclass(frozen=True)
class Consumer:
    """A layer that reads a group's channels: ``block`` consecutive columns of its ``W_h`` per channel."""

    name: str
    block: int


@dataclass(frozen=True)
class ChannelGroup:
    """Channels removed together: producer rows, their BatchNorm entries, depthwise filters and every
    consumer's columns.

    ``id`` is the first producer's name; a group with several producers is a coupled (residual) group.
    ``depthwise`` convs carry each channel through its own filter: they lose the group's channels as
    whole filters (rows), like a BatchNorm, and have no curvature terms of their own. ``fold = g > 1``
    (a grouped conv among the members) splits the channels into g equal blocks: channel ``j * size/g
    + p`` is removed together with the channels at position p of every other block. ``spans`` lists the
    norms and consumers that read a concatenation, ``(name, offset, width)``: the group's channels are
    their channels ``offset .. offset + size - 1`` of ``width``. ``params`` are parameters with one entry
    per channel along a dim, ``(name, dim)``, applied to the channels outside any layer (ConvNeXt's layer
    scale): they lose the removed channels' entries.
    """

    id: str
    size: int
    producers: tuple[str, ...]
    norms: tuple[str, ...]
    consumers: tuple[Consumer, ...]
    depthwise: tuple[str, ...] = ()
    fold: int = 1
    spans: tuple[tuple[str, int, int], ...] = ()
    params: tuple[tuple[str, int], ...] = ()

    @property
    def coupled(self) -> bool:
        return len(self.producers) > 1

    def width(self, member: str) -> int:
        """Channels of a norm or consumer that reads the group: the group's size, or a concatenation's."""
        return next((width for name, _, width in self.spans if name == member), self.size)

    def windows(self, member: str) -> tuple[slice, ...]:
        """The group's channels among a norm's or consumer's channels: one window, or one per time a concatenation
        repeats them (Swin's patch merging reads each channel four times)."""
        found = tuple(slice(offset, offset + self.size) for name, offset, _ in self.spans if name == member)
        return found or (slice(0, self.size),)


@dataclass(frozen=True)
class Tracing:
    """Prunable groups of a model and the producers left unpruned, each with why (ops, reasons)."""

    groups: list[ChannelGroup]
    unpruned: dict[str, tuple[str, ...]]


@dataclass
class _Space:
    """One channel space while tracing (a union-find node)."""

    parent: int
    frozen: set[str] = field(default_factory=set)  # reasons; empty: prunable
    producers: list[str] = field(default_factory=list)
    depthwise: list[str] = field(default_factory=list)
    norms: list[tuple[str, int, int]] = field(default_factory=list)  # (name, offset, width)
    readers: list[tuple[str, str, int, int]] = field(default_factory=list)  # (name, input layout, offset, width)
    params: list[tuple[str, int]] = field(default_factory=list)  # (parameter name, its channel dim)
    fold: int = 1

    def members(self) -> Iterator[str]:
        yield from self.producers
        yield from self.depthwise
        yield from (name for name, _, _ in self.norms)
        yield from (name for name, *_ in self.readers)
        yield from (name for name, _ in self.params)


@dataclass(frozen=True)
class _Value:
    """A traced tensor: one channel space, or a concatenation of ``parts`` ``(space, channels)`` along
    channels (``space`` is then -1: every use goes through the parts). ``ndim`` is known for token tensors
    (``last`` after a permute, a transpose or a Linear), where indexing and concatenating along the tokens
    must tell the channel dim from the others."""

    space: int
    layout: str
    parts: tuple[tuple[int, int], ...] = ()
    ndim: int | None = None


class _Tracer:
    """Walks an fx graph and assigns channel spaces to its tensors."""

    def __init__(self, model: nn.Module) -> None:
        self.modules = dict(model.named_modules())
        self.parameters = dict(model.named_parameters())
        self.param_names: dict[int, str] = {}  # space of a get_attr value -> the parameter it reads
        self.param_views: dict[int, tuple[int, ...]] = {}  # space of a reshaped parameter -> its new shape
        self.spaces: list[_Space] = []
        self.values: dict[fx.Node, _Value] = {}
        self.seen: set[str] = set()
        self.shared: set[str] = set()
        self.pairs: set[fx.Node] = set()  # attention calls: they return (output, None)

    def new(self, layout: str, *, frozen: str | None = None, producer: str | None = None) -> _Value:
        space = _Space(parent=len(self.spaces), frozen={frozen} if frozen else set(),
                       producers=[producer] if producer else [])
        self.spaces.append(space)
        return _Value(space.parent, layout)

    def root(self, i: int) -> int:
        while self.spaces[i].parent != i:
            self.spaces[i].parent = self.spaces[self.spaces[i].parent].parent
            i = self.spaces[i].parent
        return i

    def space(self, value: _Value) -> _Space:
        if value.parts:
            raise RuntimeError("a concatenation has no single space; use windows()")
        return self.spaces[self.root(value.space)]

    def windows(self, value: _Value) -> Iterator[tuple[_Space, int, int]]:
        """``(space, offset, width)`` of each part of ``value``: a plain value is one part, width 0 (all of it)."""
        if not value.parts:
            yield self.space(value), 0, 0
            return
        width = sum(channels for _, channels in value.parts)
        offset = 0
        for part, channels in value.parts:
            yield self.spaces[self.root(part)], offset, width
            offset += channels

    def size(self, value: _Value) -> int | None:
        """Channels of a plain value: its space's first producer's rows; None without one (input, unknown op)."""
        producers = self.space(value).producers
        return rows(self.modules[producers[0]]) if producers else None  # type: ignore[arg-type]

    def union(self, a: _Value, b: _Value) -> None:
        ra, rb = self.root(a.space), self.root(b.space)
        if ra == rb:
            return
        keep, gone = self.spaces[ra], self.spaces[rb]
        gone.parent = ra
        keep.frozen |= gone.frozen
        keep.producers += gone.producers
        keep.depthwise += gone.depthwise
        keep.norms += gone.norms
        keep.readers += gone.readers
        keep.params += gone.params
        keep.fold = math.lcm(keep.fold, gone.fold)

    def freeze(self, reason: str, *values: _Value) -> None:
        for v in values:
            for space, _, _ in self.windows(v):
                space.frozen.add(reason)

    def inputs(self, node: fx.Node) -> list[_Value]:
        """Values of every tensor the node reads (positional and keyword, nested)."""
        found: list[_Value] = []

        def collect(n: fx.Node) -> fx.Node:
            if n in self.values:
                found.append(self.values[n])
            return n

        fx.node.map_arg((node.args, node.kwargs), collect)
        return found

    def run(self, graph: fx.Graph) -> None:
        for node in graph.nodes:
            out = self.visit(node)
            if out is not None:
                self.values[node] = out
        for space in self.roots():
            shared = sorted(self.shared.intersection(space.members()))
            if shared:
                space.frozen.add(f"shared layer {', '.join(shared)} (runs twice)")

    def visit(self, node: fx.Node) -> _Value | None:
        if node.op == "placeholder":
            return self.new(SPATIAL, frozen=INPUT)
        if node.op == "get_attr":
            if str(node.target) not in self.parameters:  # a buffer: a constant napkit does not cut
                return self.new(OTHER, frozen=f"buffer {node.target}")
            value = self.new(PARAM)
            self.param_names[value.space] = str(node.target)
            return value
        if node.op == "output":
            self.freeze(OUTPUT, *self.inputs(node))
            return None
        if node.op == "call_module":
            return self.visit_module(node, self.modules[str(node.target)])
        if node.target is operator.getitem and node.args[0] in self.pairs:  # (output, None) of an attention
            if node.args[1] in (0, -2):
                return self.values[node.args[0]]
            return None if node.args[1] in (1, -1) else self.unknown([self.values[node.args[0]]], _describe(node))
        if (node.op == "call_method" and node.target in _QUERIES) or node.target is getattr:
            return None  # shape queries: no tensor, no dependency
        return self.visit_function(node)

    def visit_module(self, node: fx.Node, module: nn.Module) -> _Value:
        args = self.inputs(node)
        name = str(node.target)
        if isinstance(module, _ELEMENTWISE) and len(args) == 1:
            return args[0]
        if isinstance(module, _POOLS) and len(args) == 1 and args[0].layout == SPATIAL:
            return args[0]
        moved = _moved(module, args)
        if moved is not None:  # MaxViT's window / grid partitions: the channels move to the last dim and back
            return moved
        flattens = isinstance(module, nn.Flatten) and (module.start_dim, module.end_dim) == (1, -1)
        if flattens and len(args) == 1:
            return self.flattened(args[0], name)
        if isinstance(module, ATTENTIONS):
            if self._once(name, module):
                return self.attention(node, name, module, args)
            # called twice: its heads, its output rows and the tokens its input projection reads stay whole
            self.shared.update((f"{name}.{module.output}", f"{name}.{module.input}"))
            return self.unknown(args, f"{type(module).__name__} {name}")
        if self._once(name, module) and len(args) == 1:
            x = args[0]
            if x.parts and (is_depthwise(module) or is_grouped(module)):
                return self.unknown(args, f"{type(module).__name__} {name} reading a concatenation")
            if is_depthwise(module):
                if x.layout != SPATIAL:
                    return self.unknown(args, f"{type(module).__name__} {name}")
                self.space(x).depthwise.append(name)
                return x
            if isinstance(module, nn.Conv2d) and is_prunable(module):
                self.read(x, name, SPATIAL)
                return self.new(SPATIAL, producer=name)
            if is_grouped(module) and x.layout == SPATIAL:
                self.read(x, name, SPATIAL)
                self.space(x).fold = math.lcm(self.space(x).fold, module.groups)
                out = self.new(SPATIAL, producer=name)
                self.space(out).fold = module.groups
                return out
            if isinstance(module, nn.Linear):
                self.read(x, name, FLAT, VECTOR, LAST)
                out = self.new(VECTOR if x.layout in (FLAT, VECTOR) else LAST, producer=name)
                return replace(out, ndim=x.ndim if x.layout == LAST else None)
            if _norm_fits(module, x.layout):
                for space, offset, width in self.windows(x):
                    space.norms.append((name, offset, width))
                return x
        return self.unknown(args, f"{type(module).__name__} {name}")

    def attention(self, node: fx.Node, name: str, module: nn.Module, args: list[_Value]) -> _Value:
        """Self-attention: its heads are a group of their own (producer rows: each head's query, key and value
        rows; consumer: the output projection's column blocks), its output a new space produced by that
        projection; its input projection is a consumer of the tokens' channels. Only its
        prunable form counts (a :class:`HeadAttention`: unmasked self-attention with ``need_weights=False``);
        any other call freezes it."""
        kwargs, output = node.kwargs, f"{name}.{module.output}"
        if isinstance(module, HeadAttention):
            plain = (len(node.args) == 3 and len(set(args)) == 1 and kwargs.get("need_weights", True) is False
                     and kwargs.get("attn_mask") is None and kwargs.get("key_padding_mask") is None
                     and not kwargs.get("is_causal", False))
        else:
            plain = len(node.args) == 1 and not kwargs
        if not plain:
            return self.unknown(args, f"attention {name} called with masks, weights or as cross-attention")
        self.read(args[0], f"{name}.{module.input}", LAST)
        heads = self.new(HEADS, producer=name)
        self.read(heads, output, HEADS)
        if isinstance(module, HeadAttention):
            self.pairs.add(node)  # it returns (output, None)
        return replace(self.new(LAST, producer=output), ndim=args[0].ndim)

    def read(self, x: _Value, name: str, *layouts: str) -> None:
        """Layer ``name`` reads ``x``: a consumer of its channels (of each part's, at its offset) in a layout
        it understands, else frozen."""
        if x.layout in layouts:
            for space, offset, width in self.windows(x):
                space.readers.append((name, x.layout, offset, width))
        else:
            self.freeze(f"{name} reading a {x.layout} layout", x)

    def _once(self, name: str, module: nn.Module) -> bool:
        """True for a layer with weights seen for the first time; a second call marks a shared layer."""
        if not isinstance(module, (nn.Conv2d, nn.Linear, nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm, ResidualBias,
                                   *ATTENTIONS)):
            return False
        if name in self.seen:
            self.shared.add(name)
            return False
        self.seen.add(name)
        return True

    def visit_function(self, node: fx.Node) -> _Value | None:
        args = self.inputs(node)
        target = node.target
        if not args and (getattr(target, "__module__", None) == "_operator" or target is torch._assert):
            return None  # arithmetic on shapes (``x.shape[0] // 8``) and asserts: no tensor
        method = node.op == "call_method"
        elementwise = target in _ELEMENTWISE_FUNCTIONS or (method and target in _ELEMENTWISE_METHODS)
        if elementwise and len(args) == 1:
            return args[0]
        if target in _POOL_FUNCTIONS and len(args) == 1 and args[0].layout == SPATIAL:
            return args[0]
        if target in _BINARY or (method and target in ("add", "add_", "mul", "mul_")):
            return self.binary(args, _describe(node))
        if method and target in ("reshape", "view") and len(args) == 1 and args[0].layout == PARAM:
            return self.param_view(node, args[0])
        if (target is torch.permute or target == "permute") and len(args) == 1:
            layout = _PERMUTED.get((args[0].layout, _dims(node)))
            if layout is not None and not args[0].parts:  # NCHW <-> NHWC: the channels move to / from the last dim
                return replace(args[0], layout=layout, ndim=len(_dims(node)))
        if (target is torch.transpose or target == "transpose") and len(args) == 1 and not args[0].parts:
            layout = {SEQ: LAST, LAST: SEQ}.get(args[0].layout)  # [N, C, L] <-> [N, L, C]
            dims = node.args[1:3]
            if layout is not None and args[0].ndim == 3 and all(isinstance(d, int) for d in dims) and len(dims) == 2 \
                    and {d % 3 for d in dims} == {1, 2}:
                return replace(args[0], layout=layout)
        if method and target in ("reshape", "view", "flatten") and len(args) == 1 and args[0].layout == SPATIAL \
                and not args[0].parts:
            if self.sequence(node, args[0]):
                return replace(args[0], layout=SEQ, ndim=3)
        if method and target == "expand" and len(args) == 1 and args[0].layout == PARAM and node.args[-1] == -1:
            return args[0]  # a parameter broadcast over the batch: the same entries per channel
        if target is operator.getitem and len(args) == 1 and args[0].layout == LAST and args[0].ndim:
            ndim = _indexed_ndim(node.args[1], args[0].ndim)
            if ndim is not None:
                return replace(args[0], ndim=ndim)
        if (target is torch.mean or target == "mean") and len(args) == 1 and args[0].layout == SPATIAL:
            keep = _spatial_mean(node)
            if keep is not None:  # global average pooling written as a mean over H and W
                return replace(args[0], layout=SPATIAL if keep else VECTOR)
        if (target is torch.flatten or target == "flatten") and _flattens_channels(node) and len(args) == 1:
            return self.flattened(args[0], node.name)
        if target in _CONCATENATIONS:
            return self.concatenated(node, args)
        if target is _patch_merging_pad and len(args) == 1 and args[0].layout == LAST and not args[0].parts:
            size = self.size(args[0])  # Swin: the 2x2 neighbours of each pixel side by side, channels repeated 4 times
            if size is not None:
                return _Value(-1, LAST, ((args[0].space, size),) * 4, ndim=args[0].ndim)
        return self.unknown(args, _describe(node))

    def flattened(self, value: _Value, name: str) -> _Value:
        """``flatten(x, 1)``: a feature map's channels become column blocks, a vector stays a vector."""
        if value.layout in (SPATIAL, VECTOR):
            return replace(value, layout=FLAT if value.layout == SPATIAL else VECTOR)
        return self.unknown([value], f"flatten {name} of a {value.layout} layout")

    def binary(self, args: list[_Value], name: str) -> _Value:
        """Elementwise op: a tensor with a scalar keeps its space; two tensors share one space (two
        concatenations of equal parts: part by part)."""
        if len(args) == 1:
            return args[0] if args[0].layout != PARAM else self.unknown(args, name)
        if len(args) == 2 and PARAM in (args[0].layout, args[1].layout):
            return self.scaled(*(args if args[1].layout == PARAM else args[::-1]), name)
        if len(args) == 2 and args[0].layout == args[1].layout and args[0].layout != OTHER:
            a, b = args
            if not a.parts and not b.parts:
                self.union(a, b)
                return a
            if a.parts and [c for _, c in a.parts] == [c for _, c in b.parts]:
                for (pa, _), (pb, _) in zip(a.parts, b.parts):
                    self.union(_Value(pa, a.layout), _Value(pb, b.layout))
                return a
        return self.unknown(args, name)

    def scaled(self, x: _Value, param: _Value, name: str) -> _Value:
        """``x`` times (or plus) a parameter with one entry per channel of ``x`` (ConvNeXt's layer scale, a
        ``[C, 1, 1]`` tensor against ``[N, C, H, W]``): the parameter joins ``x``'s space as a member along
        the dim that broadcasts against the channels; any other parameter is a constant napkit cannot cut."""
        size = None if x.parts or x.layout == PARAM else self.size(x)
        target = self.param_names.get(param.space)
        stored = tuple(self.parameters[target].shape) if target else ()
        shape = self.param_views.get(param.space, stored)
        channel = {SPATIAL: -3, LAST: -1, VECTOR: -1}.get(x.layout)
        if size is None or channel is None or len(shape) < -channel or shape[channel] != size or (
                channel == -3 and any(d != 1 for d in shape[:-3])):
            return self.unknown([x, param], name)
        # a view keeps the entries' order: the channel dim of the stored parameter is its one dim above 1
        dim = len(shape) + channel if param.space not in self.param_views else _only_dim(stored)
        self.space(x).params.append((target, dim))  # type: ignore[arg-type]
        self.union(x, param)  # an unknown use of the parameter elsewhere freezes these channels too
        return x

    def param_view(self, node: fx.Node, param: _Value) -> _Value:
        """``p.reshape(1, -1, 1, 1)`` of a parameter with one dim above 1 (timm's layer scale ``gamma``): the same
        entries along another dim; any other view is a use napkit cannot cut."""
        target = self.param_names.get(param.space)
        stored = tuple(self.parameters[target].shape) if target else ()
        rest = node.args[1:]
        shape = rest[0] if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else rest
        numel = math.prod(stored)
        if (not stored or _only_dim(stored) is None or not all(isinstance(d, int) for d in shape)
                or sorted(d for d in shape if d != 1) not in ([numel], [-1])):
            return self.unknown([param], _describe(node))
        view = self.new(PARAM)
        self.param_names[view.space] = target  # type: ignore[assignment]
        self.param_views[view.space] = tuple(numel if d == -1 else d for d in shape)
        self.union(view, param)
        return view

    def sequence(self, node: fx.Node, x: _Value) -> bool:
        """``x.reshape(n, C, h * w)`` / ``x.flatten(2)`` of a ``[N, C, H, W]`` map: its positions in one dim."""
        if node.target == "flatten":
            return node.args[1:] == (2,) and not node.kwargs
        shape = node.args[1:]
        return len(shape) == 3 and not node.kwargs and shape[1] == self.size(x)

    def concatenated(self, node: fx.Node, args: list[_Value]) -> _Value:
        """``torch.cat(xs, 1)`` of feature maps or vectors whose channel counts are known: one part per
        input space, in order (a concatenation in the list contributes its own parts)."""
        tensors = node.args[0] if node.args else node.kwargs.get("tensors")
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        layouts = {a.layout for a in args}
        tokens = [a for a in args if a.layout == LAST]
        if tokens and layouts <= {LAST, PARAM} and all(a.ndim == tokens[0].ndim for a in tokens) and tokens[0].ndim \
                and isinstance(dim, int) and dim % tokens[0].ndim != tokens[0].ndim - 1:
            return self.along_tokens(args, tokens, _describe(node))
        if (dim != 1 or layouts - {SPATIAL, VECTOR} or len(layouts) != 1
                or not isinstance(tensors, (list, tuple)) or len(tensors) != len(args)):
            return self.unknown(args, _describe(node))
        parts: list[tuple[int, int]] = []
        for a in args:
            size = None if a.parts else self.size(a)
            if not a.parts and size is None:
                return self.unknown(args, f"{_describe(node)} of channels of unknown count")
            parts += a.parts or [(a.space, size)]  # type: ignore[list-item]
        return _Value(-1, layouts.pop(), tuple(parts))

    def along_tokens(self, args: list[_Value], tokens: list[_Value], name: str) -> _Value:
        """A concatenation of token tensors along a dim other than the channels' (ViT's class token before the
        patches): all share their channels; a parameter among them (the class token) is a member."""
        for other in tokens[1:]:
            self.union(tokens[0], other)
        for param in (a for a in args if a.layout == PARAM):
            if self.scaled(tokens[0], param, name).layout == OTHER:
                return self.new(OTHER, frozen=name)
        return tokens[0]

    def unknown(self, args: list[_Value], what: str) -> _Value:
        """An op napkit cannot see through: freeze its inputs, its output is frozen too."""
        self.freeze(what, *args)
        return self.new(OTHER, frozen=what)

    def roots(self) -> Iterator[_Space]:
        for i, space in enumerate(self.spaces):
            if space.parent == i:
                yield space


class _LeafTracer(fx.Tracer):
    """fx's tracer, keeping a removed block's per-channel shift, a prunable attention and every BatchNorm
    and LayerNorm subclass as one call: a BatchNorm with its activation inside (timm's ``BatchNormAct2d``) is
    still per-channel, but traced through it shows only an ``F.batch_norm`` on its buffers; a ``LayerNorm2d``
    would show permutes around an ``F.layer_norm``."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return (isinstance(m, (ResidualBias, *ATTENTIONS, nn.modules.batchnorm._BatchNorm, nn.LayerNorm, *_PARTITIONS))
                or super().is_leaf_module(m, module_qualified_name))


def _describe(node: fx.Node) -> str:
    """An fx node in a warning: the op and the node name (derived from the module path)."""
    target = node.target
    op = f".{target}()" if node.op == "call_method" else getattr(target, "__name__", str(target))
    return f"{op} at {node.name}"


def _only_dim(shape: tuple[int, ...]) -> int | None:
    """The one dim above 1 of ``shape`` (0 for a 1-D shape), None for several."""
    dims = [i for i, d in enumerate(shape) if d != 1]
    return dims[0] if len(dims) == 1 else (0 if len(shape) == 1 else None)


def _flattens_channels(node: fx.Node) -> bool:
    """``flatten(x, 1)``: keeps dim 0, merges everything from the channel dim on."""
    start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
    end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
    return (start, end) == (1, -1)


_PERMUTED = {(SPATIAL, (0, 2, 3, 1)): LAST, (LAST, (0, 3, 1, 2)): SPATIAL, (SEQ, (0, 2, 1)): LAST}


_PARTITIONS = (WindowPartition, WindowDepartition, SwapAxes)


def _moved(module: nn.Module, args: list[_Value]) -> _Value | None:
    """A MaxViT partition op on one plain value: ``[B, C, H, W]`` -> ``[B, G, P, C]`` windows, back, or a swap
    of two dims that are not the channels'; None for anything else."""
    if len(args) != 1 or args[0].parts:
        return None
    x = args[0]
    if isinstance(module, WindowPartition) and x.layout == SPATIAL:
        return replace(x, layout=LAST, ndim=4)
    if isinstance(module, WindowDepartition) and x.layout == LAST and x.ndim == 4:
        return replace(x, layout=SPATIAL, ndim=None)
    if isinstance(module, SwapAxes) and x.layout == LAST and x.ndim and -1 not in (
            module.a % x.ndim - x.ndim, module.b % x.ndim - x.ndim):
        return x
    return None


def _indexed_ndim(index: object, ndim: int) -> int | None:
    """Dims left after ``x[index]`` of an ``ndim``-dim token tensor, if the index leaves the last (channel) dim
    whole (``x[:, 0]``, ``x[..., 1:, :]``); None for any other index."""
    entries = index if isinstance(index, tuple) else (index,)
    if any(e is None or isinstance(e, fx.Node) or not isinstance(e, (int, slice, type(Ellipsis))) for e in entries):
        return None
    if Ellipsis in entries:
        at_last = entries[-1]
    else:
        at_last = entries[ndim - 1] if len(entries) >= ndim else slice(None)
    if at_last not in (Ellipsis, slice(None)) or len(entries) > ndim + (Ellipsis in entries):
        return None
    return ndim - sum(isinstance(e, int) for e in entries)


def _dims(node: fx.Node) -> tuple[int, ...]:
    """The dims of ``torch.permute(x, dims)`` / ``x.permute(*dims)``."""
    rest = node.args[1:] or (node.kwargs.get("dims"),)
    dims = rest[0] if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else rest
    return tuple(dims) if all(isinstance(d, int) for d in dims) else ()


def _spatial_mean(node: fx.Node) -> bool | None:
    """``x.mean((2, 3))`` / ``torch.mean(x, [-2, -1], keepdim)``: its keepdim; None for another mean."""
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    keep = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
    if not isinstance(dims, (list, tuple)) or {d % 4 if isinstance(d, int) else d for d in dims} != {2, 3}:
        return None
    return bool(keep)


def _norm_fits(module: nn.Module, layout: str) -> bool:
    """A per-channel module (BatchNorm, a removed block's shift, a LayerNorm over the channels) on a layout it
    indexes by channel."""
    if is_layer_norm(module):  # channels last: tokens, a [N, C] vector, or a flattened 1x1 map (the width check)
        return layout == SPATIAL if channels_first(module) else layout in (LAST, VECTOR, FLAT)
    return (isinstance(module, (nn.BatchNorm2d, ResidualBias)) and layout == SPATIAL) or (
        isinstance(module, nn.BatchNorm1d) and layout == VECTOR
    )


def rows(layer: PrunableLayer) -> int:
    """Output channels / units of a layer."""
    return layer.weight.shape[0]


def in_channels(layer: PrunableLayer, block: int) -> int:
    """Input channels of a consumer that reads ``block`` columns of ``W_h`` per channel."""
    return layer.weight[0].numel() // block


def _ignored(name: str, ignore: Sequence[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in ignore)


def trace_groups(model: nn.Module, ignore: Sequence[str] = ()) -> Tracing:
    """Every prunable channel group of ``model`` (in module order of the first producer), and the
    producers left unpruned with the reasons.

    ``ignore`` lists module-name prefixes the user wants untouched: every group with a member under
    one of them is left unpruned. Grouped convs are pruned through group-evenly (NAP scores them with
    per-group K-FAC factors, :mod:`napkit.curvature.grouped`). Raises NapkitError when the model cannot be
    traced or its shapes disagree.
    """
    try:
        graph = _LeafTracer().trace(model)
    except Exception as exc:  # fx raises many types for untraceable control flow
        raise NapkitError(f"cannot trace {type(model).__name__} with torch.fx: {exc}") from exc
    tracer = _Tracer(model)
    tracer.run(graph)
    order = {name: i for i, name in enumerate(tracer.modules)}
    groups, unpruned = [], {}
    for s in tracer.roots():
        if not s.producers:
            continue
        if any(_ignored(m, ignore) for m in s.members()):
            s.frozen.add(IGNORED)
        size = rows(model.get_submodule(s.producers[0]))
        if size % s.fold:
            s.frozen.add(f"conv groups that do not tile {size} channels (lcm {s.fold})")
        if not s.frozen:
            try:
                groups.append(_group(model, s, order))
            except NapkitError as exc:  # e.g. a 1-channel map broadcast over C channels: shapes disagree
                s.frozen.add(str(exc))
        if s.frozen:
            unpruned.update({p: tuple(sorted(s.frozen)) for p in s.producers})
    return Tracing(sorted(groups, key=lambda g: order[g.id]),
                   {p: unpruned[p] for p in sorted(unpruned, key=order.__getitem__)})


def channel_groups(model: nn.Module, ignore: Sequence[str] = ()) -> list[ChannelGroup]:
    """Every prunable channel group of ``model`` (see :func:`trace_groups`)."""
    return trace_groups(model, ignore).groups


def warn_unpruned(tracing: Tracing, *, limit: int = 40) -> list[str]:
    """One warning naming the producers left unpruned for a reason other than the network's input or
    output or the user's ``ignore`` list, and the ops responsible; returns those producers."""
    odd = {p: tuple(r for r in why if r not in _NATURAL) for p, why in tracing.unpruned.items()}
    odd = {p: why for p, why in odd.items() if why}
    if odd:
        reasons = sorted({r for why in odd.values() for r in why})
        names = list(odd)
        more = f" and {len(names) - limit} more" if len(names) > limit else ""
        shown = f"{'; '.join(reasons[:limit])}{' ...' if len(reasons) > limit else ''}"
        warnings.warn(
            f"napkit leaves {len(names)} layer(s) unpruned because their channels meet couplings it does not "
            f"prune through ({shown}): {', '.join(names[:limit])}{more}; every other channel group is "
            f"pruned (set prune.ignore to silence this by leaving them out on purpose)",
            UnprunedLayersWarning, stacklevel=2,
        )
    return list(odd)


def _group(model: nn.Module, space: _Space, order: dict[str, int]) -> ChannelGroup:
    """Freeze one traced space into a ChannelGroup (members sorted in module order)."""
    producers = sorted(space.producers, key=order.__getitem__)
    sizes = {p: rows(model.get_submodule(p)) for p in producers + space.depthwise}
    size = sizes[producers[0]]
    if len(set(sizes.values())) != 1:
        raise NapkitError(f"coupled layers disagree on their channel count: {sizes}")
    spans = tuple((name, offset, width) for name, *_, offset, width in space.norms + space.readers if width)
    # a member twice is a layer run twice on these channels, unless one concatenation repeats them (other offsets)
    read = [(name, offset) for name, *_, offset, _ in space.norms + space.readers] + space.params
    twice = sorted({name for name, at in read if read.count((name, at)) > 1})
    if twice:
        raise NapkitError(f"layers {twice} read these channels twice")
    for n, offset, width in space.norms:
        features = norm_width(model.get_submodule(n))
        if features != (width or size) or offset + size > features:
            raise NapkitError(f"norm {n!r} has {features} channels, expected {width or size}")
    readers = {name: (layout, width) for name, layout, _, width in space.readers}
    consumers = tuple(_consumer(model, name, layout, width or size) for name, (layout, width) in sorted(
        readers.items(), key=lambda r: order[r[0]]))
    norms = tuple(sorted({name for name, _, _ in space.norms}, key=order.__getitem__))
    depthwise = tuple(sorted(space.depthwise, key=order.__getitem__))
    return ChannelGroup(producers[0], size, tuple(producers), norms, consumers, depthwise, space.fold, spans,
                        tuple(sorted(space.params)))


def _consumer(model: nn.Module, name: str, layout: str, channels: int) -> Consumer:
    """A consumer reading ``channels`` input channels, and its column block per channel."""
    layer = model.get_submodule(name)
    d_in = layer.weight[0].numel()
    if isinstance(layer, nn.Conv2d):
        block = layer.kernel_size[0] * layer.kernel_size[1]
        d_in *= layer.groups  # a grouped conv reads size/groups channels per block of rows
    elif layout in (VECTOR, LAST):
        block = 1
    else:
        block = d_in // channels
    if block * channels != d_in:
        raise NapkitError(f"layer {name!r} has {d_in} inputs, not a multiple of the {channels} channels it reads")
    return Consumer(name, block)


def removed_inputs(chosen: Iterable[tuple[ChannelGroup, Tensor | Sequence[int]]]) -> dict[str, Tensor]:
    """Which of its channels every norm and consumer of the ``chosen`` groups loses when each group keeps only
    its indices; a reader of a concatenation gathers all its groups' removals, each at its offset."""
    removed: dict[str, Tensor] = {}
    for group, keep in chosen:
        gone = torch.ones(group.size, dtype=torch.bool)
        gone[torch.as_tensor(keep, dtype=torch.long)] = False
        for name in (*group.norms, *(c.name for c in group.consumers)):
            mask = removed.setdefault(name, torch.zeros(group.width(name), dtype=torch.bool))
            for window in group.windows(name):
                mask[window] |= gone
    return removed


def find_group(groups: list[ChannelGroup], group_id: str) -> ChannelGroup:
    """The group with ``group_id``, or an error naming the valid ids."""
    for g in groups:
        if g.id == group_id:
            return g
    raise NapkitError(f"unknown channel group {group_id!r}; valid groups: {', '.join(g.id for g in groups)}")


def saved_flops(model: nn.Module, group: ChannelGroup, layer_flops: dict[str, int]) -> float:
    """FLOPs one channel's removal saves: its share of every producer's, depthwise conv's and consumer's
    FLOPs.

    Conv/Linear FLOPs are bilinear in output and input channels (a depthwise conv's are linear in its
    channels), so the share is exact per channel.
    """
    saved = 0.0
    for p in group.producers + group.depthwise:
        saved += layer_flops[p] / rows(model.get_submodule(p))
    for c in group.consumers:
        layer = model.get_submodule(c.name)
        reads = len(group.windows(c.name))
        saved += reads * layer_flops[c.name] / (in_channels(layer, c.block) * getattr(layer, "groups", 1))
    return saved
