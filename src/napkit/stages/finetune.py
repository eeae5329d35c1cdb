"""Stage 4, finetune: the final, longer fine-tune of the pruned model with its masks held fixed."""

from __future__ import annotations

import time

from omegaconf import DictConfig

from napkit.artifacts import MASKS, MODEL_JSON, MODEL_WEIGHTS, load_model, save_model
from napkit.data import make_loader
from napkit.distributed import world
from napkit.hashing import file_digest
from napkit.stages.common import (
    checkpoint_path,
    load_splits,
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
    """Fine-tune ``artifacts/prune``'s model and write ``artifacts/finetune``."""
    seed_everything(int(cfg.seed))
    model, spec, masks = load_model(stage_dir(cfg, "prune"))
    splits = load_splits(cfg)
    out = stage_dir(cfg, "finetune")
    # resume only from a checkpoint of this config AND this pruned model (a rerun prune stage invalidates it)
    src = stage_dir(cfg, "prune")
    run_key = f"{stage_key(cfg, 'finetune')}-{file_digest(src / MODEL_JSON, src / MODEL_WEIGHTS, src / MASKS)}"
    t0 = time.perf_counter()
    device = resolve_device(cfg.device)
    # one-shot (post-training) pruning fine-tunes nothing: the stage passes the pruned model through
    epochs = 0 if cfg.prune.get("one_shot", False) else cfg.finetune.epochs
    with stage_run(cfg, "finetune") as tracker:
        history = fit(model, splits.train, splits.val, cfg=cfg.finetune, masks=masks, epochs=epochs,
                      batch_size=int(cfg.data.batch_size), eval_batch_size=int(cfg.data.eval_batch_size),
                      seed=int(cfg.seed), device=device,
                      checkpoint=checkpoint_path(cfg, "finetune"), run_key=run_key,
                      on_epoch=lambda epoch, row: tracker.log_metrics(row, step=epoch), desc="finetune")
        if history:
            last = {k.removeprefix("val_"): v for k, v in history[-1].items()}
        else:  # nothing trained: measure the model as it is
            val_loader = make_loader(splits.val, batch_size=int(cfg.data.eval_batch_size), shuffle=False, seed=0)
            last = evaluate(model, val_loader, device=device, desc="finetune val")
        model.cpu()
        metrics = {"val_top1": last["top1"], "val_top5": last["top5"], "epochs": len(history),
                   "seconds": time.perf_counter() - t0}
        if world().is_main:
            save_model(out, model, spec, masks)
            write_csv(out / "history.csv", history)
            write_metrics(out, metrics)
        tracker.log_metrics(metrics)
        tracker.log_artifact(out)
    return metrics
