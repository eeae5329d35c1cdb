"""Shared helpers of the pruning benchmarks: real data, a cached dense model, one fair pruning run.

Everything here drives the library (``napkit.curvature``, ``napkit.pruning``, ``napkit.training``);
nothing is reimplemented. Dense weights are cached under ``.cache/bench/`` keyed by every setting
that shapes them, per-run results under ``benchmarks/results/runs/`` (both git-ignored), so a
benchmark killed half way resumes without redoing finished runs.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch import nn

from napkit.curvature import KFACFactors, estimate_kfac
from napkit.data import DataSplits, create_splits, make_loader
from napkit.layers import prunable_layers
from napkit.models import create_model
from napkit.pruning.fine_grained import FineGrainedPruner
from napkit.pruning.importance import create_importance
from napkit.pruning.loop import IterativePruner
from napkit.pruning.masks import MaskSet
from napkit.structured.surgery import recalibrate_bn
from napkit.training.engine import evaluate, train_one_epoch
from napkit.training.trainer import fit

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
ARCHIVES = {"mnist": "mnist-MNIST-raw.tar.gz", "cifar10": "cifar10-jpg-imagefolder.tar.gz"}
TEST_DATA = REPO / ".cache" / "test-data"  # the tests' extraction, reused when present
BENCH_DATA = REPO / ".cache" / "bench-data"
BENCH_CACHE = REPO / ".cache" / "bench"
RESULTS = REPO / "benchmarks" / "results"
DEVICE = torch.device("cpu")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ------------------------------------------------------------------------------------------
# data


def data_root(name: str) -> Path:
    """Extracted copy of the shared archive: the tests' one if present, else extract into .cache/bench-data."""
    archive = SHARED / ARCHIVES[name]
    size = archive.stat().st_size
    for base in (TEST_DATA, BENCH_DATA):
        target = base / f"{name}-{size}"
        if target.is_dir():
            return target
    BENCH_DATA.mkdir(parents=True, exist_ok=True)
    target = BENCH_DATA / f"{name}-{size}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=BENCH_DATA))
    subprocess.run(["tar", "xzf", str(archive), "-C", str(tmp)], check=True)
    try:
        tmp.rename(target)
    except OSError:
        shutil.rmtree(tmp)
    return target


def load_splits(dataset: str, *, subset_train: int | None = None, subset_test: int | None = None,
                seed: int = 0) -> DataSplits:
    """Real MNIST / CIFAR-10 (JPEG ImageFolder copy), 10% of the (subset of the) train set held out as val."""
    root = str(data_root(dataset))
    if dataset == "mnist":
        return create_splits("mnist", seed=seed, root=root, download=False, subset_train=subset_train,
                             subset_test=subset_test)
    if dataset == "cifar10":
        return create_splits("cifar10", seed=seed, root=root, format="imagefolder", download=False,
                             cache_dir=str(BENCH_DATA / "decoded"), subset_train=subset_train,
                             subset_test=subset_test)
    raise ValueError(f"unknown dataset {dataset!r}")


def tensor_batches(dataset, batch_size: int = 1000) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A fixed split materialised once as batches (evaluation runs many times)."""
    return [(x.clone(), y.clone()) for x, y in make_loader(dataset, batch_size=batch_size, shuffle=False, seed=0)]


# ------------------------------------------------------------------------------------------
# dense model, trained once and cached


def _key(*parts: object) -> str:
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def optim_cfg(lr: float, epochs: int, weight_decay: float = 5e-4):
    return OmegaConf.create({
        "epochs": epochs, "label_smoothing": 0.0,
        "optimizer": {"_target_": "torch.optim.SGD", "_partial_": True, "lr": lr, "momentum": 0.9,
                      "nesterov": True, "weight_decay": weight_decay},
        "scheduler": {"_target_": "torch.optim.lr_scheduler.CosineAnnealingLR", "_partial_": True},
    })


def build_model(model_name: str, splits: DataSplits, **model_kwargs) -> nn.Module:
    return create_model(model_name, num_classes=splits.num_classes, in_channels=splits.in_channels,
                        input_size=splits.input_size, **model_kwargs)


def dense_model(model_name: str, dataset: str, splits: DataSplits, *, epochs: int, lr: float,
                subset_train: int | None, model_kwargs: dict | None = None, seed: int = 0,
                batch_size: int = 128) -> nn.Module:
    """The dense model trained with the library's ``fit`` (SGD+Nesterov, cosine), cached by its settings."""
    model_kwargs = model_kwargs or {}
    key = _key(model_name, dataset, epochs, lr, subset_train, model_kwargs, seed, batch_size)
    path = BENCH_CACHE / f"dense-{model_name}-{dataset}-{key}.pt"
    torch.manual_seed(seed)
    model = build_model(model_name, splits, **model_kwargs)
    if path.is_file():
        model.load_state_dict(torch.load(path, weights_only=True))
        log(f"dense {model_name}/{dataset}: loaded {path.name}")
        return model
    BENCH_CACHE.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    fit(model, splits.train, splits.val, cfg=optim_cfg(lr, epochs), batch_size=batch_size, eval_batch_size=1000,
        seed=seed, device=DEVICE, checkpoint=BENCH_CACHE / f"ckpt-{key}.pt", progress=False,
        on_epoch=lambda e, row: log(f"dense {model_name}/{dataset} epoch {e}/{epochs}: "
                                    f"train {row['train_top1']:.2f} val {row['val_top1']:.2f}"))
    torch.save(model.state_dict(), path)
    log(f"dense {model_name}/{dataset}: trained in {time.perf_counter() - t0:.0f}s -> {path.name}")
    return model


