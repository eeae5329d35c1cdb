"""One CHEX exploration step (spec a-e), the initial masks, compaction and the FLOPs -> S bisection.

:class:`Explorer` owns the channel masks and the MRU bank of one model. ``init`` masks every layer
uniformly at density ``1 - S + d0`` keeping the largest-L1 filters (after snapshotting the bank);
``step`` runs (a) budgets from |gamma| (with a FLOPs target, at the global sparsity whose budgets
give that target, found by bisection on the measured FLOPs **[ours]**), (b) CSS pruning, (c) MRU
restore, (d) importance-sampled regrowth, snapshot, apply, and (e) under ``torch.distributed`` takes
rank 0's masks. Sampling uses a generator seeded from ``(seed, epoch)`` alone, so a run is deterministic
and resumes exactly.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from napkit.chex.budget import layer_budgets, layer_scores
from napkit.chex.css import css_keep, filter_matrix, l1_keep
from napkit.chex.masks import ChannelMasks, ChexLayer, chex_layers
from napkit.chex.regrow import (
    REINIT,
    MRUBank,
    check_regrowth,
    distance_from_uniform,
    draw,
    regrowth_probabilities,
)
from napkit.errors import NapkitError
from napkit.structured.groups import ChannelGroup, channel_groups
from napkit.structured.pruner import count_flops
from napkit.structured.surgery import apply


@dataclass
class StepRecord:
    """What one exploration step did (logged per step)."""

    epoch: int
    regrow_factor: float
    density: float
    channels: dict[str, int]
    kept: int
    regrown: int
    survived: int | None  # of the previous step's regrown channels, how many CSS kept this step
    layer_regrown: dict[str, int] = field(default_factory=dict)
    sparsity: float | None = None  # the global sparsity S the budgets used this step
    # draw-weighted mean total-variation distance of the regrowth distribution from uniform (0: random)
    sampling_distance: float | None = None

    def row(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "sparsity": self.sparsity, "regrow_factor": self.regrow_factor,
                "density": self.density,
                "kept": self.kept, "regrown": self.regrown,
                "survived": -1 if self.survived is None else self.survived,
                "sampling_distance": self.sampling_distance,
                **{f"channels/{k}": v for k, v in self.channels.items()}}


class Explorer:
    """Masks, MRU bank and exploration steps of one model (spec: one exploration step).

    ``flops_target = (reduction, input_shape)`` makes every step choose its global sparsity so that
    the channels its budgets keep give ``reduction`` x fewer FLOPs than the dense ``model`` (which
    layers lose channels moves with the gammas, and with it the FLOPs a fixed S leaves); ``sparsity``
    then only sets the initial uniform density.
    """

    def __init__(self, model: nn.Module, *, sparsity: float, d0: float, regrowth: str = "importance",
                 reinit: str = "mru", temperature: float = 1.0, seed: int = 0, min_channels: int = 1,
                 min_density: float = 0.0,
                 groups: list[ChannelGroup] | None = None,
                 flops_target: tuple[float, tuple[int, ...]] | None = None) -> None:
        check_regrowth(regrowth, temperature)
        if reinit not in REINIT:
            raise NapkitError(f"unknown chex.reinit {reinit!r}; valid choices: {', '.join(REINIT)}")
        if not 0.0 <= sparsity < 1.0:
            raise NapkitError(f"chex.S must lie in [0, 1), got {sparsity}")
        if not 0.0 <= d0 <= sparsity:
            raise NapkitError(f"chex.d0 must lie in [0, S={sparsity}], got {d0}")
        if flops_target is not None:
            groups = groups or channel_groups(model)
            self.dense_flops = count_flops(copy.deepcopy(model).cpu(), flops_target[1])[0]
        self.groups, self.flops_target = groups, flops_target
        self.layers: list[ChexLayer] = chex_layers(model, groups)
        self.sparsity, self.d0, self.regrowth, self.reinit = float(sparsity), float(d0), regrowth, reinit
        self.temperature = float(temperature)
        self.seed, self.min_channels, self.min_density = int(seed), int(min_channels), float(min_density)
        self.masks = ChannelMasks.dense(self.layers)
        self.bank = MRUBank(self.layers)
        self.last_regrown: dict[str, Tensor] = {}
        self.records: list[StepRecord] = []

    # ------------------------------------------------------------------ start

    @torch.no_grad()
    def init(self, model: nn.Module) -> ChannelMasks:
        """Spec 1: uniform density ``1 - S + d0`` by filter L1 norm; the bank holds the random init."""
        density = 1.0 - self.sparsity + self.d0
        masks = {}
        for l in self.layers:
            k = min(l.size, max(self.min_channels, round(density * l.size)))
            m = torch.zeros(l.size, dtype=torch.bool)
            m[l1_keep(model.get_submodule(l.producer).weight, k)] = True
            masks[l.id] = m
        self.bank.snapshot(model)
        self.masks = self._broadcast(ChannelMasks(self.layers, masks))
        self.masks.apply_(model)
        return self.masks

    # ------------------------------------------------------------------ one step

    @torch.no_grad()
    def step(self, model: nn.Module, epoch: int, regrow_factor: float) -> StepRecord:
        """Spec a-e at the start of ``epoch`` with regrowing factor ``d_e``; applies the new masks."""
        old = self.masks.masks
        # (a) budgets from |gamma| (pruned channels score 0)
        scores = {l.id: layer_scores(model, l, old[l.id]) for l in self.layers}
        sparsity = self.sparsity if self.flops_target is None else self._sparsity_for_target(model, scores)
        regrow_factor = min(regrow_factor, sparsity)
        keep, grow = layer_budgets(scores, sparsity, regrow_factor, self.min_channels, self.min_density)
        # (b) prune by CSS
        kept = {l.id: css_keep(model.get_submodule(l.producer).weight, keep[l.id], old[l.id])
                for l in self.layers}
        # (c) restore the MRU values of every channel pruned so far
        if self.reinit == "mru":
            self.bank.restore(model, {lid: ~m for lid, m in old.items()})
        # (d) regrow by importance sampling
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        new, regrown, distance, draws = {}, {}, 0.0, 0
        for l in self.layers:
            x = filter_matrix(model.get_submodule(l.producer).weight)
            candidates, probs = regrowth_probabilities(x, kept[l.id], method=self.regrowth,
                                                       temperature=self.temperature)
            r = draw(candidates, probs, grow[l.id], gen)
            if r.numel():
                distance, draws = distance + r.numel() * distance_from_uniform(probs), draws + r.numel()
            m = torch.zeros(l.size, dtype=torch.bool)
            m[kept[l.id]] = True
            m[r] = True
            new[l.id], regrown[l.id] = m, r
        masks = self._broadcast(ChannelMasks(self.layers, new))
        survived = None
        if self.last_regrown:
            survived = sum(int(torch.isin(self.last_regrown[lid], kept[lid]).sum()) for lid in kept)
        self.last_regrown = {lid: torch.nonzero(masks.masks[lid]).flatten()[
            torch.isin(torch.nonzero(masks.masks[lid]).flatten(), kept[lid], invert=True)] for lid in kept}
        self.bank.snapshot(model)
        self.masks = masks
        masks.apply_(model)
        counts = masks.counts()
        rec = StepRecord(epoch=epoch, regrow_factor=float(regrow_factor), density=masks.density(),
                         channels=counts, kept=sum(keep.values()),
                         regrown=sum(int(v.numel()) for v in self.last_regrown.values()), survived=survived,
                         layer_regrown={lid: int(v.numel()) for lid, v in self.last_regrown.items()},
                         sparsity=sparsity, sampling_distance=distance / draws if draws else None)
        self.records.append(rec)
        return rec

    def _sparsity_for_target(self, model: nn.Module, scores: dict[str, Tensor]) -> float:
        """The global sparsity whose |gamma| budgets keep channels worth the FLOPs target."""
        assert self.flops_target is not None
        target, shape = self.flops_target
        cpu = copy.deepcopy(model).cpu()

        def reduction(s: float) -> float:
            keep, _ = layer_budgets(scores, s, 0.0, self.min_channels, self.min_density)
            counts = {l.id: max(keep[l.id], self.min_channels, 1) for l in self.layers}
            return self.dense_flops / _flops_keeping(cpu, self.layers, self.groups, counts, shape)

        return _bisect(reduction, target, hi=1.0 - self.min_density)

    def _broadcast(self, masks: ChannelMasks) -> ChannelMasks:
        """(e) Under torch.distributed every rank takes rank 0's masks."""
        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return masks
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" \
            else torch.device("cpu")
        out = {}
        for l in self.layers:
            t = masks.masks[l.id].to(device=device, dtype=torch.uint8)
            dist.broadcast(t, src=0)
            out[l.id] = t.cpu().bool()
        return ChannelMasks(self.layers, out)

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        return {"masks": self.masks.to_tensors(), "bank": self.bank.state_dict(),
                "last_regrown": {k: v.clone() for k, v in self.last_regrown.items()},
                "records": [r.__dict__ for r in self.records]}

    def load_state_dict(self, state: dict[str, Any], device: torch.device | None = None) -> None:
        self.masks = ChannelMasks.from_tensors(self.layers, state["masks"])
        self.bank.load_state_dict(state["bank"], device)
        self.last_regrown = {k: v.clone() for k, v in state["last_regrown"].items()}
        self.records = [StepRecord(**r) for r in state["records"]]


