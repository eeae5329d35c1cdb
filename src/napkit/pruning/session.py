"""One pruning run from a ``prune`` config: the loop's parts assembled for a model and its data.

The prune stage and the Python API (:func:`napkit.prune`) both call :func:`run_pruning`, so a
run from Python and a pipeline run with the same settings do the same thing. What it adds to the
bare loop (:class:`~napkit.pruning.loop.IterativePruner`):

- ``prune.grid``: every step stops at the next grid point (compression for fine-grained, FLOPs
  reduction for structured), so methods visit the same points with the same number of steps;
- ``prune.stop_on_tolerance=false``: the grid is evaluated to its end (nothing rolled back);
- ``prune.finetune_epochs``: the fine-tune after every step, in (fractional) epochs;
- ``prune.bn_recalibration_batches``: BatchNorm statistics re-estimated right after every step;
- ``prune.one_shot``: no fine-tuning at all (post-training pruning);
- per iteration: validation top-1 and loss before fine-tuning, the criterion's predicted loss increase
  next to the measured one, and with ``prune.eval_test`` the test top-1 before and after fine-tuning
  (reported only, never used for a decision).
"""

from __future__ import annotations

import copy
import math
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn
from torch.utils.data import Dataset

from napkit.curvature import KFACFactors
from napkit.data import make_loader
from napkit.errors import NapkitError, unknown_choice
from napkit.pruning.fine_grained import FineGrainedPruner, sparsity_reached, target_sparsity
from napkit.pruning.importance import Importance, create_importance
from napkit.pruning.loop import IterationRecord, IterativePruner, LoopResult
from napkit.pruning.masks import MaskSet
from napkit.structured import ChannelImportance, channel_importance_class
from napkit.structured.latency import LatencyTable
from napkit.structured.pruner import StructuredPruner, reduction_reached
from napkit.structured.surgery import channel_counts, recalibrate_bn, slim_to
from napkit.training.engine import evaluate
from napkit.training.trainer import fit

MODES = ("fine_grained", "structured")
FactorsProvider = Callable[[nn.Module, int], dict[str, KFACFactors]]


@dataclass
class PruneData:
    """The splits a pruning run reads: ``train`` (augmented, fine-tuning and BatchNorm statistics),
    ``train_plain`` (curvature), ``val`` (every decision) and optionally ``test`` (reported only)."""

    train: Dataset
    train_plain: Dataset
    val: Dataset
    test: Dataset | None = None


@dataclass
class PruneOutcome:
    """The kept model, its masks (fine-grained), the loop's records and the tolerance it applied."""

    model: nn.Module
    masks: MaskSet | None
    result: LoopResult
    tolerance: float


def weight_criterion(p: DictConfig, seed: int) -> Importance:
    """The fine-grained criterion ``prune.method`` names, with its settings."""
    if p.method == "random":
        return create_importance("random", seed=seed)
    kwargs = {"damping": float(p.damping)} if str(p.method).startswith("nap") else {}
    return create_importance(str(p.method), **kwargs)


def channel_criterion(p: DictConfig, seed: int) -> ChannelImportance:
    """The channel criterion ``prune.method`` names (``nap`` ranks per FLOP when ``structured.per_flop``
    and no latency table divides it instead), with its settings."""
    per_flop = p.structured.per_flop and p.structured.get("latency_batch") is None
    method = "nap_per_flop" if p.method == "nap" and per_flop else str(p.method)
    cls = channel_importance_class(method)
    if cls.needs_curvature:
        return cls(damping=float(p.get("damping", 0.1)))  # type: ignore[call-arg]
    return cls(seed=seed) if method == "random" else cls()  # type: ignore[call-arg]


def check_settings(p: DictConfig, seed: int) -> str:
    """The mode, after the checks that must fail before any long work (names, grid, budget)."""
    mode = str(p.get("mode", "fine_grained"))
    if mode not in MODES:
        raise unknown_choice("prune.mode", mode, MODES)
    channel_criterion(p, seed) if mode == "structured" else weight_criterion(p, seed)
    grid = _grid(p)
    if grid and any(not math.isfinite(g) or g <= 1 for g in grid):
        raise NapkitError(f"prune.grid={list(grid)}: every point must be a reduction > 1 (e.g. [2, 4, 8])")
    epochs = float(p.get("finetune_epochs", 1))
    if not math.isfinite(epochs) or epochs < 0:
        raise NapkitError(f"prune.finetune_epochs={epochs}: must be a number of epochs >= 0 (fractions allowed)")
    return mode


def _grid(p: DictConfig) -> list[float]:
    return sorted(float(g) for g in (p.get("grid") or []))


def _next_point(grid: Sequence[float], reached: Callable[[float], bool]) -> float:
    """The first grid point not yet reached (the last one once all are)."""
    return next((g for g in grid if not reached(g)), grid[-1])


