"""Channel groups: the channels structured pruning removes together, derived by tracing (torch.fx).

Every tensor of the traced graph carries a *channel space*, the channel index (dim 1) it shares with
other tensors. A Conv2d/Linear output opens a new space with that layer as its producer; per-channel
and elementwise ops (BatchNorm, activations, pooling, dropout, flatten) keep their input's space; the
sum of two tensors merges their spaces, which couples ResNet's residual stream (one group per stage:
every block's conv3 + bn3, the downsample conv + bn, the following convs' inputs and the identity).
Every Conv2d/Linear that reads a space is a consumer of its channels, in blocks of consecutive columns
of ``W_h = weight.view(d_out, -1)``: ``kh*kw`` for a conv, ``H*W`` for a Linear after a flatten of
``C x H x W`` features, 1 for a Linear after a Linear. Spaces touched by anything else (the network
input, the logits, unknown ops, grouped or dilated convs) are frozen: never pruned.
"""

from __future__ import annotations

import operator
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import fx, nn

from napkit.errors import NapkitError
from napkit.layers import PrunableLayer, is_prunable
from napkit.structured.blocks import ResidualBias

_ELEMENTWISE = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish,
                nn.Dropout, nn.Dropout2d, nn.Identity)
_POOLS = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
_ELEMENTWISE_FUNCTIONS = {torch.relu, torch.nn.functional.relu, torch.sigmoid, torch.tanh,
                          torch.nn.functional.dropout}
_ELEMENTWISE_METHODS = {"relu", "relu_", "sigmoid", "tanh", "contiguous"}
_BINARY = {operator.add, operator.iadd, operator.sub, operator.mul, torch.add, torch.sub, torch.mul}
_QUERIES = {"size", "dim"}  # methods returning shapes (``x.shape`` traces as getattr)

# layouts of a traced tensor: 4-D feature map, 2-D flattened map (channel = block of H*W), 2-D vector
SPATIAL, FLAT, VECTOR = "spatial", "flat", "vector"


@dataclass(frozen=True)
class Consumer:
    """A layer that reads a group's channels: ``block`` consecutive columns of its ``W_h`` per channel."""

    name: str
    block: int


@dataclass(frozen=True)
class ChannelGroup:
    """Channels removed together: producer rows, their BatchNorm entries and every consumer's columns.

    ``id`` is the first producer's name; a group with several producers is a coupled (residual) group.
    """

    id: str
    size: int
    producers: tuple[str, ...]
    norms: tuple[str, ...]
    consumers: tuple[Consumer, ...]

    @property
    def coupled(self) -> bool:
        return len(self.producers) > 1


@dataclass
class _Space:
    """One channel space while tracing (a union-find node)."""

    parent: int
    frozen: bool = False
    producers: list[str] = field(default_factory=list)
    norms: list[str] = field(default_factory=list)
    readers: list[tuple[str, str]] = field(default_factory=list)  # (consumer name, input layout)


@dataclass(frozen=True)
class _Value:
    space: int
    layout: str


