"""Stage 3, prune: the iterative loop with the configured criterion, from the pretrained model.

Iteration 1 scores with the curvature stage's factors (estimated on the dense model); later
iterations re-estimate them on the pruned model when ``prune.recompute_curvature`` is set.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from omegaconf import DictConfig
from torch import nn

from napkit.artifacts import load_model, save_model
from napkit.curvature import KFACFactors, load_factors
from napkit.data import DataSplits, make_loader
from napkit.evaluation.plots import plot_layer_ratios, plot_prune_path
from napkit.pruning.fine_grained import FineGrainedPruner, target_sparsity
from napkit.pruning.importance import create_importance
from napkit.pruning.loop import IterationRecord, LoopResult, iterative_prune
from napkit.pruning.masks import MaskSet
from napkit.stages.common import (checkpoint_path, load_splits, seed_everything, stage_dir, write_csv,
                                  write_metrics)
from napkit.stages.curvature import estimate
from napkit.tracking import StageTracker, stage_run
from napkit.tracking.mlflow_run import pipeline_id
from napkit.training.engine import evaluate, resolve_device
from napkit.training.trainer import fit


def _criterion_kwargs(cfg: DictConfig) -> dict:
    p = cfg.prune
    if str(p.method).startswith("nap"):
        return {"damping": float(p.damping)}
    if p.method == "random":
        return {"seed": int(cfg.seed)}
    return {}


def _factors_provider(cfg: DictConfig, splits: DataSplits, device):
    """Factors for iteration k: the stage artifact first, re-estimated on the pruned model later."""
    cache: dict[str, dict[str, KFACFactors]] = {}

    def provide(model: nn.Module, iteration: int) -> dict[str, KFACFactors]:
        if iteration == 1 or not cfg.prune.recompute_curvature:
            if "stage" not in cache:
                cache["stage"], _ = load_factors(stage_dir(cfg, "curvature") / "factors.safetensors", model)
            return cache["stage"]
        return estimate(model, splits.train_plain, cfg, seed=int(cfg.seed) + iteration, device=device,
                        progress=False)

    return provide


def _log_record(tracker: StageTracker, rec: IterationRecord) -> None:
    tracker.log_metrics({"sparsity": rec.sparsity, "compression": rec.compression, "val_top1": rec.val_top1,
                         "val_loss": rec.val_loss}, step=rec.iteration)
    tracker.log_metrics({n: d for n, d in rec.layer_density.items()}, step=rec.iteration, prefix="prune/density/")


def write_outputs(out: Path, result: LoopResult, masks: MaskSet, tolerance: float) -> dict[str, float]:
    """Iteration table, per-layer table, the two plots, and the stage metrics."""
    rows = [{k: v for k, v in asdict(r).items() if k != "layer_density"} for r in result.records]
    write_csv(out / "iterations.csv", rows)
    density = masks.layer_density()
    sizes = {n: m.numel() for n, m in masks.masks.items()}
    write_csv(out / "layers.csv", [{"layer": n, "weights": sizes[n], "kept": round(density[n] * sizes[n]),
                                     "density": density[n], "sparsity": 1 - density[n]} for n in density])
    plot_layer_ratios(density, out / "layer_ratios.png")
    plot_prune_path([r.compression for r in result.records], [r.val_top1 for r in result.records],
                    result.records[0].val_top1, tolerance, out / "prune_path.png", kept=result.best_iteration)
    best = result.best
    return {"sparsity": best.sparsity, "compression": best.compression, "val_top1": best.val_top1,
            "val_top1_dense": result.records[0].val_top1, "iterations": len(result.records) - 1,
            "kept_iteration": result.best_iteration, "stopped_at_target": float(result.stop_reason == "target")}


def run(cfg: DictConfig) -> dict[str, float]:
    """Prune the pretrained model iteratively and write ``artifacts/prune``."""
    seed_everything(int(cfg.seed))
    p = cfg.prune
    target = target_sparsity(p.get("target_sparsity"), p.get("target_compression"))
    criterion = create_importance(str(p.method), **_criterion_kwargs(cfg))
    model, spec, masks = load_model(stage_dir(cfg, "pretrain"))
    masks = masks or MaskSet.dense(model)
    splits = load_splits(cfg)
    device = resolve_device(cfg.device)
    model.to(device)
    pruner = FineGrainedPruner(criterion, step_fraction=float(p.step_fraction), target=target,
                               allocation=str(p.allocation), max_layer_sparsity=float(p.max_layer_sparsity),
                               compensate=bool(p.compensate), damping=float(p.get("damping", 0.1)),
                               factors=_factors_provider(cfg, splits, device))
    val_loader = make_loader(splits.val, batch_size=int(cfg.data.eval_batch_size), shuffle=False, seed=0)
    batch = int(cfg.data.batch_size)

    def finetune(m: nn.Module, mk: MaskSet, it: int) -> None:
        seed_everything(int(cfg.seed) + it)
        fit(m, splits.train, splits.val, cfg=cfg.finetune, epochs=int(p.finetune_epochs), masks=mk,
            batch_size=batch, eval_batch_size=int(cfg.data.eval_batch_size), seed=int(cfg.seed) + it,
            device=device, checkpoint=checkpoint_path(cfg, f"prune_iter{it}"), desc=f"prune {it} finetune")

    out = stage_dir(cfg, "prune")
    with stage_run(cfg, "prune") as tracker:
        masks, result = iterative_prune(
            model, masks, step=pruner, finetune=finetune, target_reached=pruner.reached,
            validate=lambda m: evaluate(m, val_loader, device=device, desc="prune val"),
            tolerance=float(p.tolerance), max_iterations=int(p.max_iterations),
            checkpoint=checkpoint_path(cfg, "prune_loop"),
            fingerprint=pipeline_id(cfg),
            on_record=lambda rec: _log_record(tracker, rec))
        model.cpu()
        save_model(out, model, spec, masks)
        metrics = write_outputs(out, result, masks, float(p.tolerance))
        write_metrics(out, metrics)
        tracker.log_metrics(metrics)
        tracker.set_tags({"napkit.prune.stop_reason": result.stop_reason})
        tracker.log_artifact(out)
    return metrics
