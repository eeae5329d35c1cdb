"""Does removing channels buy real CPU speed? Latency vs FLOPs reduction of channel-pruned VGG16 / ResNet-50.

ImageNet-shaped torchvision models (random init: latency does not depend on the weights), pruned in one
step with the L1-filter score and uniform allocation to about 2x and 4x fewer FLOPs. Latency at batch 1
and 64 under ``torch.inference_mode`` with 2 threads; dense and pruned models run alternately in one
process so load changes hit all of them alike; the median of ``--repeats`` runs (batch 64 of VGG16 at
224x224 takes seconds per run, so few repeats and no warm-up round there). Prints a table and, last,
``latency_over_flops=<min over rows of speed-up / FLOPs reduction>`` (1.0 = latency falls as fast as FLOPs).

    python benchmarks/speedup.py [--models vgg16 resnet50] [--targets 2 4] [--repeats 10 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from napkit.models import create_model
from napkit.structured import StructuredPruner

SHAPE = (1, 3, 224, 224)
BATCHES = (1, 64)


def prune_to(dense: nn.Module, target: float) -> tuple[nn.Module, float]:
    """The dense model pruned uniformly (L1 filters) to ``target``x fewer FLOPs, and the reduction reached."""
    pruner = StructuredPruner("l1", dense, input_shape=SHAPE, step_fraction=1.0,
                              target_flops_reduction=target, allocation="uniform")
    pruned = pruner(dense, 1).eval()
    return pruned, pruner.measure(pruned)["flops_reduction"]


@torch.inference_mode()
def latencies(models: list[nn.Module], batch: int, repeats: int, warmup: int) -> list[float]:
    """Median milliseconds per forward of each model over ``repeats`` rounds that run every model once."""
    x = torch.randn(batch, *SHAPE[1:])
    times: list[list[float]] = [[] for _ in models]
    for _ in range(warmup):
        for model in models:
            model(x)
    for _ in range(repeats):
        for model, out in zip(models, times):
            t0 = time.perf_counter()
            model(x)
            out.append(1000.0 * (time.perf_counter() - t0))
    return [statistics.median(t) for t in times]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["vgg16", "resnet50"])
    parser.add_argument("--targets", nargs="+", type=float, default=[2.0, 4.0])
    parser.add_argument("--repeats", nargs=2, type=int, default=[10, 3], metavar=("BATCH1", "BATCH64"))
    args = parser.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    header = f"{'model':<9} {'target':>6} {'flops_red':>9} {'batch':>5} {'dense_ms':>10} {'pruned_ms':>10} " \
             f"{'speedup':>7} {'speedup/flops_red':>17}"
    print(header)
    ratios = []
    for name in args.models:
        dense = create_model(name, num_classes=1000, in_channels=3, input_size=SHAPE[-1]).eval()
        pruned = [prune_to(dense, t) for t in args.targets]
        for batch, repeats in zip(BATCHES, args.repeats):
            # batch 64 runs take seconds: no warm-up round (batch 1 ran first); the median absorbs the first
            ms = latencies([dense] + [m for m, _ in pruned], batch, repeats, warmup=int(batch == 1))
            for target, (_, reduction), pruned_ms in zip(args.targets, pruned, ms[1:]):
                speedup = ms[0] / pruned_ms
                ratios.append(speedup / reduction)
                print(f"{name:<9} {target:>5.1f}x {reduction:>8.2f}x {batch:>5} {ms[0]:>10.1f} "
                      f"{pruned_ms:>10.1f} {speedup:>6.2f}x {ratios[-1]:>17.2f}", flush=True)
    print(f"repeats: batch 1 median of {args.repeats[0]}, batch 64 median of {args.repeats[1]}; "
          f"{torch.get_num_threads()} threads")
    print(f"latency_over_flops={min(ratios):.3f}")


if __name__ == "__main__":
    main()
