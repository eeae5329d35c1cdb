"""K-FAC for grouped convs: one factor pair per conv group, keyed ``"<layer>#<group>"``.

A conv with ``groups = g`` maps input channels ``[k c, (k+1) c)`` to output channels ``[k o, (k+1) o)``
through its own weight block ``W_k = weight[k o : (k+1) o]``, viewed as ``o x (c kh kw)`` (plus the
bias column). Groups share no weight and no input, so the Fisher over the whole weight is block-diagonal
over groups, and each block is K-FAC-factored like a plain conv, ``F_k ~ kron(G_k, A_k)``: ``A_k`` from
the patches of group k's input channels, ``G_k`` from the gradients of its outputs, with the scale
conventions of :mod:`napkit.curvature.kfac`. Each group's factors are an ordinary :class:`KFACFactors`
of ``W_k``, so storage, merging across ranks and every score that works on a plain layer work per group.

Depthwise convs (one channel per group) are left out: their channels are scored at the layers that read
them (see :mod:`napkit.structured.importance`), and a factor pair per channel would cost one small
matrix per channel for nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from napkit.curvature.factors import KFACFactors
from napkit.curvature.patches import conv_patches, lattice_step, same_positions, with_bias_coordinate

SEPARATOR = "#"


def group_key(layer: str, group: int) -> str:
    """The factor key of conv group ``group`` of layer ``layer``."""
    return f"{layer}{SEPARATOR}{group}"


def split_key(key: str) -> tuple[str, int | None]:
    """``(layer, group)`` of a factor key; ``group`` is None for a plain layer's key."""
    layer, sep, group = key.rpartition(SEPARATOR)
    return (layer, int(group)) if sep and group.isdigit() else (key, None)


def group_weight(conv: nn.Conv2d, group: int) -> Tensor:
    """``W_h`` of one conv group: its ``o x (c kh kw)`` weight block, the bias entries as last column."""
    o = conv.out_channels // conv.groups
    w = conv.weight.detach()[group * o : (group + 1) * o].reshape(o, -1)
    if conv.bias is None:
        return w
    return torch.cat([w, conv.bias.detach()[group * o : (group + 1) * o, None]], 1)


@dataclass
class GroupedSums:
    """Running sums of a grouped conv's factors, all groups at once (``[g, d, d]`` and ``[g, o, o]``); A over a
    lattice of at most ``a_max_positions`` output positions, as for a plain conv."""

    layer: nn.Conv2d
    dtype: torch.dtype
    device: torch.device
    a_max_positions: int | None = None
    aa: Tensor = field(init=False)
    a_sum: Tensor = field(init=False)
    gg: Tensor = field(init=False)
    rows: int = 0
    examples: int = 0
    positions: int | None = None

    def __post_init__(self) -> None:
        g = self.layer.groups
        d, o = self.layer.weight[0].numel(), self.layer.out_channels // g
        opts = {"dtype": self.dtype, "device": self.device}
        self.aa = torch.zeros(g, d, d, **opts)
        self.a_sum = torch.zeros(g, d, **opts)
        self.gg = torch.zeros(g, o, o, **opts)

    def add(self, x: Tensor, grad: Tensor, chunk_size: int) -> None:
        """Add one batch: layer input ``x`` and output gradients ``grad [b, C_out, H, W]``, in chunks."""
        g = self.layer.groups
        height, width = grad.shape[2], grad.shape[3]
        self.positions = same_positions(self.positions, height * width, self.layer)
        lattice = lattice_step(height, width, self.a_max_positions)
        for start in range(0, x.shape[0], chunk_size):
            patches = conv_patches(self.layer, x[start : start + chunk_size].detach(), lattice).to(self.dtype)
            a = patches.reshape(patches.shape[0], g, -1, patches.shape[-1])
            self.aa += torch.einsum("bkit,bkjt->kij", a, a)
            self.a_sum += a.sum((0, 3))
            self.rows += a.shape[0] * a.shape[-1]
            s = grad[start : start + chunk_size].to(self.dtype).reshape(-1, g, self.gg.shape[1], height * width)
            self.gg += torch.einsum("bkit,bkjt->kij", s, s)
        self.examples += x.shape[0]

    def factors(self, name: str) -> dict[str, KFACFactors]:
        """Every group's factors, keyed by :func:`group_key`."""
        has_bias = self.layer.bias is not None
        out = {}
        for k in range(self.layer.groups):
            a = self.aa[k] / self.rows
            if has_bias:
                a = with_bias_coordinate(a, self.a_sum[k] / self.rows)
            out[group_key(name, k)] = KFACFactors(A=a, G=self.gg[k] / self.examples, num_samples=self.examples,
                                                  has_bias=has_bias, positions=int(self.positions or 1))
        return out