def run_pruning(model: nn.Module, data: PruneData, cfg: DictConfig, *, factors: FactorsProvider,
                input_shape: tuple[int, ...], device: torch.device,
                checkpoint_for: Callable[[str], Path] | None = None, fingerprint: str = "",
                latency: LatencyTable | None = None, rebuild: Callable[[dict[str, int]], nn.Module] | None = None,
                on_record: Callable[[IterationRecord], None] | None = None,
                progress: bool = True) -> PruneOutcome:
    """Prune ``model`` with ``cfg.prune`` (fine-tuning with ``cfg.finetune``'s optimizer, batches from
    ``cfg.data``, seeds from ``cfg.seed``) and return the kept state.

    ``factors(model, iteration)`` gives the K-FAC factors of the model as it is at that iteration.
    ``checkpoint_for(name)`` places resume checkpoints (None: no checkpoints); ``fingerprint`` keys them.
    ``rebuild(channel_counts)`` rebuilds a structurally pruned architecture (default: the dense model
    slimmed); ``latency`` ranks channels per millisecond saved.
    """
    p, seed = cfg.prune, int(cfg.seed)
    mode = check_settings(p, seed)
    batch, eval_batch = int(cfg.data.batch_size), int(cfg.data.eval_batch_size)
    grid = _grid(p)
    one_shot = bool(p.get("one_shot", False))
    recal = int(p.get("bn_recalibration_batches", 0) or 0)
    val_batches = make_loader(data.val, batch_size=eval_batch, shuffle=False, seed=0)
    test_batches = (make_loader(data.test, batch_size=eval_batch, shuffle=False, seed=0)
                    if p.get("eval_test", False) and data.test is not None else None)
    pre: dict[int, dict[str, float]] = {}  # per iteration: what was measured before its fine-tune
    current = [0]  # the iteration being recorded

    if mode == "structured":
        parts, masks, pruner_of = structured_parts(cfg, model, input_shape, factors, latency, rebuild, device)
        tolerance = float(p.structured.tolerance)
    else:
        parts, masks, pruner_of = fine_grained_parts(p, seed, model, factors)
        tolerance = float(p.tolerance)
    step, measure = parts["step"], parts["measure"]

    def set_grid_target(m: nn.Module, mk: MaskSet | None) -> None:
        if not grid:
            return
        pruner = pruner_of()
        if mode == "structured":  # reached as the pruner judges it
            have = pruner.measure(m.cpu())["flops_reduction"]
            pruner.target = ("flops", _next_point(grid, lambda g: reduction_reached(have, g)))
        else:  # reached as the pruner counts it
            assert mk is not None
            kept, total = mk.counts()
            pruner.target = 1.0 - 1.0 / _next_point(grid, lambda g: sparsity_reached(kept, total, 1.0 - 1.0 / g))

    def grid_step(m: nn.Module, mk: MaskSet | None, it: int) -> tuple[nn.Module, MaskSet | None]:
        set_grid_target(m, mk)
        m, mk = step(m, mk, it)
        m = m.to(device)
        if recal:  # the step shifted every activation: re-estimate BatchNorm statistics as the weights saw them
            loader = make_loader(data.train, batch_size=batch, shuffle=True, seed=seed + it)
            recalibrate_bn(m, ((x.to(device), y) for x, y in loader), recal)
        val = evaluate(m, val_batches, device=device, desc="prune val (before fine-tune)", progress=False)
        pre[it] = {"val_top1_pre_ft": val["top1"], "val_loss_pre_ft": val["loss"]}
        # against the validation loss the step started from (the loop's last record, resumed ones included)
        pre[it]["measured_loss_increase"] = val["loss"] - loop.records[-1].val_loss
        current[0] = it
        predicted = getattr(pruner_of(), "last_predicted_increase", None)  # the criterion's quadratic model
        if predicted is not None and math.isfinite(predicted):
            pre[it]["predicted_loss_increase"] = float(predicted)
        if test_batches is not None:
            pre[it]["test_top1_pre_ft"] = evaluate(m, test_batches, device=device, progress=False)["top1"]
        return m, mk

    def finetune(m: nn.Module, mk: MaskSet | None, it: int) -> None:
        if one_shot:
            return
        torch.manual_seed(seed + it)
        fit(m, data.train, data.val, cfg=cfg.finetune, epochs=float(p.finetune_epochs), masks=mk,
            batch_size=batch, eval_batch_size=eval_batch, seed=seed + it, device=device,
            checkpoint=checkpoint_for(f"prune_iter{it}"), run_key=f"{fingerprint}-{it}", desc=f"prune {it} finetune", progress=progress)

    def measured(m: nn.Module, mk: MaskSet | None) -> dict[str, float]:
        out = {k: float(v) for k, v in measure(m, mk).items()}
        out.update(pre.get(current[0], {}))
        if test_batches is not None:
            out["test_top1"] = evaluate(m, test_batches, device=device, progress=False)["top1"]
        return out

    def validate(m: nn.Module) -> dict[str, float]:
        return evaluate(m, val_batches, device=device, desc="prune val", progress=progress)

    loop = IterativePruner(step=grid_step, finetune=finetune, validate=validate, measure=measured,
                           reached=parts["reached"], tolerance=tolerance, max_iterations=int(p.max_iterations),
                           stop_on_tolerance=bool(p.get("stop_on_tolerance", True)),
                           density=parts["density"], describe=parts.get("describe"),
                           rebuild=parts.get("rebuild"), on_record=on_record)
    with tempfile.TemporaryDirectory(prefix="napkit-prune-") as scratch:
        resumable = checkpoint_for is not None
        if checkpoint_for is None:  # no resume: the fine-tunes' checkpoints go to a folder removed afterwards
            def checkpoint_for(name: str) -> Path:
                return Path(scratch) / f"{name}.pt"
        model, masks, result = loop.run(model.to(device), masks,
                                        checkpoint=checkpoint_for("prune_loop") if resumable else None,
                                        fingerprint=fingerprint)
    return PruneOutcome(model.cpu(), masks, result, tolerance)


