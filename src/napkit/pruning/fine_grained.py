"""One fine-grained pruning step: score, rank globally, optionally OBS-compensate, mask.

After each call the pruner records what the K-FAC quadratic model predicts for the step
(``last_predicted_increase``, per layer ``last_predicted``), so the loop can log predicted against
measured loss increase (issue #20).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from napkit.curvature import KFACFactors
from napkit.errors import NapkitError
from napkit.layers import PrunableLayer, prunable_layers
from napkit.pruning.allocation import prune_lowest
from napkit.pruning.compensation import MAX_EXACT, check_compensation, obs_compensate_
from napkit.pruning.importance import Importance
from napkit.pruning.masks import MaskSet

FactorsProvider = Callable[[nn.Module, int], dict[str, KFACFactors]]


def target_sparsity(target_sparsity: float | None, target_compression: float | None) -> float | None:
    """The sparsity a run stops at: given directly, or from a compression ratio (total / kept)."""
    if target_sparsity is not None and target_compression is not None:
        raise NapkitError("set prune.target_sparsity or prune.target_compression, not both")
    if target_compression is not None:
        if target_compression < 1:
            raise NapkitError(f"prune.target_compression must be >= 1 (x times smaller), got {target_compression}")
        return 1.0 - 1.0 / target_compression
    if target_sparsity is not None and not 0.0 <= target_sparsity < 1.0:
        raise NapkitError(f"prune.target_sparsity must be in [0, 1), got {target_sparsity}")
    return target_sparsity


def kept_at(target: float, total: int) -> int:
    """How many of ``total`` weights survive at sparsity ``target``: ``ceil((1 - target) * total)``."""
    return math.ceil((1.0 - target) * total)


def sparsity_reached(kept: int, total: int, target: float) -> bool:
    """Whether ``kept`` of ``total`` weights meets sparsity ``target`` (the rounding of :func:`kept_at`)."""
    return kept <= kept_at(target, total)


class FineGrainedPruner:
    """Prunes ``step_fraction`` of the remaining weights per call, never past the target.

    ``compensation`` (:data:`~napkit.pruning.compensation.COMPENSATIONS`) is how the surviving weights
    of a layer absorb the pruned ones: ``exact`` joint OBS under K-FAC (layers whose system exceeds
    ``max_exact`` unknowns fall back to ``rowwise``), ``rowwise`` (OBC/SparseGPT), or ``none``.
    ``damping`` damps the factors the compensation solves with; the predicted increase
    (``last_predicted_increase``) is the undamped K-FAC quadratic model at the update applied.
    """

    def __init__(self, criterion: Importance, *, step_fraction: float, target: float | None,
                 allocation: str = "global", max_layer_sparsity: float = 0.99, compensation: str = "none",
                 max_exact: int = MAX_EXACT, damping: float = 0.1,
                 factors: FactorsProvider | None = None) -> None:
        if not 0.0 < step_fraction <= 1.0:
            raise NapkitError(f"prune.step_fraction must be in (0, 1], got {step_fraction}")
        check_compensation(compensation)
        if max_exact < 1:
            raise NapkitError(f"prune.max_exact must be >= 1, got {max_exact}")
        if (criterion.needs_curvature or compensation != "none") and factors is None:
            raise NapkitError(f"criterion {criterion.name!r} with compensation {compensation!r} needs K-FAC "
                              f"factors; run the curvature stage")
        self.criterion, self.step_fraction, self.target = criterion, step_fraction, target
        self.allocation, self.max_layer_sparsity = allocation, max_layer_sparsity
        self.compensation, self.max_exact = compensation, max_exact
        self.damping, self.factors = damping, factors
        self.last_predicted_increase = math.nan  # undamped K-FAC quadratic model of the step (nan: no factors)
        self.last_predicted: dict[str, float] = {}  # the same per layer
        self.last_methods: dict[str, str] = {}  # compensation applied per layer (exact may fall back)

    def _score(self, name: str, layer: PrunableLayer, factors: dict[str, KFACFactors]) -> torch.Tensor:
        """The criterion's scores; +inf (never pruned) for a layer a curvature criterion has no factors for:
        the estimate left it out because it never ran as a module (it warned, naming it)."""
        if self.criterion.needs_curvature and name not in factors:
            return torch.full_like(layer.weight, math.inf, dtype=torch.float64)
        return self.criterion(name, layer, factors.get(name))

    def amount(self, masks: MaskSet) -> int:
        """How many weights this step removes: a share of the survivors, capped by the target."""
        kept, total = masks.counts()
        amount = round(self.step_fraction * kept)
        if self.target is not None:
            amount = min(amount, kept - kept_at(self.target, total))
        return max(amount, 0)

    def check_reachable(self, masks: MaskSet) -> None:
        """Fail before any work when the per-layer cap and the weight every output unit keeps rule the
        target out (the loop would otherwise prune until it cannot and stop short of it)."""
        if self.target is None:
            return
        _, total = masks.counts()
        least = sum(max(m.numel() - math.floor(self.max_layer_sparsity * m.numel()), m.shape[0] if m.dim() else 1)
                    for m in masks.masks.values())
        if least > kept_at(self.target, total):
            raise NapkitError(
                f"target sparsity {self.target:.4g} cannot be reached: with max_layer_sparsity="
                f"{self.max_layer_sparsity} and one weight kept per output unit, at most {1 - least / total:.4g} "
                f"(compression {total / least:.3g}x); lower prune.target_sparsity / prune.target_compression "
                f"or raise prune.max_layer_sparsity")

    def reached(self, model: nn.Module, masks: MaskSet | None) -> bool:
        """Whether no weight is left to prune for the target (the same rounding as :meth:`amount`)."""
        if self.target is None or masks is None:
            return False
        return sparsity_reached(*masks.counts(), self.target)

    @staticmethod
    def measure(model: nn.Module, masks: MaskSet | None) -> dict[str, float]:
        """Sparsity and compression (total / kept) of the prunable weights."""
        assert masks is not None
        kept, total = masks.counts()
        return {"sparsity": 1.0 - kept / total, "compression": total / max(kept, 1)}

    def __call__(self, model: nn.Module, masks: MaskSet | None, iteration: int) -> tuple[nn.Module, MaskSet]:
        assert masks is not None
        layers = prunable_layers(model)
        needs = self.criterion.needs_curvature or self.compensation != "none"
        factors = self.factors(model, iteration) if needs and self.factors else {}
        scores = {n: self._score(n, layers[n], factors) for n in masks.masks}
        new = prune_lowest(scores, masks, self.amount(masks), allocation=self.allocation,
                           max_layer_sparsity=self.max_layer_sparsity)
        self.last_predicted, self.last_methods = {}, {}
        covered = bool(factors)  # the step's prediction is whole only if every layer it changed had factors
        for name in new.masks:
            newly = masks.masks[name] & ~new.masks[name]
            if not bool(newly.any()):
                continue
            if name not in factors:
                covered = False
                continue
            done = obs_compensate_(layers[name], factors[name].to(torch.float64), newly,
                                   kept=masks.masks[name], method=self.compensation, damping=self.damping,
                                   max_exact=self.max_exact)
            self.last_predicted[name], self.last_methods[name] = done.predicted, done.method
        self.last_predicted_increase = sum(self.last_predicted.values()) if covered else math.nan
        new.apply_(model)
        return model, new