# ------------------------------------------------------------------------------------------
# one fair pruning run down a fixed compression grid


METHODS = {  # in the order they run: the main comparison first
    # name: (criterion, allocation, compensate)
    "nap": ("nap", "global", True),
    "magnitude": ("magnitude", "global", False),
    "nap_nocomp": ("nap", "global", False),
    "magnitude_uniform": ("magnitude", "uniform", False),
    "nap_obd": ("nap_obd", "global", False),
    "random": ("random", "global", False),
}


@dataclass
class RunConfig:
    method: str
    seed: int
    grid: Sequence[float]
    step_fraction: float = 0.5  # p: share of the remaining weights pruned per step (never past the next grid point)
    finetune_fraction: float = 0.5  # epochs of fine-tuning after every step (same for every method)
    lr: float = 0.01  # fine-tune LR (SGD+Nesterov, momentum 0.9, wd 5e-4), fresh optimizer per step
    # "cosine": decays from lr to 0 over each step's fine-tune, as the pipeline's loop fine-tunes do (a
    # constant LR stops mid-SGD, where a BatchNorm net sits points below where it would settle)
    lr_schedule: str = "cosine"
    bn_recalibration: int = 20  # batches re-estimating BatchNorm statistics right after each pruning step
    # from the AUGMENTED training split, as the dense model's statistics were: statistics of plain images
    # alone cost the dense CIFAR-10 VGG 1.9 points (73.20 -> 71.30), before any weight was pruned
    bn_recalibration_data: str = "train"
    batch_size: int = 128
    damping: float = 0.1
    max_layer_sparsity: float = 0.99
    kfac_samples: int = 1024
    recompute_curvature: bool = True  # re-estimate K-FAC on the pruned model every step (else: dense once)
    compensate: bool | None = None  # None: the method's default (METHODS)
    fisher: str = "true"
    a_max_positions: int | None = 64  # the curvature stage's default lattice cap for conv A

    def key(self, dense_key: str) -> str:
        return _key(dense_key, asdict(self))


@dataclass
class StepResult:
    compression: float
    pre_ft_top1: float  # test top-1 right after pruning (and the OBS update), before fine-tuning
    top1: float  # test top-1 after the step's fine-tune
    layer_density: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0