# ---------------------------------------------------------------------- compaction and FLOPs


def compact(model: nn.Module, masks: ChannelMasks, groups: list[ChannelGroup] | None = None) -> nn.Module:
    """The physically smaller copy of a masked model (only its live channels)."""
    return apply(model, masks.plan(), groups=groups)


def _flops_keeping(model: nn.Module, layers: list[ChexLayer], groups: list[ChannelGroup] | None,
                   counts: dict[str, int], shape: tuple[int, ...]) -> int:
    """FLOPs of ``model`` compacted to ``counts[layer]`` channels per CHEX layer (which ones: irrelevant)."""
    plan = {l.id: torch.arange(counts[l.id]) for l in layers}
    return count_flops(apply(model, plan, groups=groups), shape)[0]


def sparsity_for_flops(model: nn.Module, target_reduction: float, input_shape: tuple[int, ...], *,
                       min_channels: int = 1, tol: float = 1e-3) -> float:
    """Smallest S (within ``tol``) whose uniformly masked model has ``target_reduction`` x fewer FLOPs
    than ``model``, by bisection on the FLOPs measured after compaction **[ours]**.

    CHEX reallocates channels while it trains, so the FLOPs of a fixed S move with the gammas: this
    value sets the initial density, and an :class:`Explorer` given the target matches it at every step.
    """
    if target_reduction < 1.0:
        raise NapkitError(f"chex.target_flops_reduction must be >= 1, got {target_reduction}")
    model = copy.deepcopy(model).cpu()
    groups = channel_groups(model)
    layers = chex_layers(model, groups)
    dense = count_flops(model, input_shape)[0]

    def reduction(s: float) -> float:
        counts = {l.id: min(l.size, max(min_channels, round((1.0 - s) * l.size))) for l in layers}
        return dense / _flops_keeping(model, layers, groups, counts, input_shape)

    return _bisect(reduction, target_reduction, tol=tol, what=f"{type(model).__name__}'s CHEX layers")


def _bisect(reduction: Callable[[float], float], target: float, *, hi: float = 1.0, tol: float = 1e-3,
            what: str = "the CHEX layers") -> float:
    """Smallest sparsity in [0, hi) (within ``tol``) whose FLOPs ``reduction`` reaches ``target``."""
    lo, hi = 0.0, hi - 1e-6
    if reduction(hi) < target:
        raise NapkitError(f"a {target}x FLOPs reduction is out of reach by pruning {what} "
                          f"(at most {reduction(hi):.2f}x)")
    while hi - lo > tol:
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if reduction(mid) >= target else (mid, hi)
    return hi
