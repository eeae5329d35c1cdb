"""Training from scratch with channel exploration: napkit's epoch loop plus CHEX's steps.

Each epoch reuses :func:`napkit.training.engine.train_one_epoch` with the explorer's
:class:`~napkit.chex.masks.ChannelMasks` as its ``masks`` (gradients of pruned channels zeroed
before, the tensors re-zeroed after every optimizer step). Exploration steps run at the start of
the scheduled epochs. A checkpoint after every epoch holds the weights, optimizer, scheduler, RNG,
history, masks, MRU bank and exploration log, so a killed run resumes exactly.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.data import Dataset

from napkit.chex.explorer import Explorer, StepRecord
from napkit.chex.schedule import Schedule
from napkit.data import make_loader
from napkit.data.datasets import dataset_fingerprint
from napkit.errors import NapkitError
from napkit.hashing import fingerprint
from napkit.io import load_torch, save_torch
from napkit.training.engine import evaluate, train_one_epoch
from napkit.training.trainer import build_optimizer

log = logging.getLogger(__name__)

EpochCallback = Callable[[int, dict[str, float]], None]
StepCallback = Callable[[StepRecord], None]


def make_explorer(model: nn.Module, cfg: DictConfig, seed: int, sparsity: float | None = None,
                  input_shape: tuple[int, ...] | None = None) -> Explorer:
    """An explorer configured by the ``chex`` block (``sparsity`` overrides ``cfg.S``); with
    ``cfg.target_flops_reduction`` and the model's ``input_shape``, every step matches that FLOPs target."""
    target = cfg.get("target_flops_reduction")
    if target is not None and input_shape is None:
        raise NapkitError("chex.target_flops_reduction needs the model's input shape to measure FLOPs")
    return Explorer(model, sparsity=float(cfg.S if sparsity is None else sparsity), d0=float(cfg.d0),
                    regrowth=str(cfg.get("regrowth", "importance")), reinit=str(cfg.get("reinit", "mru")),
                    temperature=float(cfg.get("regrowth_temperature", 1.0)),
                    seed=seed, min_channels=int(cfg.get("min_channels", 1)),
                    min_density=float(cfg.get("min_layer_density", 0.0)),
                    flops_target=None if target is None else (float(target), tuple(input_shape)))


def train_chex(
    model: nn.Module,
    train_set: Dataset,
    val_set: Dataset,
    *,
    cfg: DictConfig,
    batch_size: int,
    eval_batch_size: int,
    seed: int,
    device: torch.device,
    checkpoint: Path | None = None,
    sparsity: float | None = None,
    input_shape: tuple[int, ...] | None = None,
    on_epoch: EpochCallback | None = None,
    on_step: StepCallback | None = None,
    desc: str = "chex",
    progress: bool = True,
) -> tuple[Explorer, list[dict[str, float]]]:
    """Train ``model`` from its current (random) weights for ``cfg.epochs`` with exploration.

    ``cfg`` is the ``chex`` config block (S, d0, dT, T_max_fraction, regrowth, reinit, epochs,
    optimizer, scheduler, label_smoothing, optionally target_flops_reduction, which needs the model's
    ``input_shape``). Returns the explorer (final masks applied to ``model``)
    and the per-epoch history.
    """
    epochs = int(cfg.epochs)
    schedule = Schedule.create(epochs, float(cfg.d0), int(cfg.dT), float(cfg.T_max_fraction))
    model.to(device)
    explorer = make_explorer(model, cfg, seed, sparsity, input_shape)
    optimizer, scheduler = build_optimizer(model, cfg, epochs)
    key = fingerprint(OmegaConf.to_container(cfg, resolve=True), epochs, batch_size, seed, sparsity,
                      [list(p.shape) for p in model.parameters()],
                      dataset_fingerprint(train_set), dataset_fingerprint(val_set))  # other data: start over
    history: list[dict[str, float]] = []
    start = 0
    state = load_torch(checkpoint) if checkpoint is not None and checkpoint.is_file() else None
    if state is not None and state.get("fingerprint") == key:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        explorer.load_state_dict(state["explorer"], device)
        history, start = list(state["history"]), int(state["epoch"])
        log.info("%s: resumed from %s at epoch %d/%d", desc, checkpoint, start, epochs)
    else:
        if state is not None:
            log.warning("%s: ignoring checkpoint %s from another configuration", desc, checkpoint)
        explorer.init(model)
    for epoch in range(start, epochs):
        if schedule.explores(epoch):
            rec = explorer.step(model, epoch, schedule.regrow_factor(epoch))
            log.info("%s explore @%d: d=%.4f density=%.4f regrown=%d survived=%s sampling TV from uniform=%s",
                     desc, epoch, rec.regrow_factor, rec.density, rec.regrown, rec.survived,
                     "-" if rec.sampling_distance is None else f"{rec.sampling_distance:.3f}")
            if on_step is not None:
                on_step(rec)
        loader = make_loader(train_set, batch_size=batch_size, shuffle=True, seed=seed, epoch=epoch, drop_last=False)
        lr = optimizer.param_groups[0]["lr"]
        train = train_one_epoch(model, loader, optimizer, device=device, masks=explorer.masks,  # type: ignore[arg-type]
                                label_smoothing=float(cfg.get("label_smoothing", 0.0)),
                                desc=f"{desc} {epoch + 1}/{epochs}", progress=progress)
        scheduler.step()
        val = evaluate(model, make_loader(val_set, batch_size=eval_batch_size, shuffle=False, seed=seed),
                       device=device, desc=f"{desc} val", progress=progress)
        row = {"epoch": epoch + 1, "lr": lr, "train_loss": train["loss"], "train_top1": train["top1"],
               "val_loss": val["loss"], "val_top1": val["top1"], "val_top5": val["top5"],
               "density": explorer.masks.density()}
        history.append(row)
        if checkpoint is not None:
            save_torch(checkpoint, {
                "fingerprint": key, "epoch": epoch + 1, "model": model.state_dict(),
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "rng": torch.get_rng_state(), "history": history, "explorer": explorer.state_dict(),
            })
        log.info("%s epoch %d/%d: %s", desc, epoch + 1, epochs,
                 " ".join(f"{k}={v:.4g}" for k, v in row.items() if k != "epoch"))
        if on_epoch is not None:
            on_epoch(epoch + 1, row)
    return explorer, history
