"""Stage 3, prune: the iterative loop with the configured criterion, from the pretrained model.

``prune.mode=fine_grained`` prunes single weights (masks); ``prune.mode=structured`` removes
channels physically (the ``prune.structured`` block sets its schedule and FLOPs/params target).
Iteration 1 scores with the curvature stage's factors (estimated on the dense model); later
iterations re-estimate them on the pruned model when ``prune.recompute_curvature`` is set.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch import nn

from napkit.artifacts import MASKS, MODEL_WEIGHTS, ModelSpec, load_model, save_model
from napkit.curvature import KFACFactors, load_factors
from napkit.data import DataSplits, make_loader
from napkit.distributed import world
from napkit.errors import unknown_choice
from napkit.evaluation.cost import input_shape
from napkit.evaluation.plots import plot_layer_ratios, plot_prune_path
from napkit.hashing import file_digest
from napkit.io import read_json, write_json
from napkit.pruning.fine_grained import FineGrainedPruner, target_sparsity
from napkit.pruning.importance import Importance, create_importance
from napkit.pruning.loop import IterationRecord, IterativePruner, LoopResult
from napkit.pruning.masks import MaskSet
from napkit.stages.common import (
    checkpoint_path,
    load_splits,
    seed_everything,
    stage_dir,
    write_csv,
    write_metrics,
)
from napkit.stages.curvature import estimate
from napkit.structured import ChannelImportance, channel_importance_class
from napkit.structured.latency import LatencyTable
from napkit.structured.pruner import StructuredPruner
from napkit.structured.surgery import channel_counts, recalibrate_bn, slim_to
from napkit.tracking import StageTracker, stage_run
from napkit.tracking.mlflow_run import pipeline_id
from napkit.training.engine import evaluate, resolve_device
from napkit.training.trainer import fit

MODES = ("fine_grained", "structured")
FACTORS = "factors.safetensors"
FactorsProvider = Callable[[nn.Module, int], dict[str, KFACFactors]]


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


def _weight_criterion(cfg: DictConfig) -> Importance:
    """The fine-grained criterion ``prune.method`` names, with its settings."""
    p = cfg.prune
    kwargs = {"damping": float(p.damping)} if str(p.method).startswith("nap") else {}
    if p.method == "random":
        kwargs = {"seed": int(cfg.seed)}
    return create_importance(str(p.method), **kwargs)


def _channel_criterion(cfg: DictConfig) -> ChannelImportance:
    """The channel criterion ``prune.method`` names (``nap`` ranks per FLOP when ``structured.per_flop``
    and no latency table divides it instead), with its settings."""
    p = cfg.prune
    per_flop = p.structured.per_flop and p.structured.get("latency_batch") is None
    method = "nap_per_flop" if p.method == "nap" and per_flop else str(p.method)
    cls = channel_importance_class(method)
    if cls.needs_curvature:
        return cls(damping=float(p.get("damping", 0.1)))  # type: ignore[call-arg]
    return cls(seed=int(cfg.seed)) if method == "random" else cls()  # type: ignore[call-arg]


def _fine_grained(cfg: DictConfig, provider: FactorsProvider) -> dict:
    """Loop parts for weight pruning with masks."""
    p = cfg.prune
    pruner = FineGrainedPruner(_weight_criterion(cfg), step_fraction=float(p.step_fraction),
                               target=target_sparsity(p.get("target_sparsity"), p.get("target_compression")),
                               allocation=str(p.allocation), max_layer_sparsity=float(p.max_layer_sparsity),
                               compensate=bool(p.compensate), damping=float(p.get("damping", 0.1)),
                               factors=provider)
    return {"step": pruner, "measure": pruner.measure, "reached": pruner.reached}


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


def _structured(cfg: DictConfig, dense: nn.Module, spec: ModelSpec, splits: DataSplits,
                provider: FactorsProvider, device: torch.device, latency: LatencyTable | None = None) -> dict:
    """Loop parts for channel pruning: physical removal, then BatchNorm recalibration; ranked per
    millisecond by ``latency`` when given."""
    p, s = cfg.prune, cfg.prune.structured
    pruner = StructuredPruner(_channel_criterion(cfg), dense, input_shape=input_shape(spec.in_channels, spec.input_size),
                              step_fraction=float(s.step_fraction),
                              target_flops_reduction=s.get("target_flops_reduction"),
                              target_params_reduction=s.get("target_params_reduction"),
                              allocation=str(p.allocation), max_group_sparsity=float(s.max_group_sparsity),
                              round_to=int(s.get("round_to", 1)), factors_provider=provider, latency=latency,
                              remove_blocks=bool(s.get("remove_blocks", False)))

    def step(model: nn.Module, masks: MaskSet | None, it: int) -> tuple[nn.Module, None]:
        smaller = pruner(model.cpu(), it).to(device)
        # the augmented split, as in training: the weights were fitted to BatchNorm statistics of augmented
        # batches, and plain-image statistics alone cost a dense CIFAR-10 VGG 1.9 points of top-1
        loader = make_loader(splits.train, batch_size=int(cfg.data.batch_size), shuffle=True,
                             seed=int(cfg.seed) + it)
        recalibrate_bn(smaller, ((x.to(device), y) for x, y in loader), int(s.bn_recalibration_batches))
        return smaller, None

    def density(model: nn.Module, masks: MaskSet | None) -> dict[str, float]:
        return pruner.density(model.cpu())

    def measure(model: nn.Module, masks: MaskSet | None) -> dict[str, float]:
        cpu = model.cpu()
        table = {"latency_table_ms": latency.model_ms(cpu)} if latency is not None else {}
        return _float({**pruner.measure(cpu), **table})

    return {"step": step, "measure": measure,
            "reached": lambda m, k: pruner.reached(m.cpu()), "density": density,
            "describe": channel_counts, "rebuild": lambda counts: slim_to(spec.build(), counts).to(device)}


def _float(d: dict) -> dict[str, float]:
    return {k: float(v) for k, v in d.items()}


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
    """Prune the pretrained model iteratively and write ``artifacts/prune``."""
    seed_everything(int(cfg.seed))
    p = cfg.prune
    mode = str(p.get("mode", "fine_grained"))
    if mode not in MODES:
        raise unknown_choice("prune.mode", mode, MODES)
    if mode == "structured":  # bad names fail before any long work
        _channel_criterion(cfg)
    else:
        _weight_criterion(cfg)
    model, spec, masks = load_model(stage_dir(cfg, "pretrain"))
    splits = load_splits(cfg)
    device = resolve_device(cfg.device)
    provider = _factors_provider(cfg, splits, device)
    # resume only from checkpoints of this config AND these input files (a rerun upstream stage invalidates them)
    dense, factors = stage_dir(cfg, "pretrain"), stage_dir(cfg, "curvature") / FACTORS
    key = f"{pipeline_id(cfg)}-{file_digest(dense / MODEL_WEIGHTS, dense / MASKS, factors)}"
    table = None
    if mode == "structured":
        if p.structured.get("latency_batch") is not None:
            table = latency_table(cfg, model, spec, key)
        parts, masks = _structured(cfg, model, spec, splits, provider, device, latency=table), None
        tolerance = float(p.structured.tolerance)
    else:
        parts, masks = _fine_grained(cfg, provider), masks or MaskSet.dense(model)
        parts["step"].check_reachable(masks)  # an unreachable target fails before any work
        tolerance = float(p.tolerance)
    val_loader = make_loader(splits.val, batch_size=int(cfg.data.eval_batch_size), shuffle=False, seed=0)
    batch = int(cfg.data.batch_size)

    def finetune(m: nn.Module, mk: MaskSet | None, it: int) -> None:
        seed_everything(int(cfg.seed) + it)
        fit(m, splits.train, splits.val, cfg=cfg.finetune, epochs=int(p.finetune_epochs), masks=mk,
            batch_size=batch, eval_batch_size=int(cfg.data.eval_batch_size), seed=int(cfg.seed) + it,
            device=device, checkpoint=checkpoint_path(cfg, f"prune_iter{it}"), run_key=f"{key}-{it}",
            desc=f"prune {it} finetune")

    out = stage_dir(cfg, "prune")
    with stage_run(cfg, "prune") as tracker:
        loop = IterativePruner(finetune=finetune, tolerance=tolerance, max_iterations=int(p.max_iterations),
                               validate=lambda m: evaluate(m, val_loader, device=device, desc="prune val"),
                               on_record=lambda rec: _log_record(tracker, rec), **parts)
        model, masks, result = loop.run(model.to(device), masks, checkpoint=checkpoint_path(cfg, "prune_loop"),
                                        fingerprint=key)
        model.cpu()
        if not world().is_main:  # the other ranks held identical models and masks
            return {}
        save_model(out, model, spec.with_channels_of(model) if mode == "structured" else spec, masks)
        metrics = write_outputs(out, result, result.best.layer_density, tolerance)
        if table is not None:
            write_json(out / "latency_table.json", table.to_json())
        write_metrics(out, metrics)
        tracker.log_metrics(metrics)
        tracker.log_metrics(dict(result.best.layer_density), prefix="prune/density/")  # the kept layer ratios
        tracker.set_tags({"napkit.prune.stop_reason": result.stop_reason, "napkit.prune.mode": mode})
        tracker.log_artifact(out)
    return metrics
