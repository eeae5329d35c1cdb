"""Does removing channels buy real CPU speed? Latency vs FLOPs reduction of channel-pruned VGG16 / ResNet-50.

ImageNet-shaped torchvision models (random init: latency does not depend on the weights), pruned in one
step with the L1-filter score and uniform allocation to about 2x and 4x fewer FLOPs, kept channel counts
rounded to multiples of ``--round-to`` (8: the AVX2 float32 width; oneDNN's blocked layouts pad to it).
Each model runs in two forms: ``eager`` (the plain ``nn.Module``) and ``frozen`` (TorchScript trace,
``torch.jit.freeze`` + ``torch.jit.optimize_for_inference``: BatchNorm folded into the convs, weights
prepacked, which is how a CPU deployment runs it). Latency at batch 1 and 64 under
``torch.inference_mode``; dense and pruned models run alternately in one process so load changes hit
all of them alike; the median of ``--repeats`` runs after one warm-up run. glibc's malloc returns every large block to
the OS on free, so each forward page-faults its activations in again (hundreds of MB per layer for
VGG16 at batch 64): a cost proportional to channels, not FLOPs, that no CPU serving setup pays (they
use jemalloc/tcmalloc). The script re-executes itself with ``MALLOC_MMAP_MAX_=0`` and a huge
``MALLOC_TRIM_THRESHOLD_`` (freed memory stays in the heap) unless ``--system-malloc``. Prints a table; for each
(model, batch) the form that is faster for the DENSE model is the deployment form (the baseline at its
best, chosen before looking at the pruned models), and the last line is
``latency_over_flops=<min over those rows of speed-up / FLOPs reduction>`` (1.0 = latency falls as fast as FLOPs).

    python benchmarks/speedup.py [--models vgg16 resnet50] [--targets 2 4] [--repeats 10 3] [--round-to 8]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable

import torch
from torch import nn

from napkit.models import create_model
from napkit.structured import StructuredPruner

SHAPE = (1, 3, 224, 224)
BATCHES = (1, 64)
KEEP_FREED_MEMORY = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 40)}


def prune_to(dense: nn.Module, target: float, round_to: int) -> tuple[nn.Module, float]:
    """The dense model pruned uniformly (L1 filters) to ``target``x fewer FLOPs, and the reduction reached."""
    pruner = StructuredPruner("l1", dense, input_shape=SHAPE, step_fraction=1.0,
                              target_flops_reduction=target, allocation="uniform", round_to=round_to)
    pruned = pruner(dense, 1).eval()
    return pruned, pruner.measure(pruned)["flops_reduction"]


@torch.no_grad()
def frozen(model: nn.Module, x: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """TorchScript deployment form: traced, frozen (BatchNorm folded), optimized for CPU inference."""
    return torch.jit.optimize_for_inference(torch.jit.freeze(torch.jit.trace(model.eval(), x)))


FORMS: dict[str, Callable[[nn.Module, torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]] = {
    "eager": lambda model, x: model,
    "frozen": frozen,
}


@torch.inference_mode()
def latencies(models: list[Callable[[torch.Tensor], torch.Tensor]], x: torch.Tensor, repeats: int) -> list[float]:
    """Median milliseconds per forward of each model over ``repeats`` rounds that run every model once."""
    times: list[list[float]] = [[] for _ in models]
    for model in models:  # warm-up: oneDNN builds its kernels for the shape on the first call
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
    parser.add_argument("--round-to", type=int, default=8, help="kept channel counts multiple of this")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--system-malloc", action="store_true",
                        help="keep glibc's default malloc (freed activations go back to the OS)")
    args = parser.parse_args()
    if not args.system_malloc and any(os.environ.get(k) != v for k, v in KEEP_FREED_MEMORY.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **KEEP_FREED_MEMORY})
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"{'model':<9} {'target':>6} {'flops_red':>9} {'batch':>5} {'form':>6} {'dense_ms':>10} "
          f"{'pruned_ms':>10} {'speedup':>7} {'speedup/flops_red':>17}")
    deployed, eager = [], []
    for name in args.models:
        dense = create_model(name, num_classes=1000, in_channels=3, input_size=SHAPE[-1]).eval()
        pruned = [prune_to(dense, t, args.round_to) for t in args.targets]
        for batch, repeats in zip(BATCHES, args.repeats):
            x = torch.randn(batch, *SHAPE[1:])
            rows: dict[str, list[float]] = {}
            for form, make in FORMS.items():
                ms = latencies([make(m, x) for m in [dense] + [m for m, _ in pruned]], x, repeats)
                rows[form] = []
                for target, (_, reduction), pruned_ms in zip(args.targets, pruned, ms[1:]):
                    speedup = ms[0] / pruned_ms
                    rows[form].append(speedup / reduction)
                    print(f"{name:<9} {target:>5.1f}x {reduction:>8.2f}x {batch:>5} {form:>6} {ms[0]:>10.1f} "
                          f"{pruned_ms:>10.1f} {speedup:>6.2f}x {rows[form][-1]:>17.2f}", flush=True)
                rows[form].append(ms[0])  # last: the dense latency, to choose the deployment form
            best = min(rows, key=lambda f: rows[f][-1])
            print(f"{name:<9} batch {batch}: deployment form {best} (dense {rows[best][-1]:.1f} ms)")
            deployed += rows[best][:-1]
            eager += rows["eager"][:-1]
    print(f"repeats: batch 1 median of {args.repeats[0]}, batch 64 median of {args.repeats[1]}; "
          f"{torch.get_num_threads()} threads; channel counts multiple of {args.round_to}; malloc "
          f"{'glibc default' if args.system_malloc else 'keeping freed memory (MALLOC_MMAP_MAX_=0)'}")
    print(f"eager form only: min speedup/flops_red {min(eager):.3f}")
    print(f"latency_over_flops={min(deployed):.3f}")


if __name__ == "__main__":
    main()
