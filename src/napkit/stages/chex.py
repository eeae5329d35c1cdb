"""CHEX stages (docs/chex.md): ``chex_train`` -> ``chex_compact`` -> ``chex_evaluate``.

They form a second DVC pipeline (``chex/dvc.yaml``, run with ``dvc repro chex/dvc.yaml``) beside
napkit's NAP pipeline and need no pretrained model. Outputs live under ``<artifacts>/chex/``:

- ``train``: the masked model (full architecture, pruned channels exactly zero),
  ``channel_masks.safetensors`` (one uint8 vector per prunable layer), ``explorations.csv`` (one
  row per exploration step), ``history.csv`` and ``metrics.json``.
- ``compact``: the physically compacted model (``ModelSpec.channels``), checked to give the
  masked model's outputs (float64, eval mode), ``layers.csv`` and ``metrics.json``.
- ``evaluate``: test top-1/top-5, params, FLOPs and their reductions against the uncompressed
  architecture (``ModelSpec.build()`` without channels), like napkit's evaluate stage.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import torch
from omegaconf import DictConfig

from napkit.artifacts import ModelSpec, load_model, save_model
from napkit.chex.explorer import compact, sparsity_for_flops
from napkit.chex.masks import ChannelMasks, chex_layers
from napkit.chex.trainer import train_chex
from napkit.data import make_loader
from napkit.errors import NapkitError
from napkit.evaluation.cost import compare_to_dense, cost_summary, input_shape
from napkit.evaluation.plots import plot_layer_ratios
from napkit.io import load_tensors, save_tensors
from napkit.stages.common import (
    checkpoint_path,
    load_splits,
    model_spec,
    seed_everything,
    stage_dir,
    write_csv,
    write_metrics,
)
from napkit.tracking import stage_run
from napkit.training.engine import evaluate as evaluate_model
from napkit.training.engine import resolve_device

STAGES = ("chex_train", "chex_compact", "chex_evaluate")
CHANNEL_MASKS = "channel_masks.safetensors"


def chex_dir(cfg: DictConfig, stage: str) -> Path:
    """``<artifacts>/chex/<train|compact|evaluate>`` (what dvc.yaml declares; content addressed in sweeps)."""
    return stage_dir(cfg, stage)


def chex_checkpoint(cfg: DictConfig) -> Path:
    """Resume checkpoint beside, not inside, the DVC outputs."""
    return checkpoint_path(cfg, "chex_train")


def resolve_sparsity(cfg: DictConfig, spec: ModelSpec) -> float:
    """``chex.S``, or the S that reaches ``chex.target_flops_reduction`` (bisection, [ours])."""
    target = cfg.chex.get("target_flops_reduction")
    if target is None:
        return float(cfg.chex.S)
    shape = input_shape(spec.in_channels, spec.input_size)
    return sparsity_for_flops(spec.build(), float(target), shape, min_channels=int(cfg.chex.get("min_channels", 1)))


def train(cfg: DictConfig) -> dict[str, float]:
    """Train from scratch with channel exploration; write the masked model and the exploration log."""
    seed_everything(int(cfg.seed))
    splits = load_splits(cfg)
    spec = model_spec(cfg, splits)
    model = spec.build()
    sparsity = resolve_sparsity(cfg, spec)
    out = chex_dir(cfg, "chex_train")
    t0 = time.perf_counter()
    with stage_run(cfg, "chex_train") as tracker:
        def on_step(rec) -> None:
            tracker.log_metrics({"sparsity": rec.sparsity, "density": rec.density, "regrown": rec.regrown,
                                 "kept": rec.kept, "regrow_factor": rec.regrow_factor,
                                 **({"survived": rec.survived} if rec.survived is not None else {}),
                                 **({"sampling_distance": rec.sampling_distance}
                                    if rec.sampling_distance is not None else {})},
                                step=rec.epoch)
            tracker.log_metrics(rec.channels, step=rec.epoch, prefix="chex_train/channels/")

        explorer, history = train_chex(
            model, splits.train, splits.val, cfg=cfg.chex, batch_size=int(cfg.data.batch_size),
            eval_batch_size=int(cfg.data.eval_batch_size), seed=int(cfg.seed), device=resolve_device(cfg.device),
            checkpoint=chex_checkpoint(cfg), sparsity=sparsity,
            input_shape=input_shape(spec.in_channels, spec.input_size),
            on_epoch=lambda epoch, row: tracker.log_metrics(row, step=epoch), on_step=on_step, desc="chex")
        model.cpu()
        explorer.masks.apply_(model)
        save_model(out, model, spec)
        save_tensors(out / CHANNEL_MASKS, explorer.masks.to_tensors())
        write_csv(out / "explorations.csv", [r.row() for r in explorer.records])
        if history:
            write_csv(out / "history.csv", history)
        last = history[-1] if history else {}
        survived = [r.survived for r in explorer.records if r.survived is not None]
        metrics = {"val_top1": last.get("val_top1", 0.0), "val_top5": last.get("val_top5", 0.0),
                   "val_loss": last.get("val_loss", 0.0), "epochs": len(history),
                   # the S of the last exploration (with a FLOPs target each step finds its own)
                   "sparsity": explorer.records[-1].sparsity if explorer.records else sparsity,
                   "density": explorer.masks.density(), "explorations": len(explorer.records),
                   "regrown_total": sum(r.regrown for r in explorer.records),
                   "survived_total": sum(survived), "seconds": time.perf_counter() - t0}
        write_metrics(out, metrics)
        tracker.log_metrics(metrics)
        tracker.log_artifact(out)
    return metrics


def load_masked(in_dir: Path):
    """The masked model, its spec and its channel masks from a ``chex_train`` folder."""
    model, spec, _ = load_model(in_dir)
    path = in_dir / CHANNEL_MASKS
    if not path.is_file():
        raise NapkitError(f"missing file {path}; run chex_train first")
    masks = ChannelMasks.from_tensors(chex_layers(model), load_tensors(path))
    masks.apply_(model)
    return model, spec, masks


@torch.no_grad()
def max_output_difference(a: torch.nn.Module, b: torch.nn.Module, x: torch.Tensor) -> float:
    """max |a(x) - b(x)| in float64, eval mode (copies; the models are left untouched)."""
    a64, b64 = copy.deepcopy(a).double().eval(), copy.deepcopy(b).double().eval()
    return float((a64(x.double()) - b64(x.double())).abs().max())


def compact_stage(cfg: DictConfig) -> dict[str, float]:
    """Physically remove the pruned channels; check the compact model's outputs equal the masked one's."""
    seed_everything(int(cfg.seed))
    model, spec, masks = load_masked(chex_dir(cfg, "chex_train"))
    small = compact(model, masks)
    spec_small = spec.with_channels_of(small)
    splits = load_splits(cfg)
    x = next(iter(make_loader(splits.test, batch_size=min(64, int(cfg.data.eval_batch_size)), shuffle=False,
                              seed=0)))[0]
    diff = max_output_difference(model, small, x)
    tol = float(cfg.chex.get("compact_tolerance", 1e-6))
    if not diff <= tol:
        raise NapkitError(f"the compact model's outputs differ from the masked model's by {diff:.3g} (> {tol})")
    out = chex_dir(cfg, "chex_compact")
    shape = input_shape(spec.in_channels, spec.input_size)
    with stage_run(cfg, "chex_compact") as tracker:
        save_model(out, small, spec_small)
        dense_counts = {l.id: l.size for l in masks.layers}
        rows = [{"layer": lid, "channels": n, "dense_channels": dense_counts[lid], "density": n / dense_counts[lid]}
                for lid, n in masks.counts().items()]
        write_csv(out / "layers.csv", rows)
        plot_layer_ratios({r["layer"]: r["density"] for r in rows}, out / "layer_ratios.png",
                          title=f"{spec.name}: CHEX kept channels per layer")
        cost, cost_masked = cost_summary(small, shape), cost_summary(model, shape)
        metrics = {"params": cost["params"], "flops": cost["flops"], "params_masked": cost_masked["params"],
                   "flops_masked": cost_masked["flops"], "max_abs_diff": diff, "density": masks.density()}
        write_metrics(out, metrics)
        tracker.log_metrics(metrics)
        tracker.log_artifact(out)
    return metrics


def evaluate_stage(cfg: DictConfig) -> dict[str, float]:
    """Test accuracy, params and FLOPs of the compact model against the uncompressed architecture."""
    seed_everything(int(cfg.seed))
    model, spec, _ = load_model(chex_dir(cfg, "chex_compact"))
    dense = ModelSpec(spec.name, spec.num_classes, spec.in_channels, spec.input_size, dict(spec.kwargs)).build()
    splits = load_splits(cfg)
    device = resolve_device(cfg.device)
    loader = make_loader(splits.test, batch_size=int(cfg.data.eval_batch_size), shuffle=False, seed=0)
    shape = input_shape(spec.in_channels, spec.input_size)
    out = chex_dir(cfg, "chex_evaluate")
    with stage_run(cfg, "chex_evaluate") as tracker:
        test = evaluate_model(model.to(device), loader, device=device, desc="test")
        model.cpu()
        e = cfg.get("evaluate") or {}
        metrics = {"top1": test["top1"], "top5": test["top5"], "loss": test["loss"],
                   **compare_to_dense(model, dense, shape, latency_repeats=int(e.get("latency_repeats", 0))
                                      if e.get("latency", False) else None)}
        dense_counts = spec.channels or {}
        full = {l.producer: l.size for l in chex_layers(dense)}
        rows = [{"layer": p, "channels": dense_counts.get(p, n), "dense_channels": n,
                 "density": dense_counts.get(p, n) / n} for p, n in full.items()]
        write_csv(out / "layers.csv", rows)
        plot_layer_ratios({r["layer"]: r["density"] for r in rows}, out / "layer_ratios.png",
                          title=f"{spec.name}: CHEX kept channels per layer")
        write_metrics(out, metrics)
        tracker.log_metrics(metrics)
        tracker.log_artifact(out)
    return metrics


RUNNERS = {"chex_train": train, "chex_compact": compact_stage, "chex_evaluate": evaluate_stage}


def run(cfg: DictConfig, stage: str = "chex_train") -> dict[str, float]:
    """Run one CHEX stage by name."""
    if stage not in RUNNERS:
        raise NapkitError(f"unknown CHEX stage {stage!r}; valid: {', '.join(RUNNERS)}")
    return RUNNERS[stage](cfg)

