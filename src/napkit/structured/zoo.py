"""Zoo check: does structured pruning cover torchvision's classifiers?

For each builder name (``torchvision.models.list_models(module=torchvision.models)``, 80 of them),
build the model with random weights at a small input, prune it in one uniform (or global) L1 (or NAP,
``--criterion nap``) step to ``target``x fewer FLOPs with :class:`~napkit.structured.pruner.StructuredPruner`,
run the pruned model and measure the FLOPs it reached. ``python -m napkit.structured.zoo [--models ...]`` prints one row
per model and, last, ``zoo_ok=<n>/<m>``; ``--timm resnet18,efficientnet_b0`` checks those timm models
instead (random weights, built through napkit's ``model=timm`` path; timm is an optional extra). When
Torch-Pruning (``torch_pruning``) is installed, each row also shows the FLOPs reduction its L1
``MetaPruner`` reaches on the same model (same allocation, classifier output kept, stepped until the
target), and ``tp_ok=<n>/<m>`` comes before the last line.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import re
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
import torchvision
from torch import nn

from napkit.curvature import LayersNotRunWarning, estimate_kfac
from napkit.models import create_model
from napkit.structured.attention import prunable_attention
from napkit.structured.groups import UnprunedLayersWarning
from napkit.structured.pruner import FactorsProvider, StructuredPruner, count_flops
from napkit.structured.surgery import recalibrate_bn

NUM_CLASSES = 1000
INPUT_SIZE = 64  # small enough for a CPU, large enough for every torchvision classifier but these:
_SIZES = {"inception_v3": 96, "maxvit_t": 224} | {  # Swin pads every stage to whole 7x7 windows
    f"swin_{v}": 224 for v in ("t", "s", "b", "v2_t", "v2_s", "v2_b")}
_PATCH = {"vit_b_16": 16, "vit_b_32": 32, "vit_l_16": 16, "vit_l_32": 32, "vit_h_14": 14}
_TIMM_PATCH = re.compile(r"patch(\d+)")  # timm's ViT / DeiT / Swin names carry their patch size


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
    tp_flops_reduction: float | None = None  # Torch-Pruning's, when it ran
    tp_error: str = ""


def torchvision_models() -> list[str]:
    """Every classifier builder of ``torchvision.models``."""
    return torchvision.models.list_models(module=torchvision.models)


def build(name: str) -> tuple[nn.Module, int]:
    """Randomly initialised torchvision classifier ``name`` and the input size it runs at."""
    if name in _PATCH:  # ViTs take their image size as an argument; keep a 2x2 patch grid
        size = 2 * _PATCH[name]
        return prunable_attention(torchvision.models.get_model(name, weights=None, image_size=size)), size
    size = _SIZES.get(name, INPUT_SIZE)
    kwargs = {"input_size": (size, size)} if name == "maxvit_t" else {}
    return prunable_attention(torchvision.models.get_model(name, weights=None, **kwargs)), size


def build_timm(name: str) -> tuple[nn.Module, int]:
    """Randomly initialised timm model ``name`` and its input size, through napkit's builder path (what
    ``model=timm model.model_name=<name>`` builds; a ViT or Swin gets ``img_size`` from it). ViT / DeiT
    run at a 2x2 patch grid like torchvision's, Swin at 64 px with 4x4 windows (no padding)."""
    size = INPUT_SIZE
    kwargs: dict[str, Any] = {}
    patch = _TIMM_PATCH.search(name)
    if patch and name.startswith("swin"):
        kwargs = {"window_size": 4}
    elif patch:
        size = 2 * int(patch.group(1))
    return create_model("timm.create_model", num_classes=NUM_CLASSES, in_channels=3, input_size=size,
                        model_name=name, pretrained=False, **kwargs), size


def num_params(name: str) -> int:
    """Parameter count from torchvision's weight metadata (no download), for ordering runs by size."""
    weights = torchvision.models.get_model_weights(name)
    return int(next(iter(weights)).meta.get("num_params", 0))


