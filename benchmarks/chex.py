"""CHEX vs its baselines at matched FLOPs on CIFAR-10 (docs/chex.md: "Baselines it must be compared with").

Every method gets the same number of training epochs E:

- ``chex``: train from scratch with exploration; every exploration step's S is found by bisection so the
  channels its |gamma| budgets keep meet the FLOPs target (``chex.target_flops_reduction``).
- ``chex_prune_only`` (d0 = 0), ``chex_random_regrow``, ``chex_zero_reinit``: the ablations.
- ``chex_min_density``: CHEX with every layer kept at >= half the uniform density (``chex.min_layer_density``),
  against the global gamma quantile starving the early layers in short runs.
- ``uniform``: the compact architecture with uniform per-layer ratios (the same S), from scratch.
- ``slimming``: 3/4 E with an L1 penalty on BatchNorm gammas (1e-4 VGG, 1e-5 ResNet), a global
  |gamma| threshold at the FLOPs target, 1/4 E fine-tune.
- ``nap_structured``: napkit's NAP channel pruning (K-FAC, ranked per FLOP saved: the pipeline's
  default) of a dense model trained E/2 epochs, then fine-tuned E/2 epochs.

Usage: ``python benchmarks/chex.py --quick`` (VGG at 2x, few samples and epochs: a smoke run) or
``python benchmarks/chex.py`` (small ResNet-50 and VGG16, 2x and 4x). Prints a table and writes
``benchmarks/results/chex.png`` and ``chex.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (DEVICE, RESULTS, build_model, load_splits, log, optim_cfg, print_table, pyplot,  # noqa: E402
                    save_figure, tensor_batches)

from napkit.chex import chex_layers, compact, layer_scores, sparsity_for_flops, train_chex  # noqa: E402
from napkit.curvature import estimate_kfac  # noqa: E402
from napkit.data import make_loader  # noqa: E402
from napkit.evaluation.cost import input_shape  # noqa: E402
from napkit.structured.pruner import StructuredPruner, count_flops, count_params  # noqa: E402
from napkit.structured.surgery import apply, recalibrate_bn  # noqa: E402
from napkit.training.engine import evaluate  # noqa: E402
from napkit.training.trainer import fit  # noqa: E402

def scratch() -> Path:
    """A fresh checkpoint path (fit writes one per epoch; the benchmark never resumes)."""
    return Path(tempfile.mkdtemp(prefix="chex-bench-")) / "ck.pt"


SLIMMING_L1 = {"vgg16_small": 1e-4, "resnet50_small": 1e-5}


def chex_cfg(epochs: int, lr: float, sparsity: float, **kw):
    cfg = optim_cfg(lr, epochs)
    cfg.update({"S": sparsity, "d0": min(0.2, sparsity), "dT": 2 if epochs >= 4 else 1, "T_max_fraction": 0.72,
                "regrowth": "importance", "reinit": "mru", "min_channels": 1, **kw})
    return cfg


def uniform_plan(model: nn.Module, sparsity: float) -> dict[str, torch.Tensor]:
    return {l.id: torch.arange(max(1, round((1 - sparsity) * l.size))) for l in chex_layers(model)}


def slimming_plan(model: nn.Module, target: float, shape) -> dict[str, torch.Tensor]:
    """Global |gamma| ranking over the CHEX layers, cut at the smallest count reaching the target."""
    layers = chex_layers(model)
    dense = count_flops(model, shape)[0]
    scores = [(float(s), l.id, j) for l in layers for j, s in enumerate(layer_scores(model, l))]
    order = sorted(scores)

    def plan(n: int) -> dict[str, torch.Tensor]:
        dead = {}
        for _, lid, j in order[:n]:
            dead.setdefault(lid, set()).add(j)
        out = {}
        for l in layers:
            keep = [j for j in range(l.size) if j not in dead.get(l.id, set())] or [0]
            out[l.id] = torch.tensor(keep)
        return out

    lo, hi = 0, len(order)
    while lo < hi:
        mid = (lo + hi) // 2
        if dense / count_flops(apply(model, plan(mid)), shape)[0] >= target:
            hi = mid
        else:
            lo = mid + 1
    return plan(hi)


def measure(model: nn.Module, test, shape, dense_flops: int) -> dict[str, float]:
    flops = count_flops(model, shape)[0]
    return {"top1": evaluate(model, test, device=DEVICE, progress=False)["top1"], "params": count_params(model),
            "flops": flops, "flops_reduction": dense_flops / flops}


def run_case(name: str, target: float, splits, test, *, epochs: int, lr: float, width: float,
             methods: list[str], batch: int, seed: int = 0, floor: float = 0.0,
             temperature: float = 1.0) -> list[dict]:
    """Every method of ``methods`` at one (model, FLOPs target); ``seed`` drives initialisation, batch order
    and exploration alike; ``floor`` > 0 keeps every layer of every CHEX variant at >= floor x the uniform
    density (``chex.min_layer_density``); ``temperature`` is every CHEX variant's
    ``chex.regrowth_temperature``."""
    shape = input_shape(splits.in_channels, splits.input_size)
    torch.manual_seed(seed)
    base = build_model(name, splits, width=width)
    dense_flops = count_flops(base, shape)[0]
    sparsity = sparsity_for_flops(base, target, shape)
    log(f"{name} {target}x: S={sparsity:.3f}")
    rows = []

    def fresh() -> nn.Module:
        torch.manual_seed(seed)
        return build_model(name, splits, width=width)

    def record(method: str, model: nn.Module, t0: float, explorer=None) -> None:
        row = {"model": name, "target": target, "method": method, "seed": seed, **measure(model, test, shape, dense_flops),
               "seconds": time.perf_counter() - t0}
        if explorer is not None:  # regrown channels, and how many of them the next step kept
            steps = explorer.records
            row["regrown"] = sum(r.regrown for r in steps[:-1])
            row["survived"] = sum(r.survived or 0 for r in steps[1:])
            dist = [r.sampling_distance for r in steps if r.sampling_distance is not None]
            row["sampling_distance"] = sum(dist) / len(dist) if dist else 0.0
        log(f"  {method}: {row}")
        rows.append(row)

    ablations = {"chex": {}, "chex_prune_only": {"d0": 0.0}, "chex_random_regrow": {"regrowth": "random"},
                 "chex_zero_reinit": {"reinit": "zero"},
                 "chex_min_density": {"min_layer_density": round(0.5 * (1.0 - sparsity), 3)}}
    for method in methods:
        t0 = time.perf_counter()
        if method in ablations:
            model = fresh()
            floored = {"min_layer_density": round(floor * (1.0 - sparsity), 3)} if floor else {}
            cfg = chex_cfg(epochs, lr, sparsity, target_flops_reduction=target, regrowth_temperature=temperature,
                           **{**floored, **ablations[method]})
            ex, _ = train_chex(model, splits.train, splits.val, cfg=cfg, batch_size=batch, eval_batch_size=1000,
                               seed=seed, device=DEVICE, input_shape=shape, progress=False)
            record(method, compact(model.cpu(), ex.masks), t0, ex)
        elif method == "uniform":
            model = apply(fresh(), uniform_plan(base, sparsity))
            fit(model, splits.train, splits.val, cfg=optim_cfg(lr, epochs), batch_size=batch, eval_batch_size=1000,
                seed=seed, device=DEVICE, checkpoint=scratch(), progress=False)
            record(method, model, t0)
        elif method == "slimming":
            model = fresh()
            lam = SLIMMING_L1.get(name, 1e-4)
            hooks = [model.get_submodule(l.norm).weight.register_hook(
                lambda g, p=model.get_submodule(l.norm).weight: g + lam * torch.sign(p.detach()))
                for l in chex_layers(model) if l.norm]
            sparse_epochs = max(1, round(0.75 * epochs))
            fit(model, splits.train, splits.val, cfg=optim_cfg(lr, sparse_epochs), batch_size=batch,
                eval_batch_size=1000, seed=seed, device=DEVICE, checkpoint=scratch(), progress=False)
            for h in hooks:
                h.remove()
            model = apply(model, slimming_plan(model, target, shape))
            fit(model, splits.train, splits.val, cfg=optim_cfg(lr / 5, max(1, epochs - sparse_epochs)),
                batch_size=batch, eval_batch_size=1000, seed=seed + 1, device=DEVICE,
                checkpoint=scratch(), progress=False)
            record(method, model, t0)
        elif method == "nap_structured":
            model = fresh()
            half = max(1, epochs // 2)
            fit(model, splits.train, splits.val, cfg=optim_cfg(lr, half), batch_size=batch, eval_batch_size=1000,
                seed=seed, device=DEVICE, checkpoint=scratch(), progress=False)

            def factors(m: nn.Module, it: int):
                loader = make_loader(splits.train_plain, batch_size=128, shuffle=True, seed=it)
                return estimate_kfac(m, loader, num_samples=256, seed=it, progress=False)

            pruner = StructuredPruner("nap_per_flop", model, input_shape=shape, step_fraction=0.5,
                                      target_flops_reduction=target, factors_provider=factors)
            it = 0
            while not pruner.reached(model) and it < 10:
                it += 1
                model = pruner(model, it)
                recalibrate_bn(model, make_loader(splits.train, batch_size=128, shuffle=True, seed=it), 10)
            fit(model, splits.train, splits.val, cfg=optim_cfg(lr / 5, max(1, epochs - half)), batch_size=batch,
                eval_batch_size=1000, seed=seed + 1, device=DEVICE, checkpoint=scratch(), progress=False)
            record(method, model, t0)
        else:
            raise ValueError(f"unknown method {method!r}")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: VGG at 2x, 512 samples, 2 epochs")
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--models", nargs="+", default=None)
    ap.add_argument("--targets", nargs="+", type=float, default=None)
    ap.add_argument("--methods", nargs="+", default=["chex", "uniform", "slimming", "nap_structured",
                                                    "chex_prune_only", "chex_random_regrow", "chex_zero_reinit"])
    ap.add_argument("--subset-train", type=int, default=None, help="seeded CIFAR-10 train subset (default: all)")
    ap.add_argument("--subset-test", type=int, default=None, help="seeded CIFAR-10 test subset (default: all)")
    ap.add_argument("--width", type=float, default=None, help="width multiplier of the small models (default 0.25)")
    ap.add_argument("--out", default=None, help="results name (default chex / chex-quick)")
    ap.add_argument("--seed", type=int, default=0, help="initialisation / batch order / exploration seed")
    ap.add_argument("--density-floor", type=float, default=0.0,
                    help="every CHEX variant keeps each layer at >= this fraction of the uniform density")
    ap.add_argument("--regrowth-temperature", type=float, default=1.0,
                    help="every CHEX variant samples regrowth by softmax(eps / T) (1: the paper's rule)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on the shared 2 cores)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.quick:
        models, targets, epochs, n_train, n_test, width = ["vgg16_small"], [2.0], 2, 512, 500, 0.125
    else:
        models, targets, epochs, n_train, n_test, width = ["resnet50_small", "vgg16_small"], [2.0, 4.0], 30, None, None, 0.25
    models, targets = args.models or models, args.targets or targets
    epochs = args.epochs or epochs
    n_train, n_test, width = args.subset_train or n_train, args.subset_test or n_test, args.width or width
    out = args.out or ("chex-quick" if args.quick else "chex")
    splits = load_splits("cifar10", subset_train=n_train, subset_test=n_test)
    test = tensor_batches(splits.test)
    rows = []
    for name in models:
        for target in targets:
            rows += run_case(name, target, splits, test, epochs=epochs, lr=0.05, width=width, methods=args.methods,
                             batch=128, seed=args.seed, floor=args.density_floor,
                             temperature=args.regrowth_temperature)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{out}.json").write_text(json.dumps(rows, indent=1))
    print_table(["model", "target", "method", "top1", "params", "MFLOPs", "FLOPs red.", "regrown kept",
                 "TV from uniform", "s"],
                [[r["model"], f"{r['target']:.0f}x", r["method"], f"{r['top1']:.2f}", r["params"],
                  f"{r['flops'] / 1e6:.2f}", f"{r['flops_reduction']:.2f}",
                  f"{r['survived']}/{r['regrown']}" if r.get("regrown") else "-",
                  f"{r['sampling_distance']:.3f}" if "sampling_distance" in r else "-", f"{r['seconds']:.0f}"]
                 for r in rows],
                title=f"CHEX vs baselines, CIFAR-10 ({n_train or 'all'} train / {n_test or 'all'} test images), "
                      f"width {width}, {epochs} epochs each, seed {args.seed}"
                      + (f", CHEX density floor {args.density_floor} x uniform" if args.density_floor else "")
                      + (f", regrowth temperature {args.regrowth_temperature}"
                         if args.regrowth_temperature != 1 else ""))
    plt = pyplot()
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4), squeeze=False)
    for ax, name in zip(axes[0], models):
        for method in dict.fromkeys(r["method"] for r in rows):
            pts = [(r["flops_reduction"], r["top1"]) for r in rows if r["model"] == name and r["method"] == method]
            ax.plot(*zip(*sorted(pts)), marker="o", label=method)
        ax.set(title=name, xlabel="FLOPs reduction (x)", ylabel="test top-1 (%)")
        ax.legend(fontsize=7)
    print(save_figure(fig, f"{out}.png"))


if __name__ == "__main__":
    main()
