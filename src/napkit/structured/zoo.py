"""Zoo check: does structured pruning cover torchvision's classifiers?

For each builder name (``torchvision.models.list_models(module=torchvision.models)``, 80 of them),
build the model with random weights at a small input, prune it in one uniform (or global) L1 step to
``target``x fewer FLOPs with :class:`~napkit.structured.pruner.StructuredPruner`, run the pruned model
and measure the FLOPs it reached. ``python -m napkit.structured.zoo [--models ...]`` prints one row
per model and, last, ``zoo_ok=<n>/<m>``.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torchvision
from torch import nn

from napkit.structured.groups import UnprunedLayersWarning
from napkit.structured.pruner import StructuredPruner, count_flops

NUM_CLASSES = 1000
INPUT_SIZE = 64  # small enough for a CPU, large enough for every torchvision classifier but these:
_SIZES = {"inception_v3": 96, "maxvit_t": 224} | {  # Swin pads every stage to whole 7x7 windows
    f"swin_{v}": 224 for v in ("t", "s", "b", "v2_t", "v2_s", "v2_b")}
_PATCH = {"vit_b_16": 16, "vit_b_32": 32, "vit_l_16": 16, "vit_l_32": 32, "vit_h_14": 14}


@dataclass(frozen=True)
class ZooRow:
    """One model's outcome: ``ok`` when the pruned model runs and reached ``tolerance * target``."""

    name: str
    ok: bool
    input_size: int
    params: int
    flops_reduction: float
    params_reduction: float
    unpruned: int  # producers left unpruned by a coupling napkit does not prune through
    seconds: float
    error: str = ""


def torchvision_models() -> list[str]:
    """Every classifier builder of ``torchvision.models``."""
    return torchvision.models.list_models(module=torchvision.models)


def build(name: str) -> tuple[nn.Module, int]:
    """Randomly initialised torchvision classifier ``name`` and the input size it runs at."""
    if name in _PATCH:  # ViTs take their image size as an argument; keep a 2x2 patch grid
        size = 2 * _PATCH[name]
        return torchvision.models.get_model(name, weights=None, image_size=size), size
    size = _SIZES.get(name, INPUT_SIZE)
    kwargs = {"input_size": (size, size)} if name == "maxvit_t" else {}
    return torchvision.models.get_model(name, weights=None, **kwargs), size


def num_params(name: str) -> int:
    """Parameter count from torchvision's weight metadata (no download), for ordering runs by size."""
    weights = torchvision.models.get_model_weights(name)
    return int(next(iter(weights)).meta.get("num_params", 0))


def check_model(
    name: str, *, target: float = 2.0, allocation: str = "uniform", tolerance: float = 0.95,
    ignore: Sequence[str] = (),
) -> ZooRow:
    """Prune torchvision model ``name`` to ``target``x fewer FLOPs in one L1 step and run it."""
    start = time.perf_counter()
    size, params = 0, 0
    try:
        torch.manual_seed(0)
        model, size = build(name)
        model.eval()
        params = sum(p.numel() for p in model.parameters())
        shape = (1, 3, size, size)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UnprunedLayersWarning)  # counted in the table instead
            pruner = StructuredPruner("l1", model, input_shape=shape, step_fraction=1.0,
                                      target_flops_reduction=target, allocation=allocation, ignore=ignore)
        pruned = pruner(model, 0)
        with torch.no_grad():
            out = pruned(torch.randn(shape))
        if tuple(out.shape) != (1, NUM_CLASSES):
            raise RuntimeError(f"pruned model returns shape {tuple(out.shape)}")
        dense_flops = count_flops(model, shape)[0]
        flops = dense_flops / count_flops(pruned, shape)[0]
        p_red = params / sum(p.numel() for p in pruned.parameters())
        return ZooRow(name, flops >= tolerance * target, size, params, flops, p_red, len(pruner.unpruned),
                      time.perf_counter() - start)
    except Exception as exc:  # noqa: BLE001 -- one model's failure is a row of the table, not the end of the run
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return ZooRow(name, False, size, params, 0.0, 0.0, 0, time.perf_counter() - start,
                      f"{type(exc).__name__}: {first[:200]}")


def format_row(row: ZooRow) -> str:
    status = "ok" if row.ok else "FAIL"
    return (f"{row.name:<20} {status:<4} {row.input_size:>4} {row.params / 1e6:>8.1f}M "
            f"{row.flops_reduction:>6.2f}x {row.params_reduction:>6.2f}x {row.unpruned:>5} "
            f"{row.seconds:>7.1f}s  {row.error}")


HEADER = f"{'model':<20} {'ok':<4} {'px':>4} {'params':>9} {'flops':>7} {'params':>7} {'unpr':>5} {'time':>8}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m napkit.structured.zoo", description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", help="torchvision builder names (default: all 80)")
    parser.add_argument("--target", type=float, default=2.0, help="FLOPs reduction factor (default 2)")
    parser.add_argument("--allocation", default="uniform", choices=("uniform", "global"))
    parser.add_argument("--max-params", type=float, default=None, help="skip models above this many millions")
    args = parser.parse_args(argv)
    names = args.models or sorted(torchvision_models(), key=num_params)
    if args.max_params is not None:
        names = [n for n in names if num_params(n) <= args.max_params * 1e6]
    print(HEADER, flush=True)
    rows = []
    for name in names:
        rows.append(check_model(name, target=args.target, allocation=args.allocation))
        print(format_row(rows[-1]), flush=True)
    print(f"zoo_ok={sum(r.ok for r in rows)}/{len(rows)}")
    return 0 if all(r.ok for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
