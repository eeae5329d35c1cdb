"""What every stage needs: its folders, the data splits, the model spec, seeding, summaries."""

from __future__ import annotations

import csv
import random
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from napkit.artifacts import ModelSpec
from napkit.data import DataSplits, create_splits
from napkit.hashing import fingerprint
from napkit.io import write_json, write_with
from napkit.stages import CHEX_STAGES, STAGE_PARAMS, flow_of

_LOADER_KEYS = ("batch_size", "eval_batch_size")


def stage_key(cfg: DictConfig, stage: str) -> str:
    """Hash of every config key that determines ``stage``'s outputs (its own and its upstream stages')."""
    flow = flow_of(stage)
    keys = [k for s in flow[: flow.index(stage) + 1] for k in STAGE_PARAMS[s]]
    return fingerprint({k: OmegaConf.to_container(cfg[k], resolve=True) if isinstance(cfg[k], DictConfig)
                        else cfg[k] for k in keys})


def stage_dir(cfg: DictConfig, stage: str) -> Path:
    """The stage's output folder: ``<artifacts>/<stage>`` (``<artifacts>/chex/<step>`` for CHEX; DVC's
    outs), or, with ``paths.content_addressed``, that folder plus ``/<key>`` so runs that share a config
    prefix (a sweep over pruning methods) share the pretrain and curvature outputs. The key hashes the
    config sections the stage and its upstream read, plus ``paths.code_version`` and
    ``paths.data_fingerprint`` when set (the chain sets both): new code or new data never hits an old
    folder."""
    base = Path(cfg.paths.artifacts) / (f"chex/{stage.removeprefix('chex_')}" if stage in CHEX_STAGES else stage)
    if not cfg.paths.get("content_addressed", False):
        return base
    extra = [cfg.paths.get(k) for k in ("code_version", "data_fingerprint") if cfg.paths.get(k)]
    return base / (fingerprint(stage_key(cfg, stage), *extra) if extra else stage_key(cfg, stage))


def checkpoint_path(cfg: DictConfig, stage: str) -> Path:
    """Resume checkpoints live beside, not inside, the DVC outputs (DVC clears outputs on rerun)."""
    name = stage if stage in CHEX_STAGES else stage.split("_", 1)[0]  # prune_iter3 / prune_loop: prune
    suffix = f"-{stage_key(cfg, name)}" if cfg.paths.get("content_addressed", False) else ""
    return Path(cfg.paths.artifacts) / "checkpoints" / f"{stage}{suffix}.pt"


def clean_checkpoints(cfg: DictConfig, stage: str) -> list[Path]:
    """Delete ``stage``'s resume state (``checkpoint_path(cfg, stage)`` and ``checkpoint_path(cfg,
    f"{stage}_<part>")`` with any extension) once it completed: it only serves a rerun of a killed
    stage, and is most of a run's disk use. With ``paths.content_addressed`` only this config's
    files go (other sweep jobs share the folder). Returns the deleted files."""
    folder = Path(cfg.paths.artifacts) / "checkpoints"
    if not folder.is_dir():
        return []
    if cfg.paths.get("content_addressed", False):
        suffix = re.escape(f"-{stage_key(cfg, stage)}")
    else:
        suffix = ""
    pattern = re.compile(rf"{re.escape(stage)}(_[A-Za-z0-9]+)?{suffix}\.[A-Za-z]+")
    removed = [p for p in sorted(folder.iterdir()) if p.is_file() and pattern.fullmatch(p.name)]
    for path in removed:
        path.unlink(missing_ok=True)
    return removed


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
    """Atomically write rows as CSV, e.g. for ``dvc plots``: the columns are every key in first-seen
    order (a row without one leaves it empty, e.g. the dense row of a pruning path has no pre-fine-tune
    top-1)."""
    fields = list(dict.fromkeys(k for row in rows for k in row))

    def writer(tmp: Path) -> None:
        with tmp.open("w", newline="") as fh:
            out = csv.DictWriter(fh, fieldnames=fields)
            out.writeheader()
            out.writerows(rows)

    write_with(path, writer)


def write_metrics(out_dir: Path, metrics: dict[str, float]) -> Path:
    """The stage's metrics.json (read by ``dvc metrics show`` and by later stages)."""
    return write_json(out_dir / "metrics.json", {k: metrics[k] for k in sorted(metrics)})
