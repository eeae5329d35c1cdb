"""NAP's iterative loop and its stopping rule (nap.md s.5), shared by every pruning method.

Repeat: prune a fraction of the remaining units, fine-tune briefly, validate. Stop when the
target is met, or when validation top-1 falls more than ``tolerance`` points below the dense
model's; then roll back to the last iteration within tolerance. Every iteration is recorded,
and the loop checkpoints after each one so a killed run resumes where it stopped.

The loop is agnostic of what a unit is: fine-grained steps return the same model with new
masks, structured steps return a new, physically smaller model (``masks`` is then None and
``describe``/``rebuild`` turn its architecture into a checkpointable description and back).
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from torch import nn

from napkit.errors import NapkitError
from napkit.io import load_torch, save_torch
from napkit.pruning.allocation import CannotPruneFurther
from napkit.pruning.masks import MaskSet

log = logging.getLogger(__name__)

Step = Callable[[nn.Module, MaskSet | None, int], tuple[nn.Module, MaskSet | None]]
Finetune = Callable[[nn.Module, MaskSet | None, int], None]
Validate = Callable[[nn.Module], dict[str, float]]
Measure = Callable[[nn.Module, MaskSet | None], dict[str, float]]
Reached = Callable[[nn.Module, MaskSet | None], bool]


@dataclass
class IterationRecord:
    """What one iteration did: where it got to (``measures``) and whether it stayed within tolerance."""

    iteration: int
    val_top1: float
    val_loss: float
    drop: float
    within_tolerance: bool
    seconds: float
    measures: dict[str, float] = field(default_factory=dict)
    layer_density: dict[str, float] = field(default_factory=dict)


@dataclass
class LoopResult:
    records: list[IterationRecord]
    best_iteration: int
    stop_reason: str

    @property
    def best(self) -> IterationRecord:
        return self.records[self.best_iteration]


@dataclass
class _State:
    model: nn.Module
    masks: MaskSet | None

    def copy(self) -> _State:
        return _State(copy.deepcopy(self.model), None if self.masks is None else self.masks.clone())


@dataclass
class _Best:
    """The last state within tolerance: what the loop rolls back to."""

    state: _State
    iteration: int


@dataclass
class IterativePruner:
    """The loop's parts: what a step, a fine-tune, a validation and a measurement are."""

    step: Step
    finetune: Finetune
    validate: Validate
    measure: Measure
    reached: Reached
    tolerance: float
    max_iterations: int
    # False: the stop rule is off (a fixed grid is evaluated to its end); the last iteration is kept
    stop_on_tolerance: bool = True
    density: Callable[[nn.Module, MaskSet | None], dict[str, float]] = lambda m, k: {} if k is None else k.layer_density()
    describe: Callable[[nn.Module], dict[str, int]] | None = None
    rebuild: Callable[[dict[str, int]], nn.Module] | None = None
    on_record: Callable[[IterationRecord], None] | None = None

    def run(self, model: nn.Module, masks: MaskSet | None, *, checkpoint: Path | None = None,
            fingerprint: str = "") -> tuple[nn.Module, MaskSet | None, LoopResult]:
        """Run from ``model`` (pruned in place or replaced); returns the best-within-tolerance state."""
        if self.tolerance < 0:
            raise NapkitError(f"prune.tolerance must be >= 0 (points of top-1), got {self.tolerance}")
        resumed = self._resume(checkpoint, fingerprint, model)
        if resumed is None:
            state = _State(model, masks)
            if state.masks is not None:
                state.masks.apply_(state.model)
            records = [self._record(0, state, self.validate(state.model), None, 0.0)]
            best = _Best(state.copy(), 0)
            if self.on_record:
                self.on_record(records[0])
        else:
            state, best, records = resumed
        self.records = records  # the path so far, growing as the loop runs (steps may read the last record)
        reason = self._iterate(state, records, best, checkpoint, fingerprint)
        log.info("prune loop stopped (%s); kept iteration %d: %s, val top-1 %.2f", reason, best.iteration,
                 records[best.iteration].measures, records[best.iteration].val_top1)
        return best.state.model, best.state.masks, LoopResult(records, best.iteration, reason)

    def _iterate(self, state: _State, records: list[IterationRecord], best: _Best, checkpoint: Path | None,
                 fingerprint: str) -> str:
        acc0 = records[0].val_top1
        if self.stop_on_tolerance and not records[-1].within_tolerance:
            return "tolerance"
        if self.reached(state.model, state.masks):
            return "target"
        while records[-1].iteration < self.max_iterations:
            it = records[-1].iteration + 1
            t0 = time.perf_counter()
            try:
                state.model, state.masks = self.step(state.model, state.masks, it)
            except CannotPruneFurther as exc:
                log.warning("prune loop: %s", exc)
                return "cannot_prune_further"
            self.finetune(state.model, state.masks, it)
            if state.masks is not None:
                state.masks.apply_(state.model)
            rec = self._record(it, state, self.validate(state.model), acc0, time.perf_counter() - t0)
            records.append(rec)
            if self.on_record:
                self.on_record(rec)
            if rec.within_tolerance or not self.stop_on_tolerance:
                best.state, best.iteration = state.copy(), it
            if checkpoint is not None:
                self._save(checkpoint, fingerprint, state, best, records)
            if self.stop_on_tolerance and not rec.within_tolerance:
                return "tolerance"
            if self.reached(state.model, state.masks):
                return "target"
        return "max_iterations"

    def _record(self, it: int, state: _State, val: dict[str, float], acc0: float | None,
                seconds: float) -> IterationRecord:
        drop = 0.0 if acc0 is None else acc0 - val["top1"]
        return IterationRecord(iteration=it, val_top1=val["top1"], val_loss=val["loss"], drop=drop,
                               within_tolerance=drop <= self.tolerance, seconds=seconds,
                               measures=self.measure(state.model, state.masks),
                               layer_density=self.density(state.model, state.masks))

    def _pack(self, state: _State) -> dict:
        return {"model": state.model.state_dict(), "masks": None if state.masks is None else state.masks.to_tensors(),
                "arch": self.describe(state.model) if self.describe else None}

    def _unpack(self, packed: dict, like: nn.Module) -> _State:
        """Rebuild a packed state: a new architecture from its description, or a copy of ``like``."""
        model = self.rebuild(packed["arch"]) if packed["arch"] is not None and self.rebuild else copy.deepcopy(like)
        model.load_state_dict(packed["model"])
        masks = None if packed["masks"] is None else MaskSet.from_tensors(packed["masks"])
        return _State(model, masks)

    def _save(self, path: Path, fingerprint: str, state: _State, best: _Best,
              records: list[IterationRecord]) -> None:
        save_torch(path, {"fingerprint": fingerprint, "state": self._pack(state), "best": self._pack(best.state),
                          "best_iteration": best.iteration, "records": [asdict(r) for r in records]})

    def _resume(self, path: Path | None, fingerprint: str,
                like: nn.Module) -> tuple[_State, _Best, list[IterationRecord]] | None:
        """The state saved after the last finished iteration, if it belongs to this configuration."""
        if path is None or not path.is_file():
            return None
        saved = load_torch(path)
        if saved.get("fingerprint") != fingerprint:
            log.warning("prune loop: ignoring checkpoint %s from another configuration", path)
            return None
        records = [IterationRecord(**r) for r in saved["records"]]
        log.info("prune loop: resumed after iteration %d", records[-1].iteration)
        best = _Best(self._unpack(saved["best"], like), int(saved["best_iteration"]))
        return self._unpack(saved["state"], like), best, records
