"""Does removing channels buy real CPU speed? Latency vs FLOPs reduction of channel-pruned VGG16 / ResNet-50.

ImageNet-shaped torchvision models (random init: latency does not depend on the weights), pruned to about
2x and 4x fewer FLOPs by two allocations (``--allocations``): ``uniform`` (one step, L1 filters, the same
share of every layer) and ``latency`` (napkit's latency-aware ranking, ``StructuredPruner(latency=...)``: a
table of every layer timed alone on this CPU at batch 1 and the largest ``--threads``; with random weights
every FLOP counts as equally valuable, so it removes first the FLOPs this CPU runs slowest), and ``depth``
(the same, with ``remove_blocks=True``: a ResNet bottleneck whose inner channels rank out goes whole,
taking its layers' per-call cost with it; VGG16 has no blocks, so it equals ``latency`` there). Kept channel
counts are rounded to multiples of ``--round-to`` (default: the CPU's float32 SIMD width, 16 on AVX-512 and 8 on AVX2;
oneDNN's blocked layouts pad channels to it). Each model runs in four forms: ``eager`` (the plain
``nn.Module``), ``frozen`` (TorchScript trace, ``torch.jit.freeze`` + ``torch.jit.optimize_for_inference``:
BatchNorm folded into the convs, weights prepacked), ``compiled`` (``torch.compile`` with Inductor's
freezing: the same folding plus fused elementwise kernels) and ``aot`` (the same Inductor code compiled
ahead of time by AOTInductor into a shared library: no Python or Dynamo guard per call); the last three are
how a CPU deployment runs it.
Latency at batch 1 and 64 under ``torch.inference_mode``; dense and pruned models run alternately in one process so load changes hit
all of them alike; the median of ``--repeats`` runs after one warm-up run. glibc's malloc returns every large block to
the OS on free, so each forward page-faults its activations in again (hundreds of MB per layer for
VGG16 at batch 64): a cost proportional to channels, not FLOPs, that no CPU serving setup pays (they
use jemalloc/tcmalloc). The script re-executes itself with ``MALLOC_MMAP_MAX_=0`` and a huge
``MALLOC_TRIM_THRESHOLD_`` (freed memory stays in the heap) unless ``--system-malloc``.

Every (form, thread count) in ``--threads`` is measured. Prints a table; for each (model, batch) the
(form, threads) that is fastest for the DENSE model is the deployment setting (the baseline at its best,
chosen before looking at the pruned models: a batch-1 server often runs one thread per request, since
small ops do not amortise the threads' synchronisation), and the last line is
``latency_over_flops=<min over those rows of speed-up / FLOPs reduction>`` of the last allocation given
(1.0 = latency falls as fast as FLOPs). Each allocation's minimum, and the minimum at each fixed thread
count, are printed before it.

``--per-layer`` then says where the time goes at batch 1: every Conv2d/Linear of the dense and pruned
models timed on its own (frozen, at the largest ``--threads``), summed by kind (1x1 conv, 3x3 conv, other
conv, linear): each kind's share of the dense FLOPs, its FLOPs and latency reductions and its GFLOP/s, next
to the whole model's (frozen).

    python benchmarks/speedup.py [--models vgg16 resnet50] [--targets 2 4] [--allocations uniform latency depth]
        [--repeats 10 3] [--threads 1 2] [--forms eager frozen compiled] [--per-layer]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable

import torch
from torch import nn

from napkit.evaluation.cost import layer_flops
from napkit.models import create_model
from napkit.structured import ChannelGroup, ScoreInputs, StructuredPruner, saved_flops
from napkit.structured.blocks import bottlenecks, skipped_blocks
from napkit.structured.importance import ChannelImportance
from napkit.structured.latency import LatencyTable, deployment_form, layer_input_shapes

SHAPE = (1, 3, 224, 224)
BATCHES = (1, 64)
ALLOCATIONS = ("uniform", "latency", "depth")
KEEP_FREED_MEMORY = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 40)}


class FlopsValue(ChannelImportance):
    """Every FLOP equally valuable: a channel scores the FLOPs its removal saves. Random weights carry no
    accuracy signal, so divided by the latency table's saving this ranks channels by FLOPs per millisecond:
    the latency-aware allocation removes first the FLOPs this CPU runs slowest."""

    name = "flops_value"

    def __call__(self, model: nn.Module, groups: list[ChannelGroup], inputs: ScoreInputs):
        return {g.id: torch.full((g.size,), saved_flops(model, g, inputs.layer_flops), dtype=torch.float64)
                for g in groups}


def prune_to(dense: nn.Module, target: float, round_to: int, allocation: str,
             table: LatencyTable | None) -> tuple[nn.Module, float]:
    """The dense model pruned to ``target``x fewer FLOPs, and the reduction reached: ``uniform`` removes
    the same share of every layer in one step (L1 filters); ``latency`` removes 5% of the channels per
    step by FLOPs per millisecond saved (``table``), re-reading the table at the new widths each step;
    ``depth`` also lets whole bottlenecks go."""
    if allocation == "uniform":
        pruner = StructuredPruner("l1", dense, input_shape=SHAPE, step_fraction=1.0,
                                  target_flops_reduction=target, allocation="uniform", round_to=round_to)
        pruned = pruner(dense, 1)
    else:
        pruner = StructuredPruner(FlopsValue(), dense, input_shape=SHAPE, step_fraction=0.05,
                                  target_flops_reduction=target, round_to=round_to, latency=table,
                                  remove_blocks=allocation == "depth")
        pruned, it = dense, 0
        while not pruner.reached(pruned):
            it += 1
            pruned = pruner(pruned, it)
    return pruned.eval(), pruner.measure(pruned)["flops_reduction"]


@torch.no_grad()
def compiled(model: nn.Module, x: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """torch.compile (Inductor) with freezing: BatchNorm folded, weights prepacked, and the elementwise ops
    (ReLU, residual add) fused into generated kernels instead of one pass over memory each. Compiled for
    the current thread count and input shape (the first call, in the warm-up)."""
    torch._inductor.config.freezing = True
    return torch.compile(model.eval(), dynamic=False)


@torch.no_grad()
def aot(model: nn.Module, x: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """AOTInductor (``torch.export`` + ``aoti_compile_and_package``, freezing on): the model compiled ahead
    of time into a shared library run from C++, torch's replacement for TorchScript deployment. No Python
    wrapper or Dynamo guards per call, which a batch-1 forward of a pruned model pays proportionally more."""
    torch._inductor.config.freezing = True
    with torch.inference_mode():
        program = torch.export.export(model.eval(), (x,))
    with tempfile.TemporaryDirectory() as tmp:
        package = torch._inductor.aoti_compile_and_package(program, package_path=os.path.join(tmp, "model.pt2"))
        return torch._inductor.aoti_load_package(package)


FORMS: dict[str, Callable[[nn.Module, torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]] = {
    "eager": lambda model, x: model,
    "frozen": deployment_form,
    "compiled": compiled,
    "aot": aot,
}


def simd_channels() -> int:
    """float32 lanes of the CPU's widest vector unit: oneDNN blocks channels by this (nChw16c on AVX-512)."""
    return 16 if torch.backends.cpu.get_cpu_capability().startswith("AVX512") else 8


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


