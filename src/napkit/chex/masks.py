"""CHEX's prunable layers and their channel masks, enforced after every optimizer step.

A prunable layer is a non-coupled channel group produced by a Conv2d (from
:func:`napkit.structured.channel_groups`); in a torchvision ResNet only each Bottleneck's conv1 and
conv2 outputs (the residual stream and the downsample convs are left alone). A channel mask (True =
live) covers every tensor that carries the channel: the producer's filter and bias, its BatchNorm's
gamma, beta and running statistics (pruned: mean 0, variance 1 **[ours]**) and each consumer's input
slice (a conv's input channel, or a Linear's block of columns after a flatten).

:class:`ChannelMasks` has the ``mask_grads_`` / ``apply_`` interface of
:class:`napkit.pruning.masks.MaskSet`, so :func:`napkit.training.engine.train_one_epoch` enforces it
around every optimizer step: gradients are zeroed before it, the tensors re-zeroed after it, so
momentum and weight decay never revive a pruned channel.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torchvision.models.resnet import Bottleneck

from napkit.errors import NapkitError
from napkit.structured.groups import ChannelGroup, channel_groups


@dataclass(frozen=True)
class ChexLayer:
    """One prunable layer: a channel group with a single Conv2d producer."""

    group: ChannelGroup

    @property
    def id(self) -> str:
        return self.group.id

    @property
    def size(self) -> int:
        return self.group.size

    @property
    def producer(self) -> str:
        return self.group.producers[0]

    @property
    def norm(self) -> str | None:
        return self.group.norms[0] if self.group.norms else None


def chex_layers(model: nn.Module, groups: list[ChannelGroup] | None = None) -> list[ChexLayer]:
    """The layers CHEX prunes, in module order."""
    groups = channel_groups(model) if groups is None else groups
    blocks = [name for name, m in model.named_modules() if isinstance(m, Bottleneck)]
    allowed = {f"{b}.{c}" for b in blocks for c in ("conv1", "conv2")} if blocks else None
    # a concatenation's groups (spans) share their readers' tensors; CHEX regrows BatchNorm statistics only
    layers = [ChexLayer(g) for g in groups
              if not g.coupled and not g.spans and not g.params and isinstance(model.get_submodule(g.producers[0]), nn.Conv2d)
              and all(isinstance(model.get_submodule(n), nn.modules.batchnorm._BatchNorm) for n in g.norms)
              and (allowed is None or g.producers[0] in allowed)]
    if not layers:
        raise NapkitError(f"{type(model).__name__} has no channels CHEX can prune")
    return layers


def channel_tensors(model: nn.Module, layer: ChexLayer) -> Iterator[tuple[str, Tensor, str]]:
    """(qualified name, (A, C, B) view with the channel axis in the middle, kind) of every tensor
    that carries the layer's channels. ``kind`` is ``weight``, ``running_mean`` or ``running_var``."""
    p = model.get_submodule(layer.producer)
    c = layer.size
    yield f"{layer.producer}.weight", p.weight.data.view(1, c, -1), "weight"
    if p.bias is not None:
        yield f"{layer.producer}.bias", p.bias.data.view(1, c, 1), "weight"
    if layer.norm is not None:
        n = model.get_submodule(layer.norm)
        if n.weight is not None:
            yield f"{layer.norm}.weight", n.weight.data.view(1, c, 1), "weight"
            yield f"{layer.norm}.bias", n.bias.data.view(1, c, 1), "weight"
        if n.running_mean is not None:
            yield f"{layer.norm}.running_mean", n.running_mean.view(1, c, 1), "running_mean"
            yield f"{layer.norm}.running_var", n.running_var.view(1, c, 1), "running_var"
    for cons in layer.group.consumers:
        w = model.get_submodule(cons.name).weight
        yield f"{cons.name}.weight", w.data.view(w.shape[0], c, -1), "weight"


def _grad_views(model: nn.Module, layer: ChexLayer) -> Iterator[Tensor]:
    c = layer.size
    p = model.get_submodule(layer.producer)
    params = [(p.weight, 1), (p.bias, 1)]
    if layer.norm is not None:
        n = model.get_submodule(layer.norm)
        params += [(n.weight, 1), (n.bias, 1)]
    params += [(model.get_submodule(x.name).weight, 0) for x in layer.group.consumers]
    for t, producer_side in params:
        if t is not None and t.grad is not None:
            yield t.grad.view(1, c, -1) if producer_side else t.grad.view(t.shape[0], c, -1)


_FILL = {"weight": 0.0, "running_mean": 0.0, "running_var": 1.0}


class ChannelMasks:
    """Boolean keep-masks (one per prunable layer, length = its channels), keyed by layer id."""

    def __init__(self, layers: list[ChexLayer], masks: Mapping[str, Tensor]) -> None:
        self.layers = list(layers)
        self.masks = {l.id: torch.as_tensor(masks[l.id]).bool().cpu().clone() for l in self.layers}
        for l in self.layers:
            if self.masks[l.id].shape != (l.size,):
                raise NapkitError(f"mask of layer {l.id!r} has shape {tuple(self.masks[l.id].shape)}, "
                                  f"expected ({l.size},)")
        self._device_masks: dict[tuple[str, torch.device], Tensor] = {}

    @classmethod
    def dense(cls, layers: list[ChexLayer]) -> ChannelMasks:
        return cls(layers, {l.id: torch.ones(l.size, dtype=torch.bool) for l in layers})

    def _on(self, lid: str, device: torch.device) -> Tensor:
        key = (lid, device)
        if key not in self._device_masks:
            self._device_masks[key] = self.masks[lid].to(device)
        return self._device_masks[key]

    @torch.no_grad()
    def apply_(self, model: nn.Module) -> None:
        """Zero (running variance: one) every tensor entry of a pruned channel, in place."""
        for l in self.layers:
            for _, view, kind in channel_tensors(model, l):
                m = self._on(l.id, view.device).view(1, -1, 1)
                if kind == "running_var":
                    view.copy_(torch.where(m, view, torch.ones_like(view)))
                else:
                    view.mul_(m.to(view.dtype))

    @torch.no_grad()
    def mask_grads_(self, model: nn.Module) -> None:
        """Zero the gradients of pruned channels (between backward and the optimizer step)."""
        for l in self.layers:
            for g in _grad_views(model, l):
                g.mul_(self._on(l.id, g.device).view(1, -1, 1).to(g.dtype))

    def counts(self) -> dict[str, int]:
        """Live channels per layer."""
        return {lid: int(m.sum()) for lid, m in self.masks.items()}

    def density(self) -> float:
        """Fraction of prunable channels alive."""
        total = sum(m.numel() for m in self.masks.values())
        return sum(int(m.sum()) for m in self.masks.values()) / total

    def plan(self) -> dict[str, Tensor]:
        """Surgery plan for :func:`napkit.structured.surgery.apply`: the live channel indices."""
        return {lid: torch.nonzero(m).flatten() for lid, m in self.masks.items()}

    def clone(self) -> ChannelMasks:
        return ChannelMasks(self.layers, self.masks)

    def to_tensors(self) -> dict[str, Tensor]:
        return {lid: m.to(torch.uint8) for lid, m in self.masks.items()}

    @classmethod
    def from_tensors(cls, layers: list[ChexLayer], tensors: Mapping[str, Tensor]) -> ChannelMasks:
        missing = sorted({l.id for l in layers} - set(tensors))
        if missing:
            raise NapkitError(f"channel masks miss layers {missing[:3]}")
        return cls(layers, {l.id: tensors[l.id].bool() for l in layers})