class _Tracer:
    """Walks an fx graph and assigns channel spaces to its tensors."""

    def __init__(self, model: nn.Module) -> None:
        self.modules = dict(model.named_modules())
        self.spaces: list[_Space] = []
        self.values: dict[fx.Node, _Value] = {}
        self.seen: set[str] = set()

    def new(self, layout: str, *, frozen: bool = False, producer: str | None = None) -> _Value:
        space = _Space(parent=len(self.spaces), frozen=frozen, producers=[producer] if producer else [])
        self.spaces.append(space)
        return _Value(space.parent, layout)

    def root(self, i: int) -> int:
        while self.spaces[i].parent != i:
            self.spaces[i].parent = self.spaces[self.spaces[i].parent].parent
            i = self.spaces[i].parent
        return i

    def space(self, value: _Value) -> _Space:
        return self.spaces[self.root(value.space)]

    def union(self, a: _Value, b: _Value) -> None:
        ra, rb = self.root(a.space), self.root(b.space)
        if ra == rb:
            return
        keep, gone = self.spaces[ra], self.spaces[rb]
        gone.parent = ra
        keep.frozen |= gone.frozen
        keep.producers += gone.producers
        keep.norms += gone.norms
        keep.readers += gone.readers

    def freeze(self, *values: _Value) -> None:
        for v in values:
            self.space(v).frozen = True

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

    def visit(self, node: fx.Node) -> _Value | None:
        if node.op == "placeholder" or node.op == "get_attr":
            return self.new(SPATIAL, frozen=True)
        if node.op == "output":
            self.freeze(*self.inputs(node))
            return None
        if node.op == "call_module":
            return self.visit_module(node, self.modules[str(node.target)])
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
        flattens = isinstance(module, nn.Flatten) and (module.start_dim, module.end_dim) == (1, -1)
        if flattens and len(args) == 1:
            return _flattened(args[0])
        if self._once(name, module) and len(args) == 1:
            x = args[0]
            if isinstance(module, nn.Conv2d) and is_prunable(module) and x.layout == SPATIAL:
                self.space(x).readers.append((name, x.layout))
                return self.new(SPATIAL, producer=name)
            if isinstance(module, nn.Linear) and x.layout in (FLAT, VECTOR):
                self.space(x).readers.append((name, x.layout))
                return self.new(VECTOR, producer=name)
            if _norm_fits(module, x.layout):
                self.space(x).norms.append(name)
                return x
        return self.unknown(args)

    def _once(self, name: str, module: nn.Module) -> bool:
        """True for a layer with weights seen for the first time; a second call would be a shared layer."""
        if not isinstance(module, (nn.Conv2d, nn.Linear, nn.BatchNorm1d, nn.BatchNorm2d, ResidualBias)):
            return False
        if name in self.seen:
            raise NapkitError(f"layer {name!r} runs twice in one forward pass; cannot prune shared layers")
        self.seen.add(name)
        return True

    def visit_function(self, node: fx.Node) -> _Value:
        args = self.inputs(node)
        target = node.target
        if target in _ELEMENTWISE_FUNCTIONS or (node.op == "call_method" and target in _ELEMENTWISE_METHODS):
            if len(args) == 1:
                return args[0]
        if target in _BINARY or (node.op == "call_method" and target in ("add", "add_", "mul", "mul_")):
            return self.binary(args)
        if (target is torch.flatten or target == "flatten") and _flattens_channels(node) and len(args) == 1:
            return _flattened(args[0])
        return self.unknown(args)

    def binary(self, args: list[_Value]) -> _Value:
        """Elementwise op: a tensor with a scalar keeps its space; two tensors share one space."""
        if len(args) == 1:
            return args[0]
        if len(args) == 2 and args[0].layout == args[1].layout:
            self.union(args[0], args[1])
            return args[0]
        return self.unknown(args)

    def unknown(self, args: list[_Value]) -> _Value:
        """An op napkit cannot see through: freeze its inputs, its output is frozen too."""
        self.freeze(*args)
        return self.new(SPATIAL, frozen=True)

    def roots(self) -> Iterator[_Space]:
        for i, space in enumerate(self.spaces):
            if space.parent == i:
                yield space


