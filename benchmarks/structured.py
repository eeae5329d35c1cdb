"""Structured pruning on CIFAR-10: top-1 vs FLOPs reduction for NAP and the channel baselines.

Every method starts from the same dense model and walks the same FLOPs grid (2x, 4x) with the same
schedule (``--step`` of the remaining channels per step, stopping exactly at each grid point), the
same fine-tune budget after each step and the same final fine-tune at each grid point, all with one
learning rate. The tolerance rule is off (every method goes down the whole grid). Prints a table
(test top-1 at each FLOPs reduction, and right after pruning before any fine-tune) and writes a plot.

``nap_per_ms`` ranks NAP per millisecond saved by a latency table of the dense model (``--latency-batch``,
``--threads``, this CPU), the pipeline's ``prune.structured.latency_batch``; with it in ``--methods`` every
row also gets the latency reduction the table predicts. ``nap_depth_ms`` is ``nap_per_ms`` with
``remove_blocks``: a ResNet bottleneck whose inner channels rank out goes whole (its row says how many).

    python benchmarks/structured.py [--models vgg16_small resnet50_small] [--methods ...] [--quick]
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import math
import time

import torch
from torch import nn

from common import (DEVICE, RESULTS, dense_model, load_splits, log, optim_cfg, print_table, pyplot, save_figure,
                    tensor_batches)
from napkit.curvature import estimate_kfac
from napkit.data import make_loader
from napkit.pruning.loop import IterativePruner
from napkit.structured import StructuredPruner, create_channel_importance
from napkit.structured.blocks import skipped_blocks
from napkit.structured.latency import LatencyTable
from napkit.structured.surgery import recalibrate_bn
from napkit.training.engine import evaluate, train_one_epoch
from napkit.training.trainer import fit

LATENCY_METHODS = ("nap_per_ms", "nap_depth_ms")
HIT = 0.02  # a FLOPs reduction within 2% of a grid point counts as that point (then the next is aimed at)
METHODS = {  # name: (channel importance, allocation)
    "nap": ("nap", "global"),
    "nap_per_flop": ("nap_per_flop", "global"),
    "nap_per_ms": ("nap", "global"),  # divided by the latency table's saving (prune.structured.latency_batch)
    "nap_depth_ms": ("nap", "global"),  # the same, whole bottlenecks removable (prune.structured.remove_blocks)
    "l1_uniform": ("l1", "uniform"),
    "l1_global": ("l1", "global"),
    "slimming": ("bn_gamma", "global"),
    "random": ("random", "global"),
}


def run_method(method: str, dense: nn.Module, splits, test, grid: list[float], args,
               table: LatencyTable | None) -> list[dict]:
    """Prune a copy of ``dense`` down the FLOPs grid; one row per grid point, with the latency
    ``table`` predicts for the pruned model when there is one (``nap_per_ms`` ranks by it)."""
    importance, allocation = METHODS[method]
    model = copy.deepcopy(dense)
    shape = (1, splits.in_channels, splits.input_size, splits.input_size)

    def factors(m: nn.Module, it: int):
        loader = make_loader(splits.train_plain, batch_size=128, shuffle=True, seed=it)
        return estimate_kfac(m, loader, num_samples=args.kfac_samples, seed=it, progress=False)

    criterion = create_channel_importance("random", seed=0) if importance == "random" else importance
    pruner = StructuredPruner(criterion, dense, input_shape=shape, step_fraction=args.step, allocation=allocation,
                              target_flops_reduction=grid[-1], factors_provider=factors, damping=args.damping,
                              latency=table if method in LATENCY_METHODS else None,
                              remove_blocks=method == "nap_depth_ms")
    n_batches = max(1, round(args.ft_fraction * len(splits.train) / args.batch))
    rows, pre = [], {}

    def step(m: nn.Module, _mk, it: int):
        reached = pruner.measure(m)["flops_reduction"]
        pruner.target = ("flops", next((g for g in grid if g > reached * (1 + HIT)), grid[-1]))
        m = pruner(m, it)
        recalibrate_bn(m, make_loader(splits.train, batch_size=args.batch, shuffle=True, seed=it), 20)
        pre[it] = evaluate(m, test, device=DEVICE, progress=False)["top1"]
        return m, None

    def finetune(m: nn.Module, _mk, it: int) -> None:
        torch.manual_seed(it)
        opt = torch.optim.SGD(m.parameters(), lr=args.lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
        loader = make_loader(splits.train, batch_size=args.batch, shuffle=True, seed=it)
        train_one_epoch(m, itertools.islice(loader, n_batches), opt, device=DEVICE, progress=False)

    def on_record(rec) -> None:
        red = rec.measures["flops_reduction"]
        hit = next((g for g in grid if abs(red - g) / g < HIT), None)
        if rec.iteration == 0 or hit is None:
            return
        final = copy.deepcopy(current["model"])
        fit(final, splits.train, splits.val, cfg=optim_cfg(args.lr, args.final_epochs), batch_size=args.batch,
            eval_batch_size=1000, seed=0, device=DEVICE, checkpoint=RESULTS / "runs" / f"structured-{method}.pt",
            progress=False)
        (RESULTS / "runs" / f"structured-{method}.pt").unlink(missing_ok=True)
        top1 = evaluate(final, test, device=DEVICE, progress=False)["top1"]
        rows.append({"method": method, "target": hit, "flops_reduction": red,
                     "params_reduction": rec.measures["params_reduction"], "pre_ft_top1": pre[rec.iteration],
                     "top1": top1, "blocks_removed": len(skipped_blocks(final)), **({"table_ms": table.model_ms(final)} if table is not None else {})})
        log(f"  {method}: {red:.2f}x FLOPs  pre-ft {pre[rec.iteration]:.2f}  final {top1:.2f}  "
            f"blocks removed {len(skipped_blocks(final))}")

    current = {"model": model}

    def step_and_keep(m, mk, it):
        out = step(m, mk, it)
        current["model"] = out[0]
        return out

    loop = IterativePruner(step=step_and_keep, finetune=finetune, measure=lambda m, k: pruner.measure(m),
                           validate=lambda m: evaluate(m, test, device=DEVICE, progress=False),
                           reached=lambda m, k: pruner.measure(m)["flops_reduction"] >= grid[-1] * (1 - HIT),
                           tolerance=math.inf, max_iterations=60, on_record=on_record)
    loop.run(model, None)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["vgg16_small", "resnet50_small"])
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--grid", nargs="+", type=float, default=[2.0, 4.0])
    parser.add_argument("--subset", type=int, default=10000, help="CIFAR-10 training images used (0: all 50k)")
    parser.add_argument("--subset-test", type=int, default=0, help="CIFAR-10 test images used (0: all 10k)")
    parser.add_argument("--out", default=None, help="results name (default structured / structured-quick)")
    parser.add_argument("--dense-epochs", type=int, default=15)
    parser.add_argument("--step", type=float, default=0.2)
    parser.add_argument("--ft-fraction", type=float, default=0.5, help="epochs of fine-tuning after each step")
    parser.add_argument("--final-epochs", type=int, default=3)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--damping", type=float, default=0.1)
    parser.add_argument("--kfac-samples", type=int, default=512)
    parser.add_argument("--latency-batch", type=int, default=1,
                        help="batch size of nap_per_ms's latency table (tiny CIFAR models are overhead-bound at 1)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on the shared 2 cores)")
    parser.add_argument("--quick", action="store_true", help="tiny budget smoke run")
    args = parser.parse_args()
    if args.quick:
        args.subset, args.subset_test, args.dense_epochs, args.final_epochs, args.ft_fraction = 1000, 500, 2, 1, 0.2
    torch.set_num_threads(args.threads)
    widths = {"vgg16_small": 0.25, "resnet50_small": 0.125}
    results = []
    for name in args.models:
        splits = load_splits("cifar10", subset_train=args.subset or None, subset_test=args.subset_test or None)
        test = tensor_batches(splits.test)
        dense = dense_model(name, "cifar10", splits, epochs=args.dense_epochs, lr=0.05, subset_train=args.subset or None,
                            model_kwargs={"width": widths.get(name, 0.25)})
        top1_dense = evaluate(dense, test, device=DEVICE, progress=False)["top1"]
        log(f"{name}: dense test top-1 {top1_dense:.2f}")
        table = None
        if set(LATENCY_METHODS) & set(args.methods):  # at --latency-batch and --threads, on this CPU
            shape = (args.latency_batch, splits.in_channels, splits.input_size, splits.input_size)
            table = LatencyTable.measure(dense, shape, progress=False)
            log(f"{name}: latency table, dense {table.model_ms(dense):.3f} ms at batch {args.latency_batch}")
        for method in args.methods:
            t0 = time.perf_counter()
            for row in run_method(method, dense, splits, test, sorted(args.grid), args, table):
                results.append({"model": name, "dense_top1": top1_dense, "seconds": time.perf_counter() - t0,
                                **row, **({"dense_table_ms": table.model_ms(dense)} if table is not None else {})})
    RESULTS.mkdir(parents=True, exist_ok=True)
    tag = args.out or ("structured-quick" if args.quick else "structured")
    (RESULTS / f"{tag}.json").write_text(json.dumps(results, indent=2))
    print_table(["model", "method", "FLOPs red.", "params red.", "top-1 pre-ft", "top-1", "dense top-1",
                 "table latency red.", "blocks removed"],
                [[r["model"], r["method"], f"{r['flops_reduction']:.2f}x", f"{r['params_reduction']:.2f}x",
                  f"{r['pre_ft_top1']:.2f}", f"{r['top1']:.2f}", f"{r['dense_top1']:.2f}",
                  f"{r['dense_table_ms'] / r['table_ms']:.2f}x" if "table_ms" in r else "-",
                  r.get("blocks_removed", 0)] for r in results],
                title=f"CIFAR-10 ({len(splits.train)} training / {len(splits.test)} test images), test top-1 after the "
                      f"final fine-tune")
    plt = pyplot()
    fig, axes = plt.subplots(1, len(args.models), figsize=(6 * len(args.models), 4), squeeze=False)
    for ax, name in zip(axes[0], args.models):
        for method in args.methods:
            pts = [(r["flops_reduction"], r["top1"]) for r in results if r["model"] == name and r["method"] == method]
            if pts:
                ax.plot(*zip(*pts), "o-", label=method)
        ax.set_title(name)
        ax.set_xlabel("FLOPs reduction (x)")
        ax.set_ylabel("test top-1 (%)")
        ax.grid(alpha=0.3)
        ax.legend()
    print(f"plot: {save_figure(fig, f'{tag}.png')}")
    for name in args.models:
        for target in args.grid:
            by = {r["method"]: r["top1"] for r in results if r["model"] == name and r["target"] == target}
            for nap in ("nap_per_flop", "nap"):  # the pipeline's default (structured.per_flop), then loss only
                if nap in by and "l1_uniform" in by:
                    print(f"{name} {target:g}x: {nap} - l1_uniform = {by[nap] - by['l1_uniform']:+.2f} points")


if __name__ == "__main__":
    main()
