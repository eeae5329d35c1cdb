"""K-FAC estimation from a ``curvature`` config: which training samples, how many, sharded under torchrun.

Used by the curvature stage, by the prune loop's re-estimation on the pruned model, and by
:func:`napkit.curvature_factors` (the Python API).
"""

from __future__ import annotations

import torch
from omegaconf import DictConfig
from torch.utils.data import Dataset

from napkit.curvature.factors import KFACFactors
from napkit.curvature.kfac import all_reduce_factors, estimate_kfac
from napkit.data import make_loader
from napkit.distributed import world
from napkit.errors import unknown_choice

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
    """K-FAC factors with the ``curvature`` config group of ``cfg``; sharded and all-reduced under torchrun."""
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
