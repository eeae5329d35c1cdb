"""Turning scores into masks: one global ranking (each layer's ratio falls out) or a uniform ratio.

Safety rules (nap.md s.4): every output unit keeps its most important weight, so the classifier's
outputs are never pruned away; a per-layer sparsity cap bounds what one step can do to a layer.
"""

from __future__ import annotations

import math

import torch

from napkit.errors import NapkitError, unknown_choice
from napkit.pruning.masks import MaskSet

ALLOCATIONS = ("global", "uniform")


class CannotPruneFurther(NapkitError):
    """Every layer is at its cap or down to one weight per output: the target cannot be reached."""


def _eligible(score: torch.Tensor, keep: torch.Tensor, max_sparsity: float) -> torch.Tensor:
    """Scores of the weights this step may prune; +inf for the rest (already pruned ones: nan-free +inf)."""
    rows = score.reshape(score.shape[0], -1).clone()
    alive = keep.reshape_as(rows)
    rows[~alive] = math.inf
    # each output unit keeps its best surviving weight
    best = torch.where(alive, rows, torch.tensor(-math.inf, dtype=rows.dtype)).argmax(dim=1, keepdim=True)
    rows.scatter_(1, best, math.inf)
    # per-layer cap: only the lowest `room` survivors may go
    room = max(0, math.floor(max_sparsity * rows.numel()) - int((~alive).sum()))
    flat = rows.flatten()
    finite = int(torch.isfinite(flat).sum())
    if room < finite:
        order = torch.argsort(flat, stable=True)
        flat[order[room:]] = math.inf
    return flat


def _uniform_quotas(masks: MaskSet, eligible: dict[str, torch.Tensor], amount: int) -> dict[str, int]:
    """Per-layer counts proportional to each layer's survivors that add up to ``amount`` exactly
    (largest remainders get the rounding), never above what a layer may still lose."""
    alive = {n: int(masks.masks[n].sum()) for n in eligible}
    room = {n: int(torch.isfinite(f).sum()) for n, f in eligible.items()}
    share = amount / max(sum(alive.values()), 1)
    raw = {n: share * alive[n] for n in eligible}
    quota = {n: min(math.floor(raw[n]), room[n]) for n in eligible}
    for n in sorted(eligible, key=lambda n: raw[n] - math.floor(raw[n]), reverse=True):
        if sum(quota.values()) >= amount:
            break
        quota[n] = min(quota[n] + 1, room[n])
    return quota


def prune_lowest(
    scores: dict[str, torch.Tensor],
    masks: MaskSet,
    amount: int,
    *,
    allocation: str = "global",
    max_layer_sparsity: float = 0.99,
) -> MaskSet:
    """Remove ``amount`` more weights with the lowest scores; returns the new masks.

    ``global``: one ranking across all layers. ``uniform``: every layer removes the same share
    of its surviving weights (the layer-uniform baseline).
    """
    if allocation not in ALLOCATIONS:
        raise unknown_choice("allocation", allocation, ALLOCATIONS)
    eligible = {n: _eligible(scores[n], masks.masks[n], max_layer_sparsity) for n in masks.masks}
    new = masks.clone()
    if allocation == "global":
        _, total = masks.counts()
        names = list(eligible)
        flat = torch.cat([eligible[n] for n in names])
        quota = {n: 0 for n in names}
        order = torch.argsort(flat, stable=True)[:amount]
        order = order[torch.isfinite(flat[order])]
        offsets = torch.tensor([0] + [eligible[n].numel() for n in names]).cumsum(0)
        for i, n in enumerate(names):
            picked = order[(order >= offsets[i]) & (order < offsets[i + 1])] - offsets[i]
            new.masks[n].view(-1)[picked] = False
            quota[n] = picked.numel()
        removed = sum(quota.values())
    else:
        removed = 0
        for n, k in _uniform_quotas(masks, eligible, amount).items():
            picked = torch.argsort(eligible[n], stable=True)[:k]
            new.masks[n].view(-1)[picked] = False
            removed += k
    if amount > 0 and removed == 0:
        raise CannotPruneFurther(
            f"cannot prune {amount} more weights: every layer is at its cap (max_layer_sparsity="
            f"{max_layer_sparsity}) or down to one weight per output; lower the target"
        )
    return new