def fine_grained_parts(p: DictConfig, seed: int, model: nn.Module,
                        factors: FactorsProvider) -> tuple[dict[str, Any], MaskSet, Callable[[], Any]]:
    """Loop parts for weight pruning with masks."""
    target = target_sparsity(p.get("target_sparsity"), p.get("target_compression"))
    if _grid(p):
        target = 1.0 - 1.0 / _grid(p)[-1]
    pruner = FineGrainedPruner(weight_criterion(p, seed), step_fraction=float(p.step_fraction), target=target,
                               allocation=str(p.allocation), max_layer_sparsity=float(p.max_layer_sparsity),
                               compensation=str(p.get("compensation", "none")),
                               max_exact=int(p.get("max_exact", 2048)), damping=float(p.get("damping", 0.1)),
                               factors=factors)
    masks = MaskSet.dense(model)
    pruner.check_reachable(masks)  # an unreachable target fails before any work
    final = pruner.target

    def reached(m: nn.Module, mk: MaskSet | None) -> bool:
        assert mk is not None
        return final is not None and sparsity_reached(*mk.counts(), final)

    parts = {"step": pruner, "measure": pruner.measure, "reached": reached,
             "density": lambda m, mk: {} if mk is None else mk.layer_density()}
    return parts, masks, lambda: pruner


def structured_parts(cfg: DictConfig, dense: nn.Module, input_shape: tuple[int, ...], factors: FactorsProvider,
                      latency: LatencyTable | None, rebuild: Callable[[dict[str, int]], nn.Module] | None,
                      device: torch.device) -> tuple[dict[str, Any], None, Callable[[], Any]]:
    """Loop parts for channel pruning: physical removal; ranked per millisecond by ``latency`` when given."""
    p, s = cfg.prune, cfg.prune.structured
    grid = _grid(p)
    pruner = StructuredPruner(channel_criterion(p, int(cfg.seed)), dense, input_shape=input_shape,
                              step_fraction=float(s.step_fraction),
                              target_flops_reduction=grid[-1] if grid else s.get("target_flops_reduction"),
                              target_params_reduction=None if grid else s.get("target_params_reduction"),
                              allocation=str(p.allocation), max_group_sparsity=float(s.max_group_sparsity),
                              round_to=int(s.get("round_to", 1)), factors_provider=factors, latency=latency,
                              remove_blocks=bool(s.get("remove_blocks", False)), compensate=s.get("compensate"),
                              ignore=list(p.get("ignore") or []),
                              damping=float(p.get("damping", 0.1)))
    final = pruner.target
    template = copy.deepcopy(dense).cpu()
    build = rebuild or (lambda counts: slim_to(copy.deepcopy(template), counts))

    def reached(m: nn.Module, mk: MaskSet | None) -> bool:
        if final is None:
            return False
        kind, value = final
        return reduction_reached(pruner.measure(m.cpu())[f"{kind}_reduction"], value)

    def measure(m: nn.Module, mk: MaskSet | None) -> dict[str, float]:
        cpu = m.cpu()
        table = {"latency_table_ms": latency.model_ms(cpu)} if latency is not None else {}
        return {**pruner.measure(cpu), **table}

    parts = {"step": lambda m, mk, it: (pruner(m.cpu(), it), None), "measure": measure, "reached": reached,
             "density": lambda m, mk: pruner.density(m.cpu()), "describe": channel_counts,
             "rebuild": lambda counts: build(counts).to(device)}
    return parts, None, lambda: pruner
