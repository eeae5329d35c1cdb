"""K-FAC for depthwise convs: one factor pair per channel (each channel is its own conv group).

A depthwise conv's channel c maps the ``kh*kw`` patch ``a_c`` of input channel c (plus a 1 for the
bias) to output channel c, so its Fisher block is ``F_c ~ G_c A_c`` with ``A_c = sum a_c a_c^T /
(N T)`` (mean over example-positions) and the scalar ``G_c = sum g_c^2 / N`` (summed over positions,
mean over examples): the conventions of :func:`napkit.curvature.estimate_kfac`. Removing channel c
removes its whole filter, so its OBS loss increase is ``0.5 G_c w_c^T A_c w_c`` (no compensation:
the blocks of different channels are independent), which :func:`depthwise_terms` returns.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from napkit.curvature.kfac import FISHER_TYPES, sample_labels
from napkit.errors import NapkitError, unknown_choice
from napkit.layers import modes_kept
from napkit.structured.groups import is_depthwise


@dataclass(frozen=True)
class DepthwiseFactors:
    """Per-channel K-FAC factors of a depthwise conv: ``A [C, d, d]`` (d = kh*kw, +1 with a bias), ``G [C]``."""

    A: Tensor
    G: Tensor
    num_samples: int


def _patches(conv: nn.Conv2d, x: Tensor) -> Tensor:
    """Per-channel patches ``[b, C, d, T]`` of a depthwise conv's input (a row of ones for the bias)."""
    cols = F.unfold(x, conv.kernel_size, conv.dilation, conv.padding, conv.stride)
    cols = cols.reshape(x.shape[0], conv.in_channels, -1, cols.shape[-1])
    if conv.bias is not None:
        cols = torch.cat([cols, torch.ones_like(cols[:, :, :1])], 2)
    return cols


def estimate_depthwise_kfac(
    model: nn.Module, loader: Iterable[Sequence[Tensor]], layers: Sequence[str], *, fisher: str = "true",
    num_samples: int = 1024, seed: int = 0, dtype: torch.dtype = torch.float64,
) -> dict[str, DepthwiseFactors]:
    """Per-channel factors of the depthwise convs ``layers``, from ``num_samples`` examples (eval mode;
    ``fisher="true"`` samples labels from the model's softmax, ``"empirical"`` uses the loader's)."""
    if fisher not in FISHER_TYPES:
        raise unknown_choice("fisher type", fisher, FISHER_TYPES)
    convs = {name: model.get_submodule(name) for name in layers}
    bad = [n for n, m in convs.items() if not is_depthwise(m)]
    if bad:
        raise NapkitError(f"layers {bad} are not depthwise convs (groups == in_channels == out_channels)")
    seen: dict[str, tuple[Tensor, Tensor]] = {}
    hooks = [m.register_forward_hook(lambda _m, args, out, n=n: seen.__setitem__(n, (args[0], out)))
             for n, m in convs.items()]
    sums = {n: [0.0, 0.0, 0] for n in convs}  # A sum, G sum, example-positions
    examples = 0
    generator = torch.Generator().manual_seed(seed)
    try:
        with modes_kept(model), torch.enable_grad():
            model.eval()
            for batch in loader:
                x, y = batch[0][: num_samples - examples], batch[1][: num_samples - examples]
                logits = model(x)
                labels = sample_labels(logits.detach(), generator) if fisher == "true" else y
                loss = F.cross_entropy(logits, labels, reduction="sum")
                grads = torch.autograd.grad(loss, [seen[n][1] for n in convs])
                for (n, conv), g in zip(convs.items(), grads):
                    a = _patches(conv, seen[n][0].detach()).to(dtype)
                    sums[n][0] = sums[n][0] + torch.einsum("bcit,bcjt->cij", a, a)
                    sums[n][1] = sums[n][1] + g.to(dtype).pow(2).sum((0, 2, 3))
                    sums[n][2] += a.shape[0] * a.shape[-1]
                examples += len(x)
                if examples >= num_samples:
                    break
    finally:
        for h in hooks:
            h.remove()
    if examples == 0:
        raise NapkitError("the loader yielded no examples")
    return {n: DepthwiseFactors(a / rows, g / examples, examples) for n, (a, g, rows) in sums.items()}


def depthwise_terms(model: nn.Module, name: str, f: DepthwiseFactors) -> Tensor:
    """OBS loss increase of removing each channel's filter (and bias): ``0.5 G_c w_c^T A_c w_c``."""
    conv = model.get_submodule(name)
    w = conv.weight.detach().reshape(conv.out_channels, -1)
    if conv.bias is not None:
        w = torch.cat([w, conv.bias.detach()[:, None]], 1)
    w = w.to(f.A)
    return (0.5 * f.G * torch.einsum("ci,cij,cj->c", w, f.A, w)).double()
