"""Stage 2, curvature: K-FAC factors of every prunable layer of the pretrained model (nap.md s.1).

One estimate is saved as one safetensors file, so any number of pruning runs reuse it.
"""

from __future__ import annotations

import time

import torch
from omegaconf import DictConfig

from napkit.artifacts import load_model
from napkit.curvature import estimate_kfac, save_factors
from napkit.data import make_loader
from napkit.errors import unknown_choice
from napkit.stages.common import load_splits, seed_everything, stage_dir, write_metrics
from napkit.tracking import stage_run
from napkit.training.engine import resolve_device

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def estimate(model: torch.nn.Module, dataset: torch.utils.data.Dataset, cfg: DictConfig, *, seed: int,
             device: torch.device, progress: bool = True) -> dict:
    """Run K-FAC estimation on ``dataset`` with the ``curvature`` config group."""
    c = cfg.curvature
    loader = make_loader(dataset, batch_size=int(c.batch_size), shuffle=True, seed=seed)
    return estimate_kfac(model.to(device), loader, fisher=str(c.fisher), num_samples=int(c.num_samples),
                         chunk_size=int(c.chunk_size), max_dense_dim=int(c.max_dense_dim),
                         dtype=DTYPES[str(c.dtype)], device=device, seed=seed, progress=progress)


def run(cfg: DictConfig) -> dict[str, float]:
    """Estimate the factors on training samples (never validation or test) and save them."""
    seed_everything(int(cfg.seed))
    if str(cfg.curvature.dtype) not in DTYPES:
        raise unknown_choice("curvature.dtype", cfg.curvature.dtype, DTYPES)
    model, spec, _ = load_model(stage_dir(cfg, "pretrain"))
    splits = load_splits(cfg)
    out = stage_dir(cfg, "curvature")
    with stage_run(cfg, "curvature") as tracker:
        t0 = time.perf_counter()
        factors = estimate(model, splits.train_plain, cfg, seed=int(cfg.seed), device=resolve_device(cfg.device))
        seconds = time.perf_counter() - t0
        save_factors(out / "factors.safetensors", factors,
                     {"model": spec.name, "fisher": str(cfg.curvature.fisher), "seed": int(cfg.seed)})
        n = min(f.num_samples for f in factors.values())
        metrics = {"seconds": seconds, "num_samples": n, "layers": len(factors)}
        write_metrics(out, metrics)
        tracker.log_metrics(metrics)
    return metrics
