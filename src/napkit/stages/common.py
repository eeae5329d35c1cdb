"""What every stage needs: its folders, the data splits, the model spec, seeding, summaries."""

from __future__ import annotations

import csv
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from napkit.artifacts import ModelSpec
from napkit.data import DataSplits, create_splits
from napkit.io import write_json, write_with

_LOADER_KEYS = ("batch_size", "eval_batch_size")


def stage_dir(cfg: DictConfig, stage: str) -> Path:
    """``<paths.artifacts>/<stage>``: the stage's DVC output folder."""
    return Path(cfg.paths.artifacts) / stage


def checkpoint_path(cfg: DictConfig, stage: str) -> Path:
    """Resume checkpoints live beside, not inside, the DVC outputs (DVC clears outputs on rerun)."""
    return Path(cfg.paths.artifacts) / "checkpoints" / f"{stage}.pt"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def load_splits(cfg: DictConfig) -> DataSplits:
    """Build the configured dataset's train/val/test splits (batch sizes are loader settings)."""
    kwargs = OmegaConf.to_container(cfg.data, resolve=True)
    assert isinstance(kwargs, dict)
    for key in _LOADER_KEYS:
        kwargs.pop(key, None)
    return create_splits(**kwargs, seed=int(cfg.seed))


def model_spec(cfg: DictConfig, splits: DataSplits) -> ModelSpec:
    """The configured model, shaped for the dataset."""
    kwargs = OmegaConf.to_container(cfg.model, resolve=True)
    assert isinstance(kwargs, dict)
    name = kwargs.pop("name")
    return ModelSpec(name=name, num_classes=splits.num_classes, in_channels=splits.in_channels,
                     input_size=splits.input_size, kwargs=kwargs)


def write_csv(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    """Atomically write rows (dicts with the same keys) as CSV, e.g. for ``dvc plots``."""
    def writer(tmp: Path) -> None:
        with tmp.open("w", newline="") as fh:
            out = csv.DictWriter(fh, fieldnames=list(rows[0]) if rows else [])
            out.writeheader()
            out.writerows(rows)

    write_with(path, writer)


def write_metrics(out_dir: Path, metrics: dict[str, float]) -> Path:
    """The stage's metrics.json (read by ``dvc metrics show`` and by later stages)."""
    return write_json(out_dir / "metrics.json", {k: metrics[k] for k in sorted(metrics)})
