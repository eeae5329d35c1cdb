"""The iterative loop's stopping rule and rollback, on crafted accuracy sequences."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from napkit.pruning.allocation import prune_lowest
from napkit.pruning.fine_grained import FineGrainedPruner
from napkit.pruning.loop import IterativePruner
from napkit.pruning.masks import MaskSet


def _setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    return model, MaskSet.dense(model)


def _run(accs: list[float], *, target: float | None, tolerance: float = 1.0, max_iterations: int = 10,
         checkpoint=None, fail_at: int | None = None, stop_on_tolerance: bool = True):
    model, masks = _setup()
    states: dict[int, dict[str, torch.Tensor]] = {}
    current = {"it": 0}

    def step(m: nn.Module, mk: MaskSet, it: int) -> tuple[nn.Module, MaskSet]:
        current["it"] = it
        kept, _ = mk.counts()
        new = prune_lowest({n: l.weight.abs() for n, l in m.named_modules() if n in mk.masks}, mk, kept // 2,
                           max_layer_sparsity=1.0)
        new.apply_(m)
        return m, new

    def finetune(m: nn.Module, mk: MaskSet, it: int) -> None:
        if fail_at is not None and it == fail_at:
            raise KeyboardInterrupt("killed")
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.01 * it)
        mk.apply_(m)
        states[it] = {k: v.clone() for k, v in m.state_dict().items()}

    def validate(m: nn.Module) -> dict[str, float]:
        return {"top1": accs[min(current["it"], len(accs) - 1)], "loss": 0.0}

    reached = (lambda m, mk: mk.sparsity() >= target) if target is not None else (lambda m, mk: False)
    loop = IterativePruner(step=step, finetune=finetune, validate=validate, measure=FineGrainedPruner.measure,
                           reached=reached, tolerance=tolerance, max_iterations=max_iterations,
                           stop_on_tolerance=stop_on_tolerance)
    model, final_masks, result = loop.run(model, masks, checkpoint=checkpoint, fingerprint="x")
    return model, final_masks, result, states


def test_stops_at_tolerance_and_rolls_back() -> None:
    model, masks, result, states = _run([90.0, 89.9, 89.5, 88.5, 95.0], target=None)
    assert result.stop_reason == "tolerance"
    assert [r.iteration for r in result.records] == [0, 1, 2, 3]
    assert result.best_iteration == 2
    assert result.records[3].within_tolerance is False
    for k, v in model.state_dict().items():
        assert torch.equal(v, states[2][k])
    assert masks.sparsity() == pytest.approx(result.records[2].measures["sparsity"])


def test_stops_at_target_without_rollback() -> None:
    _, masks, result, _ = _run([90.0] * 10, target=0.7)
    assert result.stop_reason == "target"
    assert result.best_iteration == len(result.records) - 1
    assert masks.sparsity() >= 0.7


def test_stop_rule_off_goes_down_the_whole_schedule_and_keeps_the_last_step() -> None:
    """``stop_on_tolerance=False`` (a fixed grid): a drop past the tolerance neither stops nor rolls back."""
    model, _, result, states = _run([90.0, 89.9, 80.0, 70.0, 60.0], target=None, max_iterations=4,
                                    stop_on_tolerance=False)
    assert result.stop_reason == "max_iterations"
    assert [r.within_tolerance for r in result.records] == [True, True, False, False, False]
    assert result.best_iteration == 4
    for k, v in model.state_dict().items():
        assert torch.equal(v, states[4][k])


def test_max_iterations() -> None:
    _, _, result, _ = _run([90.0] * 10, target=None, max_iterations=2)
    assert result.stop_reason == "max_iterations" and result.best_iteration == 2


def test_resume_after_interruption_gives_same_result(tmp_path) -> None:
    ref_model, ref_masks, ref, _ = _run([90.0, 89.9, 89.5, 89.4, 80.0], target=None)
    ckpt = tmp_path / "loop.pt"
    with pytest.raises(KeyboardInterrupt):
        _run([90.0, 89.9, 89.5, 89.4, 80.0], target=None, checkpoint=ckpt, fail_at=3)
    assert ckpt.is_file()
    model, masks, result, _ = _run([90.0, 89.9, 89.5, 89.4, 80.0], target=None, checkpoint=ckpt)
    assert [r.iteration for r in result.records] == [r.iteration for r in ref.records]
    assert result.best_iteration == ref.best_iteration
    for k, v in ref_model.state_dict().items():
        assert torch.equal(v, model.state_dict()[k])