def curvature_on_noise(model: nn.Module, size: int, samples: int = 8) -> FactorsProvider:
    """K-FAC factors of a randomly initialised ``model`` on Gaussian inputs and random labels, as a provider.

    The empirical Fisher with random labels: a random model's softmax can be saturated (Inception v3), and
    labels drawn from it would make every gradient vanish. Zero-initialised layers are re-drawn first for
    the same reason: a Linear head (ViT) gets small random weights, a residual branch's last BatchNorm
    (timm's ResNets and RegNets) scale 1; and BatchNorm statistics are estimated on the noise, else
    activations grow with depth until an SE block's sigmoid saturates (EfficientNet-B4 to B7). Layers
    that never run as modules get no factors (their warning is silenced: the table counts them).
    """
    for m in model.modules():
        if isinstance(m, nn.Linear) and not m.weight.any():
            nn.init.normal_(m.weight, std=0.01)
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None and not m.weight.any():
            nn.init.ones_(m.weight)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(samples, 3, size, size, generator=gen)
    y = torch.randint(0, NUM_CLASSES, (samples,), generator=gen)
    recalibrate_bn(model, [(x, y)], 1)  # eval-mode BatchNorm with fresh statistics normalises nothing
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LayersNotRunWarning)
        factors = estimate_kfac(model, [(x, y)], fisher="empirical", num_samples=samples, progress=False)
    return lambda m, iteration: factors


def check_model(
    name: str, *, target: float = 2.0, allocation: str = "uniform", tolerance: float = 0.95,
    ignore: Sequence[str] = (), torch_pruning: bool = False, criterion: str = "l1",
    builder: Callable[[str], tuple[nn.Module, int]] = build,
) -> ZooRow:
    """Prune model ``name`` (torchvision's; ``builder=build_timm``: timm's) to ``target``x fewer FLOPs in
    one step and run it.

    ``criterion="nap"`` ranks channels by NAP's K-FAC scores (factors from :func:`curvature_on_noise`) and
    refits the consumers, as the pipeline does; ``"l1"`` by filter norms.
    """
    start = time.perf_counter()
    size, params = 0, 0
    try:
        torch.manual_seed(0)
        model, size = builder(name)
        model.eval()
        params = sum(p.numel() for p in model.parameters())
        shape = (1, 3, size, size)
        provider = curvature_on_noise(model, size) if criterion == "nap" else None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UnprunedLayersWarning)  # counted in the table instead
            pruner = StructuredPruner(criterion, model, input_shape=shape, step_fraction=1.0,
                                      target_flops_reduction=target, allocation=allocation, ignore=ignore,
                                      factors_provider=provider)
        pruned = pruner(model, 0)
        with torch.no_grad():
            out = pruned(torch.randn(shape))
        if tuple(out.shape) != (1, NUM_CLASSES):
            raise RuntimeError(f"pruned model returns shape {tuple(out.shape)}")
        dense_flops = count_flops(model, shape)[0]
        flops = dense_flops / count_flops(pruned, shape)[0]
        p_red = params / sum(p.numel() for p in pruned.parameters())
        row = ZooRow(name, flops >= tolerance * target, size, params, flops, p_red, len(pruner.unpruned),
                     time.perf_counter() - start)
        if torch_pruning:
            row = _with_torch_pruning(row, model, shape, target, allocation)
        return row
    except Exception as exc:  # noqa: BLE001 -- one model's failure is a row of the table, not the end of the run
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return ZooRow(name, False, size, params, 0.0, 0.0, 0, time.perf_counter() - start,
                      f"{type(exc).__name__}: {first[:200]}")


def torch_pruning_available() -> bool:
    return importlib.util.find_spec("torch_pruning") is not None


