"""Spec step (a): per-layer keep / regrow budgets from one global ranking of |BatchNorm gamma|.

Ranking all prunable channels by score (descending, ties by position) and cutting at
``K = round((1 - S) N)`` and ``KR = round((1 - S + d) N)`` is the quantile rule
``keep_l = #{|gamma| > thr(S)}``, ``regrow_l = #{thr(S - d) < |gamma| <= thr(S)}`` with ties
resolved, so the counts sum to K and KR - K exactly. Every layer keeps at least ``min_channels``
and at least ``min_density`` of its channels, taken from the layers that keep the most **[ours]**:
in short runs the gammas of early layers fall fastest and the global quantile can starve them.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from napkit.errors import NapkitError


def layer_scores(model: nn.Module, layer, mask: Tensor | None = None) -> Tensor:
    """|gamma| of the layer's BatchNorm; without one, filter L2 norms over their layer mean **[ours]**.

    Pruned channels (``mask`` False) score 0.
    """
    if layer.norm is not None and model.get_submodule(layer.norm).weight is not None:
        score = model.get_submodule(layer.norm).weight.detach().abs().double().cpu()
    else:
        w = model.get_submodule(layer.producer).weight.detach().double().cpu()
        norms = w.reshape(w.shape[0], -1).norm(dim=1)
        live = norms[mask.cpu()] if mask is not None and bool(mask.any()) else norms
        score = norms / live.mean().clamp_min(1e-30)
    return score if mask is None else score * mask.cpu().double()


def layer_budgets(
    scores: Mapping[str, Tensor], sparsity: float, regrow: float, min_channels: int = 1, min_density: float = 0.0
) -> tuple[dict[str, int], dict[str, int]]:
    """(keep, regrow) channel counts per layer for global sparsity ``sparsity`` and regrowing ``regrow``."""
    if not 0.0 <= sparsity < 1.0:
        raise NapkitError(f"chex.S must lie in [0, 1), got {sparsity}")
    if not 0.0 <= min_density <= 1.0 - sparsity:
        raise NapkitError(f"chex.min_layer_density must lie in [0, 1 - S = {1.0 - sparsity:g}], got {min_density}")
    if regrow < 0 or sparsity - regrow < -1e-12:
        raise NapkitError(f"regrowing factor {regrow} must lie in [0, S={sparsity}]")
    names = list(scores)
    if not names:
        raise NapkitError("no prunable layers to budget")
    sizes = torch.tensor([scores[n].numel() for n in names])
    flat = torch.cat([scores[n].reshape(-1).double().cpu() for n in names])
    owner = torch.repeat_interleave(torch.arange(len(names)), sizes)
    total = flat.numel()
    k = round((1.0 - sparsity) * total)
    kr = min(total, round((1.0 - sparsity + regrow) * total))
    order = torch.argsort(flat, descending=True, stable=True)
    keep = torch.bincount(owner[order[:k]], minlength=len(names))
    grow = torch.bincount(owner[order[k:kr]], minlength=len(names))
    floor = torch.clamp(torch.maximum(torch.full_like(sizes, min_channels),
                                      torch.ceil(min_density * sizes.double() - 1e-9).long()), max=sizes)
    for i in torch.nonzero(keep < floor).flatten().tolist():
        while keep[i] < floor[i]:
            spare = keep - floor
            spare[i] = -1
            donor = int(torch.argmax(spare))
            if spare[donor] <= 0:
                break
            keep[donor] -= 1
            keep[i] += 1
            # the donor's dropped channel is the next one to regrow there
            if grow[i] > 0:
                grow[i] -= 1
                grow[donor] += 1
    grow = torch.minimum(grow, sizes - keep)
    return ({n: int(keep[i]) for i, n in enumerate(names)}, {n: int(grow[i]) for i, n in enumerate(names)})