def layer_kind(layer: nn.Module) -> str:
    if isinstance(layer, nn.Linear):
        return "linear"
    k = tuple(layer.kernel_size)
    return f"conv{k[0]}x{k[1]}" if k in ((1, 1), (3, 3)) else "conv other"


def per_layer_report(name: str, dense: nn.Module, pruned: list[tuple[nn.Module, float]], labels: list[str],
                     repeats: int) -> None:
    """Batch-1 time of every Conv2d/Linear alone (frozen), dense vs pruned, summed per kind, and the whole
    model's (frozen): which kinds of layer lose efficiency (GFLOP/s) when they get narrower."""
    x = torch.randn(SHAPE)
    models = [dense] + [m for m, _ in pruned]
    shapes = [layer_input_shapes(m, SHAPE) for m in models]
    flops = [layer_flops(m, SHAPE)[1] for m in models]
    kinds: dict[str, list[list[float]]] = {}  # kind: per model [flops, ms]
    for layer_name in shapes[0]:
        inputs = [torch.randn(s[layer_name]) for s in shapes]
        timed = [deployment_form(nn.Sequential(m.get_submodule(layer_name)), inp) for m, inp in zip(models, inputs)]
        ms = latencies([lambda _x, f=f, inp=inp: f(inp) for f, inp in zip(timed, inputs)], x, repeats)
        acc = kinds.setdefault(layer_kind(dense.get_submodule(layer_name)), [[0.0, 0.0] for _ in models])
        for i, t in enumerate(ms):
            acc[i][0] += flops[i].get(layer_name, 0)
            acc[i][1] += t
    whole = latencies([deployment_form(m, x) for m in models], x, repeats)
    dense_flops = sum(acc[0][0] for acc in kinds.values())
    print(f"\n{name}, batch 1, {torch.get_num_threads()} thread(s), layers timed alone (frozen)")
    print(f"{'pruned':>14} {'kind':<10} {'dense_flops%':>12} {'flops_red':>9} {'dense_ms':>9} {'pruned_ms':>9} "
          f"{'lat_red':>7} {'GF/s dense':>10} {'GF/s pruned':>11}")
    for i, label in enumerate(labels, start=1):
        for kind, acc in kinds.items():
            (fd, td), (fp, tp) = acc[0], acc[i]
            print(f"{label:>14} {kind:<10} {100 * fd / dense_flops:>11.1f}% {fd / fp:>8.2f}x {td:>9.2f} "
                  f"{tp:>9.2f} {td / tp:>6.2f}x {fd / td / 1e6:>10.0f} {fp / tp / 1e6:>11.0f}")
        red = pruned[i - 1][1]
        print(f"{label:>14} {'model':<10} {100.0:>11.1f}% {red:>8.2f}x {whole[0]:>9.2f} {whole[i]:>9.2f} "
              f"{whole[0] / whole[i]:>6.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["vgg16", "resnet50"])
    parser.add_argument("--targets", nargs="+", type=float, default=[2.0, 4.0])
    parser.add_argument("--repeats", nargs=2, type=int, default=[10, 3], metavar=("BATCH1", "BATCH64"))
    parser.add_argument("--round-to", type=int, default=None,
                        help="kept channel counts multiple of this (default: the CPU's float32 SIMD width)")
    parser.add_argument("--allocations", nargs="+", default=list(ALLOCATIONS), choices=list(ALLOCATIONS),
                        help="how the channels to remove are chosen; the last one's minimum is the last line")
    parser.add_argument("--forms", nargs="+", default=list(FORMS), choices=list(FORMS))
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2], help="torch thread counts to measure")
    parser.add_argument("--per-layer", action="store_true",
                        help="also time every conv/linear layer alone at batch 1: where the speed-up is lost")
    parser.add_argument("--system-malloc", action="store_true",
                        help="keep glibc's default malloc (freed activations go back to the OS)")
    args = parser.parse_args()
    if not args.system_malloc and any(os.environ.get(k) != v for k, v in KEEP_FREED_MEMORY.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **KEEP_FREED_MEMORY})
    args.round_to = args.round_to or simd_channels()
    torch.manual_seed(0)
    print(f"{'model':<9} {'alloc':>7} {'target':>6} {'flops_red':>9} {'batch':>5} {'thr':>3} {'form':>8} "
          f"{'dense_ms':>10} {'pruned_ms':>10} {'speedup':>7} {'speedup/flops_red':>17}")
    deployed: dict[str, list[float]] = {a: [] for a in args.allocations}
    per_setting: dict[tuple[str, str, int], list[float]] = {}  # (allocation, form, threads): speedup/flops_red
    for name in args.models:
        dense = create_model(name, num_classes=1000, in_channels=3, input_size=SHAPE[-1]).eval()
        torch.set_num_threads(max(args.threads))
        table = LatencyTable.measure(dense, SHAPE) if {"latency", "depth"} & set(args.allocations) else None
        pruned = [(a, t, *prune_to(dense, t, args.round_to, a, table)) for a in args.allocations for t in args.targets]
        if table is not None:
            print(f"{name:<9} latency table (layers alone, frozen, batch 1, {max(args.threads)} thread(s)): dense "
                  f"{table.model_ms(dense):.1f} ms, " + ", ".join(f"{a} {t:.0f}x {table.model_ms(m):.1f} ms"
                                                            for a, t, m, _ in pruned)
                  + f"; every layer at 1/16 width {table.floor_ms():.1f} ms", flush=True)
        for alloc, target, model, _ in pruned:
            if skipped_blocks(model):
                print(f"{name:<9} {alloc} {target:.0f}x removed {len(skipped_blocks(model))} of "
                      f"{len(bottlenecks(dense))} bottlenecks: {', '.join(skipped_blocks(model))}")
        for batch, repeats in zip(BATCHES, args.repeats):
            x = torch.randn(batch, *SHAPE[1:])
            rows: dict[tuple[str, int], tuple[float, list[tuple[str, float]]]] = {}  # setting: (dense ms, ratios)
            for threads in args.threads:
                torch.set_num_threads(threads)
                for form in args.forms:
                    torch._dynamo.reset()  # compiled forms: fresh kernels for this thread count
                    make = FORMS[form]
                    ms = latencies([make(m, x) for m in [dense] + [p[2] for p in pruned]], x, repeats)
                    ratios = []
                    for (alloc, target, _, reduction), pruned_ms in zip(pruned, ms[1:]):
                        speedup = ms[0] / pruned_ms
                        ratios.append((alloc, speedup / reduction))
                        per_setting.setdefault((alloc, form, threads), []).append(speedup / reduction)
                        print(f"{name:<9} {alloc:>7} {target:>5.1f}x {reduction:>8.2f}x {batch:>5} {threads:>3} "
                              f"{form:>8} {ms[0]:>10.1f} {pruned_ms:>10.1f} {speedup:>6.2f}x "
                              f"{speedup / reduction:>17.2f}", flush=True)
                    rows[(form, threads)] = (ms[0], ratios)
            (form, threads), (dense_ms, ratios) = min(rows.items(), key=lambda kv: kv[1][0])
            print(f"{name:<9} batch {batch}: deployment {form}, {threads} thread(s) (dense {dense_ms:.1f} ms)")
            for alloc, ratio in ratios:
                deployed[alloc].append(ratio)
        if args.per_layer:
            torch.set_num_threads(max(args.threads))
            per_layer_report(name, dense, [(p[2], p[3]) for p in pruned], [f"{p[0]} {p[1]:.0f}x" for p in pruned],
                             args.repeats[0])
    print(f"repeats: batch 1 median of {args.repeats[0]}, batch 64 median of {args.repeats[1]}; "
          f"channel counts multiple of {args.round_to}; malloc "
          f"{'glibc default' if args.system_malloc else 'keeping freed memory (MALLOC_MMAP_MAX_=0)'}")
    for (alloc, form, threads), ratios in per_setting.items():
        print(f"{alloc} allocation, {form} form, {threads} thread(s) everywhere: min speedup/flops_red "
              f"{min(ratios):.3f}")
    for alloc, ratios in deployed.items():
        print(f"{alloc} allocation, deployment settings: min speedup/flops_red {min(ratios):.3f}")
    print(f"latency_over_flops={min(deployed[args.allocations[-1]]):.3f}")

if __name__ == "__main__":
    main()
