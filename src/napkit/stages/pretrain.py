"""Stage 1, pretrain: train the dense model on the training split, validate on the held-out split."""

from __future__ import annotations

import time
from dataclasses import replace

from omegaconf import DictConfig

from napkit.artifacts import save_model
from napkit.data import make_loader
from napkit.distributed import world
from napkit.stages.common import (
    checkpoint_path,
    load_splits,
    model_spec,
    seed_everything,
    stage_dir,
    stage_key,
    write_csv,
    write_metrics,
)
from napkit.tracking import stage_run
from napkit.training.engine import evaluate, resolve_device
from napkit.training.trainer import fit


def run(cfg: DictConfig) -> dict[str, float]:
    """Train from scratch (or from torchvision's ``pretrained`` weights) and write ``artifacts/pretrain``.

    With ``model.weights`` (a user's trained weights: a file, or a torchvision weights name) nothing is
    trained: the weights are imported, checked, and measured on the validation split. The saved
    description leaves ``weights`` out (``model.safetensors`` holds them), so later stages rebuild the
    architecture alone.
    """
    seed_everything(int(cfg.seed))
    splits = load_splits(cfg)
    spec = model_spec(cfg, splits)
    model = spec.build()
    imported = cfg.model.get("weights") is not None
    spec = replace(spec, kwargs={k: v for k, v in spec.kwargs.items() if k != "weights"})
    out = stage_dir(cfg, "pretrain")
    t0 = time.perf_counter()
    with stage_run(cfg, "pretrain") as tracker:
        history = fit(model, splits.train, splits.val, cfg=cfg.train, epochs=0 if imported else None,
                      batch_size=int(cfg.data.batch_size),
                      eval_batch_size=int(cfg.data.eval_batch_size), seed=int(cfg.seed),
                      device=resolve_device(cfg.device), checkpoint=checkpoint_path(cfg, "pretrain"),
                      run_key=stage_key(cfg, "pretrain"),
                      on_epoch=lambda epoch, row: tracker.log_metrics(row, step=epoch), desc="pretrain")
        if history:
            last = {k.removeprefix("val_"): v for k, v in history[-1].items()}
        else:  # imported weights: measured, not trained
            last = evaluate(model, make_loader(splits.val, batch_size=int(cfg.data.eval_batch_size), shuffle=False,
                                               seed=0), device=resolve_device(cfg.device), desc="pretrain val")
        model.cpu()
        metrics = {"val_top1": last["top1"], "val_top5": last["top5"], "val_loss": last["loss"],
                   "epochs": len(history), "imported_weights": float(imported),
                   "params": sum(p.numel() for p in model.parameters()),
                   "seconds": time.perf_counter() - t0}
        if world().is_main:
            save_model(out, model, spec)
            write_csv(out / "history.csv", history)
            write_metrics(out, metrics)
        tracker.log_metrics(metrics)
        tracker.log_artifact(out)
    return metrics