class _LeafTracer(fx.Tracer):
    """fx's tracer, keeping a removed block's per-channel shift as one call (like a BatchNorm)."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, ResidualBias) or super().is_leaf_module(m, module_qualified_name)


def _flattened(value: _Value) -> _Value:
    return _Value(value.space, FLAT if value.layout == SPATIAL else value.layout)


def _flattens_channels(node: fx.Node) -> bool:
    """``flatten(x, 1)``: keeps dim 0, merges everything from the channel dim on."""
    start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
    end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
    return (start, end) == (1, -1)


def _norm_fits(module: nn.Module, layout: str) -> bool:
    """A per-channel module (BatchNorm, a removed block's shift) on a layout it indexes by channel."""
    return (isinstance(module, (nn.BatchNorm2d, ResidualBias)) and layout == SPATIAL) or (
        isinstance(module, nn.BatchNorm1d) and layout == VECTOR
    )


def rows(layer: PrunableLayer) -> int:
    """Output channels / units of a layer."""
    return layer.weight.shape[0]


def in_channels(layer: PrunableLayer, block: int) -> int:
    """Input channels of a consumer that reads ``block`` columns of ``W_h`` per channel."""
    return layer.weight[0].numel() // block


def channel_groups(model: nn.Module) -> list[ChannelGroup]:
    """Every prunable channel group of ``model``, in module order of the first producer.

    Frozen channels (network input, logits, anything behind an op the tracer does not know) form no
    group. Raises NapkitError when the model cannot be traced or its shapes disagree.
    """
    try:
        graph = _LeafTracer().trace(model)
    except Exception as exc:  # fx raises many types for untraceable control flow
        raise NapkitError(f"cannot trace {type(model).__name__} with torch.fx: {exc}") from exc
    tracer = _Tracer(model)
    tracer.run(graph)
    order = {name: i for i, name in enumerate(tracer.modules)}
    groups = [_group(model, s, order) for s in tracer.roots() if s.producers and not s.frozen]
    return sorted(groups, key=lambda g: order[g.id])


def _group(model: nn.Module, space: _Space, order: dict[str, int]) -> ChannelGroup:
    """Freeze one traced space into a ChannelGroup (members sorted in module order)."""
    producers = sorted(space.producers, key=order.__getitem__)
    sizes = {p: rows(model.get_submodule(p)) for p in producers}
    size = sizes[producers[0]]
    if len(set(sizes.values())) != 1:
        raise NapkitError(f"coupled layers disagree on their channel count: {sizes}")
    for n in space.norms:
        features = model.get_submodule(n).num_features
        if features != size:
            raise NapkitError(f"BatchNorm {n!r} has {features} features, expected {size}")
    consumers = tuple(_consumer(model, name, layout, size) for name, layout in sorted(
        space.readers, key=lambda r: order[r[0]]))
    norms = tuple(sorted(space.norms, key=order.__getitem__))
    return ChannelGroup(producers[0], size, tuple(producers), norms, consumers)


def _consumer(model: nn.Module, name: str, layout: str, size: int) -> Consumer:
    """A consumer and its column block per channel."""
    layer = model.get_submodule(name)
    d_in = layer.weight[0].numel()
    if isinstance(layer, nn.Conv2d):
        block = layer.kernel_size[0] * layer.kernel_size[1]
    elif layout == VECTOR:
        block = 1
    else:
        block = d_in // size
    if block * size != d_in:
        raise NapkitError(f"layer {name!r} has {d_in} inputs, not a multiple of the {size} channels it reads")
    return Consumer(name, block)


def find_group(groups: list[ChannelGroup], group_id: str) -> ChannelGroup:
    """The group with ``group_id``, or an error naming the valid ids."""
    for g in groups:
        if g.id == group_id:
            return g
    raise NapkitError(f"unknown channel group {group_id!r}; valid groups: {', '.join(g.id for g in groups)}")


def saved_flops(model: nn.Module, group: ChannelGroup, layer_flops: dict[str, int]) -> float:
    """FLOPs one channel's removal saves: its share of every producer's and every consumer's FLOPs.

    Conv/Linear FLOPs are bilinear in output and input channels, so the share is exact per channel.
    """
    saved = 0.0
    for p in group.producers:
        saved += layer_flops[p] / rows(model.get_submodule(p))
    for c in group.consumers:
        saved += layer_flops[c.name] / in_channels(model.get_submodule(c.name), c.block)
    return saved
