"""Per-channel normalisations a channel group runs through: their widths, and a LayerNorm cut exactly.

A BatchNorm is per-channel: removing a channel removes its statistics and affine entries, and nothing else
changes. A LayerNorm over the channels (ConvNeXt's, over the channels of each pixel) is not: its mean and
variance run over every channel, so cutting the normalised width would change every kept channel's output.
A pruned channel is zero wherever the LayerNorm reads it (all its producers' rows and biases are removed),
so the masked model's LayerNorm averages the kept channels and those zeros. :class:`KeptLayerNorm` (and
:class:`KeptLayerNorm2d`, channels first) compute exactly that on the kept channels alone: they still divide
by the ``full`` width they had before the first cut. The cut model then equals the masked one; what pruning
changes (the statistics now include zeros) is what the masked model scored, up to the score's own
approximations (docs/methods.md).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

_CHANNELS_FIRST = {"LayerNorm2d"}  # torchvision's and timm's LayerNorm over dim 1 of a [N, C, H, W] map
_CHANNELS_LAST = {"LayerNorm"}  # nn.LayerNorm and timm's (fused) LayerNorm over the last dim


def is_layer_norm(module: nn.Module) -> bool:
    """A LayerNorm over one dim of channels whose layout napkit knows (last dim, or dim 1 for a ``*2d``)."""
    return (isinstance(module, nn.LayerNorm) and len(module.normalized_shape) == 1
            and (type(module).__name__ in _CHANNELS_FIRST | _CHANNELS_LAST or isinstance(module, KeptLayerNorm)))


def channels_first(module: nn.Module) -> bool:
    """Whether a LayerNorm normalises dim 1 of a feature map (else the last dim)."""
    return isinstance(module, KeptLayerNorm2d) or type(module).__name__ in _CHANNELS_FIRST


def norm_width(module: nn.Module) -> int:
    """Channels of a per-channel norm: a BatchNorm's (or a removed block's shift's) features, a LayerNorm's width."""
    if isinstance(module, nn.LayerNorm):
        return module.normalized_shape[0]
    return int(module.num_features)


def padded_layer_norm(x: Tensor, full: int, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
    """LayerNorm over the last dim of ``x`` as if ``full - width`` more channels were there, all zero."""
    width = x.shape[-1]
    mean = x.sum(-1, keepdim=True) / full
    centered = x - mean
    var = (centered.square().sum(-1, keepdim=True) + (full - width) * mean.square()) / full
    y = centered * torch.rsqrt(var + eps)
    if weight is not None:
        y = y * weight
    return y if bias is None else y + bias


class KeptLayerNorm(nn.LayerNorm):
    """A LayerNorm over the last dim whose removed channels still count as zeros (module docstring)."""

    full: int

    def forward(self, x: Tensor) -> Tensor:
        if self.full == self.normalized_shape[0]:
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return padded_layer_norm(x, self.full, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, full={self.full}"


class KeptLayerNorm2d(KeptLayerNorm):
    """:class:`KeptLayerNorm` over dim 1 of a ``[N, C, H, W]`` map (a pruned ``LayerNorm2d``)."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def set_norm_width(module: nn.Module, width: int) -> None:
    """Record a per-channel norm's new width after its entries were cut; a LayerNorm first becomes a
    :class:`KeptLayerNorm` that keeps dividing by the width it had before its first cut."""
    if not isinstance(module, nn.LayerNorm):
        module.num_features = width
        return
    if not isinstance(module, KeptLayerNorm):
        full = module.normalized_shape[0]
        module.__class__ = KeptLayerNorm2d if channels_first(module) else KeptLayerNorm
        module.full = full
    module.normalized_shape = (width,)
