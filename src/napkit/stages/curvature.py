"""Stage 2, curvature: K-FAC factors of every prunable layer of the pretrained model (nap.md s.1).

One estimate is saved as one safetensors file, so any number of pruning runs reuse it.
"""

from __future__ import annotations

import time

import torch
from omegaconf import DictConfig
from torch.utils.data import Dataset

from napkit.artifacts import load_model
from napkit.curvature import KFACFactors, all_reduce_factors, estimate_kfac, save_factors
from napkit.data import make_loader
from napkit.distributed import world
from napkit.errors import unknown_choice
from napkit.stages.common import load_splits, seed_everything, stage_dir, write_metrics
from napkit.tracking import stage_run
from napkit.training.engine import resolve_device

DTYPES = {"float32": torch.float32, "float64": torch.float64}


class CurvatureSamples(Dataset):
    """The examples the curvature is estimated on, each with its own uniform for label sampling.

    The subset and the uniforms depend only on the seed; rank r of W reads positions r, r+W, ...
    so the all-reduced data-parallel estimate equals the single-process one on the same samples.
    """

    def __init__(self, dataset: Dataset, num_samples: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        gen = torch.Generator().manual_seed(seed)
        n = min(num_samples, len(dataset))  # type: ignore[arg-type]
        self.dataset = dataset
        self.indices = torch.randperm(len(dataset), generator=gen)[:n]  # type: ignore[arg-type]
        self.uniforms = torch.rand(n, generator=gen, dtype=torch.float64)
        self.positions = torch.arange(rank, n, world_size)

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, torch.Tensor]:
        pos = int(self.positions[i])
        x, y = self.dataset[int(self.indices[pos])]
        return x, y, self.uniforms[pos]


def estimate(model: torch.nn.Module, dataset: Dataset, cfg: DictConfig, *, seed: int,
             device: torch.device, progress: bool = True) -> dict[str, KFACFactors]:
    """K-FAC factors with the ``curvature`` config group; sharded and all-reduced under torchrun."""
    c = cfg.curvature
    if str(c.dtype) not in DTYPES:
        raise unknown_choice("curvature.dtype", c.dtype, DTYPES)
    w = world()
    samples = CurvatureSamples(dataset, int(c.num_samples), seed, w.rank, w.world_size)
    loader = make_loader(samples, batch_size=int(c.batch_size), shuffle=False, seed=seed)
    factors = estimate_kfac(model.to(device), loader, fisher=str(c.fisher), num_samples=len(samples),
                            chunk_size=int(c.chunk_size), max_dense_dim=int(c.max_dense_dim),
                            a_max_positions=None if c.a_max_positions is None else int(c.a_max_positions),
                            dtype=DTYPES[str(c.dtype)], device=device, seed=seed, progress=progress and w.is_main)
    return all_reduce_factors(factors) if w.distributed else factors


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
                         {"model": spec.name, "fisher": str(cfg.curvature.fisher), "seed": int(cfg.seed)})
            write_metrics(out, metrics)
        tracker.log_metrics(metrics)
    return metrics
