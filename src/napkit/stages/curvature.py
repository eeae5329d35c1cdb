"""Stage 2, curvature: K-FAC factors of every prunable layer of the pretrained model (nap.md s.1).

One estimate is saved as one safetensors file, so any number of pruning runs reuse it.
"""

from __future__ import annotations

import time

from omegaconf import DictConfig

from napkit.artifacts import load_model
from napkit.curvature import save_factors
from napkit.curvature.sampling import estimate
from napkit.curvature.storage import not_run
from napkit.distributed import world
from napkit.stages.common import load_splits, seed_everything, stage_dir, write_metrics
from napkit.tracking import stage_run
from napkit.training.engine import resolve_device


def run(cfg: DictConfig) -> dict[str, float]:
    """Estimate the factors on training samples (never validation or test) and save them."""
    seed_everything(int(cfg.seed))
    model, spec, _ = load_model(stage_dir(cfg, "pretrain"))
    splits = load_splits(cfg)
    out = stage_dir(cfg, "curvature")
    with stage_run(cfg, "curvature") as tracker:
        t0 = time.perf_counter()
        factors = estimate(model, splits.train_plain, cfg, seed=int(cfg.seed), device=resolve_device(cfg.device))
        seconds = time.perf_counter() - t0
        n = min(f.num_samples for f in factors.values())
        metrics = {"seconds": seconds, "num_samples": n, "layers": len(factors)}
        if world().is_main:
            save_factors(out / "factors.safetensors", factors,
                         {"model": spec.name, "fisher": str(cfg.curvature.fisher), "seed": int(cfg.seed),
                          "not_run": not_run(model, factors)})
            write_metrics(out, metrics)
        tracker.log_metrics(metrics)
    return metrics
