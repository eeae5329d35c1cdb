"""Damping and compensation study for issue #20 on the tiny digits CNN of test_obs_exact (not a test).

Run: ``PYTHONPATH=src python tests/obs_study.py``. For each damping: the measured and predicted loss
increase of one global NAP step (10/30/50%) from the dense model with each compensation, and the
Spearman correlation of single-weight OBS scores with the measured increase of removing each weight
(with its own OBS update) on a sample of weights; without an argument also four geometric 50% steps.
``python tests/obs_study.py N`` estimates the factors on the first N examples only. Numbers: docs/obs.md.
"""

from __future__ import annotations

import copy
import math
import sys
from pathlib import Path

import torch
from scipy.stats import pearsonr, spearmanr

sys.path.insert(0, str(Path(__file__).parent))
from test_obs_exact import loss, pruned_loss, trained_cnn

from napkit.curvature import estimate_kfac
from napkit.layers import prunable_layers
from napkit.pruning.compensation import obs_compensate_
from napkit.pruning.fine_grained import FineGrainedPruner
from napkit.pruning.importance import create_importance
from napkit.pruning.masks import MaskSet


def single_weight_fit(net: tuple, damping: float, per_layer: int = 40) -> tuple[float, float]:
    """(Spearman, log-log Pearson) of predicted vs measured single-weight removal with its OBS update."""
    model, x, y, factors = net
    base = loss(model, x, y)
    gen = torch.Generator().manual_seed(0)
    pred, meas = [], []
    for name, layer in prunable_layers(model).items():
        f = factors[name].damped(damping)
        scores = create_importance("nap", damping=damping)(name, layer, factors[name])
        for q in torch.randperm(layer.weight.numel(), generator=gen)[:per_layer].tolist():
            m = copy.deepcopy(model)
            one = torch.zeros_like(layer.weight, dtype=torch.bool).reshape(-1)
            one[q] = True
            obs_compensate_(m.get_submodule(name), f, one.reshape(layer.weight.shape), method="exact")
            pred.append(float(scores.reshape(-1)[q]))
            meas.append(loss(m, x, y) - base)
    p, mm = torch.tensor(pred), torch.tensor(meas)
    ok = mm > 0
    return float(spearmanr(p, mm).statistic), float(pearsonr(p[ok].log(), mm[ok].log()).statistic)


def multi_step(net: tuple, damping: float, compensation: str, steps: int = 4) -> str:
    """Geometric 50% steps from the dense model, factors re-estimated each step, no fine-tuning."""
    model, x, y, _ = net
    model, masks = copy.deepcopy(model), MaskSet.dense(model)

    def provide(m: torch.nn.Module, it: int) -> dict:
        return estimate_kfac(m, [(x, y)], num_samples=len(x), dtype=torch.float64, progress=False)

    pruner = FineGrainedPruner(create_importance("nap", damping=damping), step_fraction=0.5, target=None,
                               compensation=compensation, damping=damping, factors=provide)
    cells = []
    for it in range(1, steps + 1):
        before = loss(model, x, y)
        model, masks = pruner(model, masks, it)
        cells.append(f"{masks.sparsity():.3f}: meas {loss(model, x, y) - before:.2e} "
                     f"pred {pruner.last_predicted_increase:.2e}")
    return " | ".join(cells) + f" | final loss {loss(model, x, y):.3f}"


def main() -> None:
    net = trained_cnn()
    if len(sys.argv) > 1:  # factors from the first N examples only, the loss still on all of them
        model, x, y, _ = net
        n = int(sys.argv[1])
        net = (model, x, y, estimate_kfac(model, [(x[:n], y[:n])], num_samples=n, dtype=torch.float64,
                                          progress=False))
        print(f"factors from {n} examples")
    print(f"dense loss {loss(net[0], net[1], net[2]):.4f}")
    print("damping | single-weight spearman, loglog-pearson | step: measured none/rowwise/exact, predicted exact")
    for damping in (1e-4, 1e-3, 1e-2, 0.1, 1.0):
        rho, r = single_weight_fit(net, damping)
        cells, logs = [], []
        for fraction in (0.3, 0.5, 0.7, 0.9):
            none, pred_none = pruned_loss(net, fraction, "none", damping)
            row, _ = pruned_loss(net, fraction, "rowwise", damping)
            exact, pred = pruned_loss(net, fraction, "exact", damping)
            cells.append(f"{fraction:.0%}: {none:.2e}/{row:.2e}/{exact:.2e} pred {pred:.2e} (none {pred_none:.2e})")
            if fraction <= 0.7:  # inside the quadratic model's reach (at 90% every update overshoots)
                logs += [abs(math.log10(p / m)) for p, m in ((pred_none, none), (pred, exact)) if m > 0]
        fit = sum(logs) / len(logs)
        print(f"{damping:g} | {rho:.3f}, {r:.3f} | mean|log10(pred/meas)| {fit:.2f} | " + " | ".join(cells))
    if len(sys.argv) == 1:
        print("four 50% steps, factors re-estimated each step (sparsity: measured / predicted increase)")
        for damping in (0.01, 0.1):
            for compensation in ("none", "rowwise", "exact"):
                print(f"{damping:g} {compensation}: {multi_step(net, damping, compensation)}")


if __name__ == "__main__":
    main()
