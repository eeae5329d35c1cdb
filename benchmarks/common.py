"""Shared helpers of the measurement scripts (saliency): real data, a cached dense model, tables and plots.

The pruning figures do not use this: they come from experiment presets (``benchmarks/figure.py``).
Everything here drives the library (``napkit.data``, ``napkit.training``); dense weights are cached
under ``.cache/bench/`` keyed by every setting that shapes them (git-ignored).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch import nn

from napkit.data import DataSplits, create_splits
from napkit.models import create_model
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
