"""NAP's iterative loop and its stopping rule (nap.md s.5), shared by every pruning method.

Repeat: prune a fraction of the remaining units, fine-tune briefly, validate. Stop when the
target is met, or when validation top-1 falls more than ``tolerance`` points below the dense
model's; then roll back to the last iteration within tolerance. Every iteration is recorded,
and the loop checkpoints after each one so a killed run resumes where it stopped.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from napkit.errors import NapkitError
from napkit.io import load_torch, save_torch
from napkit.pruning.allocation import CannotPruneFurther
from napkit.pruning.masks import MaskSet

log = logging.getLogger(__name__)


@dataclass
class IterationRecord:
    """What one iteration did: where it got to and whether it stayed within tolerance."""

    iteration: int
    sparsity: float
    compression: float
    val_top1: float
    val_loss: float
    drop: float
    within_tolerance: bool
    seconds: float
    layer_density: dict[str, float] = field(default_factory=dict)


@dataclass
class LoopResult:
    records: list[IterationRecord]
    best_iteration: int
    stop_reason: str

    @property
    def best(self) -> IterationRecord:
        return self.records[self.best_iteration]


PruneStep = Callable[[nn.Module, MaskSet, int], MaskSet]
Finetune = Callable[[nn.Module, MaskSet, int], None]
Validate = Callable[[nn.Module], dict[str, float]]


def _record(iteration: int, masks: MaskSet, val: dict[str, float], acc0: float, tolerance: float,
            seconds: float) -> IterationRecord:
    kept, total = masks.counts()
    drop = acc0 - val["top1"]
    return IterationRecord(iteration=iteration, sparsity=1.0 - kept / total, compression=total / max(kept, 1),
                           val_top1=val["top1"], val_loss=val["loss"], drop=drop,
                           within_tolerance=drop <= tolerance, seconds=seconds,
                           layer_density=masks.layer_density())


def iterative_prune(
    model: nn.Module,
    masks: MaskSet,
    *,
    step: PruneStep,
    finetune: Finetune,
    validate: Validate,
    target_reached: Callable[[MaskSet], bool],
    tolerance: float,
    max_iterations: int,
    checkpoint: Path | None = None,
    fingerprint: str = "",
    on_record: Callable[[IterationRecord], None] | None = None,
) -> tuple[MaskSet, LoopResult]:
    """Run the loop on ``model`` in place; on return the model holds the best-within-tolerance state."""
    if tolerance < 0:
        raise NapkitError(f"prune.tolerance must be >= 0 (points of top-1), got {tolerance}")
    records: list[IterationRecord] = []
    best_state, best_masks, best_it = None, masks.clone(), 0
    if checkpoint is not None and checkpoint.is_file():
        state = load_torch(checkpoint)
        if state.get("fingerprint") == fingerprint:
            model.load_state_dict(state["model"])
            masks = MaskSet.from_tensors(state["masks"])
            best_state, best_masks = state["best_model"], MaskSet.from_tensors(state["best_masks"])
            best_it = int(state["best_iteration"])
            records = [IterationRecord(**r) for r in state["records"]]
            log.info("prune loop: resumed after iteration %d", records[-1].iteration)
        else:
            log.warning("prune loop: ignoring checkpoint %s from another configuration", checkpoint)
    if not records:
        t0 = time.perf_counter()
        masks.apply_(model)
        rec = _record(0, masks, validate(model), 0.0, tolerance, time.perf_counter() - t0)
        rec.drop, rec.within_tolerance = 0.0, True
        records.append(rec)
        best_state = _copy_state(model)
        if on_record:
            on_record(rec)
    best = {"state": best_state, "masks": best_masks, "it": best_it}
    if records[-1].within_tolerance and target_reached(masks):
        stop_reason = "target"
    elif not records[-1].within_tolerance:
        stop_reason = "tolerance"
    else:
        stop_reason = _continue(records, masks, model, step, finetune, validate, records[0].val_top1, tolerance,
                                max_iterations, target_reached, checkpoint, fingerprint, on_record, best)
    best_state, best_masks, best_it = best["state"], best["masks"], best["it"]
    model.load_state_dict(best_state)
    best_masks.apply_(model)
    log.info("prune loop stopped (%s); kept iteration %d: sparsity %.4f, val top-1 %.2f",
             stop_reason, best_it, records[best_it].sparsity, records[best_it].val_top1)
    return best_masks, LoopResult(records=records, best_iteration=best_it, stop_reason=stop_reason)


def _continue(records: list[IterationRecord], masks: MaskSet, model: nn.Module, step: PruneStep,
              finetune: Finetune, validate: Validate, acc0: float, tolerance: float, max_iterations: int,
              target_reached: Callable[[MaskSet], bool], checkpoint: Path | None, fingerprint: str,
              on_record: Callable[[IterationRecord], None] | None, best: dict) -> str:
    """Iterate from the last record until a stopping rule fires; keeps ``best`` up to date."""
    while records[-1].iteration < max_iterations:
        it = records[-1].iteration + 1
        t0 = time.perf_counter()
        try:
            masks = step(model, masks, it)
        except CannotPruneFurther as exc:
            log.warning("prune loop: %s", exc)
            return "cannot_prune_further"
        finetune(model, masks, it)
        masks.apply_(model)
        rec = _record(it, masks, validate(model), acc0, tolerance, time.perf_counter() - t0)
        records.append(rec)
        if on_record:
            on_record(rec)
        if rec.within_tolerance:
            best.update(state=_copy_state(model), masks=masks.clone(), it=it)
        if checkpoint is not None:
            save_torch(checkpoint, {
                "fingerprint": fingerprint, "model": model.state_dict(), "masks": masks.to_tensors(),
                "best_model": best["state"], "best_masks": best["masks"].to_tensors(),
                "best_iteration": best["it"], "records": [asdict(r) for r in records],
            })
        if not rec.within_tolerance:
            return "tolerance"
        if target_reached(masks):
            return "target"
    return "max_iterations"


def _copy_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}