def prune_run(dense: nn.Module, splits: DataSplits, test_batches, cfg: RunConfig,
              progress: Callable[[str], None] = log) -> list[StepResult]:
    """Prune a copy of ``dense`` with ``cfg.method`` through the library's ``IterativePruner``, evaluating the TEST split.

    Every step removes ``step_fraction`` of the remaining weights but stops at the next grid point, so
    every method visits the same compressions with the same number of steps and fine-tune batches.
    The loop's (``IterativePruner``) tolerance rule is disabled (tolerance = inf): the run always goes down the whole grid.
    """
    import copy

    criterion_name, allocation, compensate = METHODS[cfg.method]
    if cfg.compensate is not None:
        compensate = cfg.compensate
    kwargs: dict = {"damping": cfg.damping} if criterion_name.startswith("nap") else {}
    if criterion_name == "random":
        kwargs = {"seed": cfg.seed}
    criterion = create_importance(criterion_name, **kwargs)
    model = copy.deepcopy(dense).to(DEVICE)
    masks = MaskSet.dense(model)
    cache: dict[str, dict[str, KFACFactors]] = {}

    def factors(m: nn.Module, iteration: int) -> dict[str, KFACFactors]:
        if not cfg.recompute_curvature and "dense" in cache:
            return cache["dense"]
        loader = make_loader(splits.train_plain, batch_size=128, shuffle=True, seed=1000 * cfg.seed + iteration)
        f = estimate_kfac(m, loader, num_samples=cfg.kfac_samples, fisher=cfg.fisher, seed=1000 * cfg.seed + iteration,
                          a_max_positions=cfg.a_max_positions, progress=False)
        cache["dense"] = f
        return f

    grid = sorted(cfg.grid)
    pruner = FineGrainedPruner(criterion, step_fraction=cfg.step_fraction, target=None, allocation=allocation,
                               max_layer_sparsity=cfg.max_layer_sparsity, compensate=compensate,
                               damping=cfg.damping, factors=factors)
    results: list[StepResult] = []
    pre: dict[int, float] = {}
    t_step = [time.perf_counter()]

    def step(m: nn.Module, mk: MaskSet | None, it: int) -> tuple[nn.Module, MaskSet]:
        t_step[0] = time.perf_counter()
        kept, total = mk.counts()
        # the next grid point not yet reached, computed as FineGrainedPruner.amount rounds (1 - (1 - 1/c)) * total:
        # with exact 1/c, float error at c = 12 left 1 weight too many and the next step removed none
        nxt = next(c for c in grid if math.ceil((1.0 - (1.0 - 1.0 / c)) * total) < kept)
        pruner.target = 1.0 - 1.0 / nxt
        amount = pruner.amount(mk)
        m, new = pruner(m, mk, it)
        if cfg.bn_recalibration:  # the pruned weights shift every activation: stale statistics, not the criterion
            recalibrate_bn(m, make_loader(getattr(splits, cfg.bn_recalibration_data), batch_size=cfg.batch_size,
                                          shuffle=True, seed=1000 * cfg.seed + it), cfg.bn_recalibration)
        removed = kept - new.counts()[0]
        if removed < amount:  # caps / one-weight-per-row rule, or non-finite scores: say so
            bad = {n: int((~torch.isfinite(p.weight)).sum()) for n, p in prunable_layers(m).items()}
            progress(f"  WARNING {cfg.method} seed {cfg.seed} step {it}: asked to remove {amount}, removed {removed}; "
                     f"non-finite weights per layer {bad}; layer density "
                     + " ".join(f"{v:.3f}" for v in new.layer_density().values()))
        pre[it] = evaluate(m, test_batches, device=DEVICE, progress=False)["top1"]
        return m, new

    n_batches = max(1, round(cfg.finetune_fraction * len(splits.train) / cfg.batch_size))

    def finetune(m: nn.Module, mk: MaskSet, it: int) -> None:
        torch.manual_seed(1000 * cfg.seed + it)
        opt = torch.optim.SGD(m.parameters(), lr=cfg.lr, momentum=0.9, nesterov=True, weight_decay=5e-4)

        def scheduled(batches, start: int):
            """Set each batch's LR just before the optimizer step that uses it."""
            for i, batch in enumerate(batches, start):
                if cfg.lr_schedule == "cosine":
                    for group in opt.param_groups:
                        group["lr"] = 0.5 * cfg.lr * (1.0 + math.cos(math.pi * i / n_batches))
                yield batch

        done = 0
        epoch = 0
        while done < n_batches:  # n_batches may exceed one epoch
            loader = make_loader(splits.train, batch_size=cfg.batch_size, shuffle=True,
                                 seed=1000 * cfg.seed + it, epoch=epoch)
            take = min(n_batches - done, len(loader))
            train_one_epoch(m, scheduled(itertools.islice(loader, take), done), opt, device=DEVICE, masks=mk,
                            progress=False)
            done += take
            epoch += 1

    def on_record(rec) -> None:
        if rec.iteration == 0:
            return
        r = StepResult(compression=rec.measures["compression"], pre_ft_top1=pre[rec.iteration], top1=rec.val_top1,
                       layer_density=rec.layer_density, seconds=time.perf_counter() - t_step[0])
        results.append(r)
        progress(f"  {cfg.method} seed {cfg.seed}: {r.compression:6.2f}x  pre-ft {r.pre_ft_top1:6.2f}  "
                 f"ft {r.top1:6.2f}  ({r.seconds:.1f}s)")

    loop = IterativePruner(step=step, finetune=finetune,
                           validate=lambda m: evaluate(m, test_batches, device=DEVICE, progress=False),
                           measure=FineGrainedPruner.measure,
                           reached=lambda m, mk: mk.counts()[0] <= math.ceil((1.0 - (1.0 - 1.0 / grid[-1])) * mk.counts()[1]),
                           tolerance=math.inf, max_iterations=10 * len(grid), on_record=on_record)
    loop.run(model, masks)
    return results


def cached_run(dense: nn.Module, dense_key: str, splits: DataSplits, test_batches, cfg: RunConfig,
               tag: str, cached_only: bool = False) -> list[StepResult] | None:
    """``prune_run`` with its result cached as JSON under benchmarks/results/runs/ (None: not cached and
    ``cached_only``)."""
    path = RESULTS / "runs" / f"{tag}-{cfg.method}-s{cfg.seed}-{cfg.key(dense_key)}.json"
    if path.is_file():
        return [StepResult(**r) for r in json.loads(path.read_text())]
    if cached_only:
        return None
    t0 = time.perf_counter()
    res = prune_run(dense, splits, test_batches, cfg)
    log(f"{tag} {cfg.method} seed {cfg.seed}: {time.perf_counter() - t0:.0f}s")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps([asdict(r) for r in res]))
    return res


# ------------------------------------------------------------------------------------------
# output


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]], title: str = "") -> None:
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    if title:
        print(title)
    for i, r in enumerate(cells):
        print("  ".join(c.rjust(w) if j else c.ljust(w) for j, (c, w) in enumerate(zip(r, widths))))
        if i == 0:
            print("  ".join("-" * w for w in widths))
    print(flush=True)


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, name: str) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / name
    fig.savefig(path, dpi=120, bbox_inches="tight")
    pyplot().close(fig)
    return path
