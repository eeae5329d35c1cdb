"""Deterministic data loaders: the batches of an epoch depend only on (seed, epoch).

A run resumed at an epoch boundary therefore sees exactly the batches it would have seen.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler


@runtime_checkable
class EpochAware(Protocol):
    """A dataset whose random augmentation is drawn per epoch (e.g. ``ImageTensorDataset``)."""

    def with_epoch(self, epoch: int) -> Dataset: ...


def make_loader(
    dataset: Dataset,
    *,
    batch_size: int,
    shuffle: bool,
    seed: int,
    epoch: int = 0,
    num_workers: int = 0,
    drop_last: bool = False,
    rank: int = 0,
    world_size: int = 1,
) -> DataLoader:
    """A DataLoader for one epoch: order, worker seeds and augmentation all follow (seed, epoch).

    With ``world_size > 1`` each rank reads its shard through ``DistributedSampler(seed=seed)``
    set to ``epoch``. Build a new loader per epoch.
    """
    if isinstance(dataset, EpochAware):
        dataset = dataset.with_epoch(epoch)
    generator = torch.Generator().manual_seed(epoch_seed(seed, epoch))
    sampler = None
    if world_size > 1:
        sampler = DistributedSampler(
            dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last
        )
        sampler.set_epoch(epoch)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle and sampler is None,
        sampler=sampler,
        num_workers=num_workers,
        drop_last=drop_last,
        generator=generator,
    )


def epoch_seed(seed: int, epoch: int) -> int:
    """One 63-bit seed per (seed, epoch) pair, well mixed so neighbouring pairs are unrelated."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1, np.uint64)[0] >> np.uint64(1))