def _with_torch_pruning(row: ZooRow, model: nn.Module, shape: tuple[int, ...], target: float,
                        allocation: str, steps: int = 30) -> ZooRow:
    """``row`` with the FLOPs reduction Torch-Pruning's L1 MetaPruner reaches, stepping its pruning
    ratio up to 0.9 in ``steps`` steps until ``target`` (or the error it raised)."""
    import torch_pruning as tp

    try:
        model = copy.deepcopy(model)
        x = torch.randn(shape)
        head = [m for m in model.modules() if isinstance(m, nn.Linear) and m.out_features == NUM_CLASSES]
        pruner = tp.pruner.MetaPruner(model, x, importance=tp.importance.MagnitudeImportance(p=1),
                                      pruning_ratio=0.9, iterative_steps=steps, ignored_layers=head,
                                      global_pruning=allocation == "global")
        dense, reached = count_flops(model, shape)[0], 1.0
        for _ in range(steps):
            pruner.step()
            reached = dense / count_flops(model, shape)[0]
            if reached >= target:
                break
        with torch.no_grad():
            model.eval()(x)
        return replace(row, tp_flops_reduction=reached)
    except Exception as exc:  # noqa: BLE001 -- Torch-Pruning's failure is a cell of the table
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return replace(row, tp_error=f"{type(exc).__name__}: {first[:80]}")


def format_row(row: ZooRow, torch_pruning: bool = False) -> str:
    status = "ok" if row.ok else "FAIL"
    tp = ""
    if torch_pruning:
        tp = f"{row.tp_flops_reduction:>7.2f}x " if row.tp_flops_reduction is not None else f"{'err':>8} "
    errors = "; ".join(e for e in (row.error, row.tp_error and f"TP {row.tp_error}") if e)
    return (f"{row.name:<28} {status:<4} {row.input_size:>4} {row.params / 1e6:>8.1f}M "
            f"{row.flops_reduction:>6.2f}x {row.params_reduction:>6.2f}x {row.unpruned:>5} {tp}"
            f"{row.seconds:>7.1f}s  {errors}")


def header(torch_pruning: bool = False) -> str:
    tp = f" {'TP flops':>8}" if torch_pruning else ""
    return f"{'model':<28} {'ok':<4} {'px':>4} {'params':>9} {'flops':>7} {'params':>7} {'unpr':>5}{tp} {'time':>8}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m napkit.structured.zoo", description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", help="torchvision builder names (default: all 80)")
    parser.add_argument("--timm", nargs="+", default=[], metavar="NAME[,NAME...]",
                        help="timm model names instead (e.g. resnet18,efficientnet_b0,vit_tiny_patch16_224)")
    parser.add_argument("--target", type=float, default=2.0, help="FLOPs reduction factor (default 2)")
    parser.add_argument("--allocation", default="uniform", choices=("uniform", "global"))
    parser.add_argument("--criterion", default="l1", choices=("l1", "nap"),
                        help="channel scores: L1 filter norms, or NAP's K-FAC OBS (factors on noise inputs)")
    parser.add_argument("--max-params", type=float, default=None, help="skip models above this many millions")
    parser.add_argument("--no-torch-pruning", action="store_true", help="skip the Torch-Pruning column")
    args = parser.parse_args(argv)
    tp = torch_pruning_available() and not args.no_torch_pruning
    timm_names = [n for arg in args.timm for n in arg.split(",") if n]
    names = args.models or ([] if timm_names else sorted(torchvision_models(), key=num_params))
    if args.max_params is not None:
        names = [n for n in names if num_params(n) <= args.max_params * 1e6]
    runs = [(n, build) for n in names] + [(n, build_timm) for n in timm_names]
    print(header(tp), flush=True)
    rows = []
    for name, builder in runs:
        rows.append(check_model(name, target=args.target, allocation=args.allocation, torch_pruning=tp,
                                criterion=args.criterion, builder=builder))
        print(format_row(rows[-1], tp), flush=True)
    if tp:
        reached = sum((r.tp_flops_reduction or 0.0) >= 0.95 * args.target for r in rows)
        print(f"tp_ok={reached}/{len(rows)}")
    print(f"zoo_ok={sum(r.ok for r in rows)}/{len(rows)}")
    return 0 if all(r.ok for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
