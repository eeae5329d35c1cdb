"""The rows of a layer's K-FAC factor A: unfolded conv input patches, the bias coordinate, and the one output
size every batch must share (for plain and grouped layers alike)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from napkit.errors import NapkitError


def conv_patches(layer: nn.Conv2d, x: Tensor, lattice: int = 1) -> Tensor:
    """Unfolded input patches ``[B, C_in * kh * kw, T]`` in the order of ``weight.view(C_out, -1)``.

    Padding goes through ``F.pad`` with the layer's own padding (any padding mode, 'same').
    ``lattice = s > 1`` keeps only the output positions ``(s*i, s*j)``: every s-th row and column.
    """
    mode = "constant" if layer.padding_mode == "zeros" else layer.padding_mode
    x = F.pad(x, layer._reversed_padding_repeated_twice, mode=mode)
    stride = tuple(st * lattice for st in layer.stride)
    return F.unfold(x, layer.kernel_size, dilation=layer.dilation, stride=stride)


def lattice_step(height: int, width: int, max_positions: int | None) -> int:
    """Smallest step s with ``ceil(height/s) * ceil(width/s) <= max_positions`` (1: every position)."""
    if max_positions is None:
        return 1
    step = 1
    while -(-height // step) * -(-width // step) > max_positions:
        step += 1
    return step


def with_bias_coordinate(a: Tensor, mean: Tensor) -> Tensor:
    """``A`` over ``[input, 1]``: the input second moment ``a``, the input mean ``mean`` as the cross terms with
    the constant 1 the bias multiplies, and 1 in the corner."""
    one = torch.ones(1, 1, dtype=a.dtype, device=a.device)
    col = mean.unsqueeze(1)
    return torch.cat([torch.cat([a, col], 1), torch.cat([col.T, one], 1)], 0)


def same_positions(previous: int | None, positions: int, layer: nn.Module) -> int:
    """``positions`` (output positions of this batch), checked against the earlier batches' ``previous``:
    factors averaged over positions need every input to have one size."""
    if previous not in (None, positions):
        raise NapkitError(
            f"inconsistent output positions for {type(layer).__name__}: this batch gives {positions}, "
            f"earlier batches gave {previous}; inputs must have one size"
        )
    return positions
