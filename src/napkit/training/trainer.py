"""Epoch loop with per-epoch checkpoints and exact resume at epoch boundaries.

The checkpoint holds everything the next epoch depends on: weights, optimizer and scheduler
state, the torch RNG state (dropout) and the history. Batch order depends only on
(seed, epoch), so a run killed and restarted continues exactly where it stopped.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset

from napkit.data import make_loader
from napkit.distributed import barrier, world
from napkit.errors import NapkitError
from napkit.hashing import fingerprint
from napkit.io import load_torch, save_torch
from napkit.pruning.masks import MaskSet
from napkit.training.engine import evaluate, train_one_epoch

log = logging.getLogger(__name__)

EpochCallback = Callable[[int, dict[str, float]], None]


def build_optimizer(model: nn.Module, cfg: DictConfig, steps: int) -> tuple[torch.optim.Optimizer, Any]:
    """Instantiate the configured optimizer and LR scheduler over ``steps`` scheduler steps."""
    optimizer = instantiate(cfg.optimizer)(params=model.parameters())
    scheduler = instantiate(cfg.scheduler)(optimizer=optimizer, T_max=max(steps, 1))
    return optimizer, scheduler


def _stepped(batches: Iterable[Any], scheduler: Any, first: bool) -> Iterator[Any]:
    """``batches``, stepping the scheduler before each one but the very first of the run: a per-batch
    schedule whose LR is set just before the optimizer step that uses it."""
    for i, batch in enumerate(batches):
        if i or not first:
            scheduler.step()
        yield batch


def fit(
    model: nn.Module,
    train_set: Dataset,
    val_set: Dataset,
    *,
    cfg: DictConfig,
    batch_size: int,
    eval_batch_size: int,
    seed: int,
    device: torch.device,
    checkpoint: Path,
    epochs: float | None = None,
    masks: MaskSet | None = None,
    run_key: str = "",
    on_epoch: EpochCallback | None = None,
    desc: str = "train",
    progress: bool = True,
) -> list[dict[str, float]]:
    """Train ``model`` for ``epochs`` (default ``cfg.epochs``), resuming from ``checkpoint`` if it matches.

    A whole number of epochs steps the scheduler once per epoch. A fractional budget (e.g. 0.25, the
    short fine-tune between pruning steps) trains ``round(epochs * batches per epoch)`` batches (at
    least one) and steps the scheduler per batch, so a cosine schedule still decays to its end.

    Under torchrun the model trains wrapped in DistributedDataParallel on this rank's shard of
    every epoch; only rank 0 writes the checkpoint and calls ``on_epoch``. ``run_key`` (the hash of
    everything upstream, e.g. the data and the pruning step) keeps a checkpoint from another run
    with the same shapes and optimizer settings from being resumed.

    Returns the per-epoch history (train loss/top-1, val loss/top-1/top-5, lr).
    """
    budget = float(cfg.epochs if epochs is None else epochs)
    if budget < 0 or not math.isfinite(budget):
        raise NapkitError(f"{desc}: epochs must be a finite number >= 0, got {budget}")
    per_batch = not budget.is_integer()
    epochs = math.ceil(budget)
    w = world()
    per_epoch = len(make_loader(train_set, batch_size=batch_size, shuffle=True, seed=seed, epoch=0,
                                rank=w.rank, world_size=w.world_size))
    total_batches = max(1, round(budget * per_epoch)) if per_batch else epochs * per_epoch
    model.to(device)
    if masks is not None:
        masks.apply_(model)
    optimizer, scheduler = build_optimizer(model, cfg, total_batches if per_batch else epochs)
    key = fingerprint(OmegaConf.to_container(cfg, resolve=True), budget, batch_size, seed, run_key,
                      [list(p.shape) for p in model.parameters()])
    history: list[dict[str, float]] = []
    start = 0
    if checkpoint.is_file():
        state = load_torch(checkpoint)
        if state.get("fingerprint") == key:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            torch.set_rng_state(state["rng"])
            history, start = list(state["history"]), int(state["epoch"])
            log.info("%s: resumed from %s at epoch %d/%d", desc, checkpoint, start, epochs)
        else:
            log.warning("%s: ignoring checkpoint %s from another configuration", desc, checkpoint)
    trained = model
    if w.distributed:
        trained = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    for epoch in range(start, epochs):
        loader = make_loader(train_set, batch_size=batch_size, shuffle=True, seed=seed, epoch=epoch,
                             rank=w.rank, world_size=w.world_size)
        lr = optimizer.param_groups[0]["lr"]
        batches: Iterable[Any] = loader
        if per_batch:
            take = min(per_epoch, total_batches - epoch * per_epoch)
            batches = _stepped(itertools.islice(loader, take), scheduler, first=epoch == 0)
        train = train_one_epoch(trained, batches, optimizer, device=device, masks=masks,
                                label_smoothing=float(cfg.get("label_smoothing", 0.0)),
                                amp=bool(cfg.get("amp", False)) and device.type == "cuda",
                                desc=f"{desc} {epoch + 1}/{epochs}", progress=progress and w.is_main)
        if not per_batch:
            scheduler.step()
        val = evaluate(model, make_loader(val_set, batch_size=eval_batch_size, shuffle=False, seed=seed),
                       device=device, desc=f"{desc} val", progress=progress and w.is_main)
        row = {"epoch": epoch + 1, "lr": lr, "train_loss": train["loss"], "train_top1": train["top1"],
               "val_loss": val["loss"], "val_top1": val["top1"], "val_top5": val["top5"]}
        history.append(row)
        if w.is_main:  # one writer; the other ranks wait until the checkpoint is complete
            save_torch(checkpoint, {
                "fingerprint": key, "epoch": epoch + 1, "model": model.state_dict(),
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "rng": torch.get_rng_state(), "history": history,
            })
        barrier()
        if not w.is_main:
            continue
        log.info("%s epoch %d/%d: %s", desc, epoch + 1, epochs,
                 " ".join(f"{k}={v:.4g}" for k, v in row.items() if k != "epoch"))
        if on_epoch is not None:
            on_epoch(epoch + 1, row)
    return history
