"""Stage 3, prune: the iterative loop with the configured criterion, from the pretrained model.

``prune.mode=fine_grained`` prunes single weights (masks); ``prune.mode=structured`` removes
channels physically (the ``prune.structured`` block sets its schedule and FLOPs/params target).
Iteration 1 scores with the curvature stage's factors (estimated on the dense model); later
iterations re-estimate them on the pruned model when ``prune.recompute_curvature`` is set.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch import nn

from napkit.artifacts import MASKS, MODEL_WEIGHTS, ModelSpec, load_model, save_model
from napkit.curvature import KFACFactors, load_factors
from napkit.curvature.sampling import estimate
from napkit.data import DataSplits
from napkit.distributed import world
from napkit.evaluation.cost import input_shape
from napkit.evaluation.plots import plot_layer_ratios, plot_prune_path
from napkit.hashing import file_digest
from napkit.io import read_json, write_json
from napkit.pruning.loop import IterationRecord, LoopResult
from napkit.pruning.session import FactorsProvider, PruneData, check_settings, run_pruning
from napkit.stages.common import (
    checkpoint_path,
    load_splits,
    seed_everything,
    stage_dir,
    write_csv,
    write_metrics,
)
from napkit.structured.latency import LatencyTable
from napkit.structured.surgery import slim_to
from napkit.tracking import StageTracker, stage_run
from napkit.tracking.mlflow_run import pipeline_id
from napkit.training.engine import resolve_device

FACTORS = "factors.safetensors"


def _factors_provider(cfg: DictConfig, splits: DataSplits, device: torch.device) -> FactorsProvider:
    """Factors for iteration k: the stage artifact first, re-estimated on the pruned model later."""
    cache: dict[str, dict[str, KFACFactors]] = {}

    def provide(model: nn.Module, iteration: int) -> dict[str, KFACFactors]:
        if iteration == 1 or not cfg.prune.get("recompute_curvature", True):
            if "stage" not in cache:
                cache["stage"], _ = load_factors(stage_dir(cfg, "curvature") / FACTORS, model)
            return cache["stage"]
        return estimate(model, splits.train_plain, cfg, seed=int(cfg.seed) + iteration, device=device,
                        progress=False)

    return provide


def latency_table(cfg: DictConfig, dense: nn.Module, spec: ModelSpec, fingerprint: str) -> LatencyTable:
    """The dense model's layer latency table at ``prune.structured.latency_batch``, timed here (on this
    machine's CPU: run the stage where you deploy) once per ``fingerprint``: a resumed run ranks by the
    same timings as the run it continues. Kept beside the checkpoints and copied into the stage output."""
    path = checkpoint_path(cfg, "prune_latency").with_suffix(".json")
    if path.exists():
        saved = read_json(path)
        if saved.get("fingerprint") == fingerprint:
            return LatencyTable.from_json(saved["table"])
    shape = input_shape(spec.in_channels, spec.input_size, batch=int(cfg.prune.structured.latency_batch))
    table = LatencyTable.measure(dense, shape)
    write_json(path, {"fingerprint": fingerprint, "table": table.to_json()})
    return table


def _log_record(tracker: StageTracker, rec: IterationRecord) -> None:
    tracker.log_metrics({"val_top1": rec.val_top1, "val_loss": rec.val_loss, **rec.measures}, step=rec.iteration)
    tracker.log_metrics(dict(rec.layer_density), step=rec.iteration, prefix="prune/density/")


def write_outputs(out: Path, result: LoopResult, density: dict[str, float], tolerance: float) -> dict[str, float]:
    """Iteration table, per-layer table, the two plots, and the stage metrics."""
    rows = [{**{k: v for k, v in asdict(r).items() if k not in ("measures", "layer_density")}, **r.measures}
            for r in result.records]
    write_csv(out / "iterations.csv", rows)
    write_csv(out / "layers.csv", [{"layer": n, "density": d, "sparsity": 1 - d} for n, d in density.items()])
    plot_layer_ratios(density, out / "layer_ratios.png")
    x_key = "compression" if "compression" in result.records[0].measures else "flops_reduction"
    plot_prune_path([r.measures[x_key] for r in result.records], [r.val_top1 for r in result.records],
                    result.records[0].val_top1, tolerance, out / "prune_path.png", kept=result.best_iteration,
                    xlabel=x_key.replace("_", " "))
    best = result.best
    return {**best.measures, "val_top1": best.val_top1, "val_top1_dense": result.records[0].val_top1,
            "iterations": len(result.records) - 1, "kept_iteration": result.best_iteration,
            "stopped_at_target": float(result.stop_reason == "target")}


def run(cfg: DictConfig) -> dict[str, float]:
    """Prune the pretrained model (:func:`napkit.pruning.session.run_pruning`) and write ``artifacts/prune``."""
    seed_everything(int(cfg.seed))
    mode = check_settings(cfg.prune, int(cfg.seed))  # bad names fail before any long work
    model, spec, _ = load_model(stage_dir(cfg, "pretrain"))
    splits = load_splits(cfg)
    device = resolve_device(cfg.device)
    # resume only from checkpoints of this config AND these input files (a rerun upstream stage invalidates them)
    dense, factors = stage_dir(cfg, "pretrain"), stage_dir(cfg, "curvature") / FACTORS
    key = f"{pipeline_id(cfg)}-{file_digest(dense / MODEL_WEIGHTS, dense / MASKS, factors)}"
    table = None
    if mode == "structured" and cfg.prune.structured.get("latency_batch") is not None:
        table = latency_table(cfg, model, spec, key)
    out = stage_dir(cfg, "prune")
    with stage_run(cfg, "prune") as tracker:
        outcome = run_pruning(
            model, PruneData(splits.train, splits.train_plain, splits.val, splits.test), cfg,
            factors=_factors_provider(cfg, splits, device), input_shape=input_shape(spec.in_channels, spec.input_size),
            device=device, checkpoint_for=lambda name: checkpoint_path(cfg, name), fingerprint=key, latency=table,
            rebuild=lambda counts: slim_to(spec.build(), counts), on_record=lambda rec: _log_record(tracker, rec))
        if not world().is_main:  # the other ranks held identical models and masks
            return {}
        model, result = outcome.model, outcome.result
        save_model(out, model, spec.with_channels_of(model) if mode == "structured" else spec, outcome.masks)
        metrics = write_outputs(out, result, result.best.layer_density, outcome.tolerance)
        if table is not None:
            write_json(out / "latency_table.json", table.to_json())
        write_metrics(out, metrics)
        tracker.log_metrics(metrics)
        tracker.log_metrics(dict(result.best.layer_density), prefix="prune/density/")  # the kept layer ratios
        tracker.set_tags({"napkit.prune.stop_reason": result.stop_reason, "napkit.prune.mode": mode})
        tracker.log_artifact(out)
    return metrics
