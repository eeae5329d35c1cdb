"""Stage 1, pretrain: train the dense model on the training split, validate on the held-out split."""

from __future__ import annotations

import time

from omegaconf import DictConfig

from napkit.artifacts import save_model
from napkit.distributed import world
from napkit.stages.common import (checkpoint_path, load_splits, model_spec, seed_everything, stage_dir, stage_key,
                                  write_csv, write_metrics)
from napkit.tracking import stage_run
from napkit.training.engine import resolve_device
from napkit.training.trainer import fit


def run(cfg: DictConfig) -> dict[str, float]:
    """Train from scratch (or from torchvision weights) and write ``artifacts/pretrain``."""
    seed_everything(int(cfg.seed))
    splits = load_splits(cfg)
    spec = model_spec(cfg, splits)
    model = spec.build()
    out = stage_dir(cfg, "pretrain")
    t0 = time.perf_counter()
    with stage_run(cfg, "pretrain") as tracker:
        history = fit(model, splits.train, splits.val, cfg=cfg.train, batch_size=int(cfg.data.batch_size),
                      eval_batch_size=int(cfg.data.eval_batch_size), seed=int(cfg.seed),
                      device=resolve_device(cfg.device), checkpoint=checkpoint_path(cfg, "pretrain"),
                      run_key=stage_key(cfg, "pretrain"),
                      on_epoch=lambda epoch, row: tracker.log_metrics(row, step=epoch), desc="pretrain")
        model.cpu()
        last = history[-1] if history else {}
        metrics = {"val_top1": last.get("val_top1", 0.0), "val_top5": last.get("val_top5", 0.0),
                   "val_loss": last.get("val_loss", 0.0), "epochs": len(history),
                   "params": sum(p.numel() for p in model.parameters()),
                   "seconds": time.perf_counter() - t0}
        if world().is_main:
            save_model(out, model, spec)
            write_csv(out / "history.csv", history)
            write_metrics(out, metrics)
        tracker.log_metrics(metrics)
        tracker.log_artifact(out)
    return metrics
