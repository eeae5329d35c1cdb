"""One epoch of training and one pass of evaluation, with masks kept exact and progress shown."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from napkit.distributed import device_for, world
from napkit.errors import NapkitError
from napkit.pruning.masks import MaskSet
from napkit.training.metrics import topk_correct


def resolve_device(name: str) -> torch.device:
    """``auto`` -> this rank's GPU when present, else cpu; anything else is passed to torch.device."""
    try:
        return device_for(name, world())
    except RuntimeError as exc:
        raise NapkitError(f"unknown device {name!r}; valid choices: auto, cpu, cuda, cuda:N") from exc


def first_nonfinite(model: nn.Module) -> str:
    """``" (layer X has NaN/Inf weights)"`` for the first such parameter, else ``""``: where it diverged."""
    for name, p in model.named_parameters():
        if not bool(torch.isfinite(p).all()):
            return f" ({name.rsplit('.', 1)[0]} has NaN/Inf weights)"
    return ""


def train_one_epoch(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    *,
    device: torch.device,
    masks: MaskSet | None = None,
    label_smoothing: float = 0.0,
    amp: bool = False,
    desc: str = "train",
    progress: bool = True,
) -> dict[str, float]:
    """Train for one pass over ``batches``; returns mean loss and top-1 (percent).

    ``model`` may be wrapped in DistributedDataParallel (masks address the wrapped module).
    ``amp`` runs forward passes in bfloat16 autocast (no loss scaling needed).
    A non-finite loss stops training with a clear error before the weights are updated,
    so the last checkpoint stays the last good state.
    """
    model.train()
    plain = model.module if isinstance(model, DistributedDataParallel) else model
    total, loss_sum, correct = 0, 0.0, 0
    bar = tqdm(batches, desc=desc, leave=False, disable=not progress)
    for x, y in bar:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(x)
            loss = F.cross_entropy(logits.float(), y, label_smoothing=label_smoothing)
        if not math.isfinite(loss.item()):
            where = first_nonfinite(plain)
            raise NapkitError(f"{desc}: loss became {loss.item()}{where} (try a lower learning rate); "
                              "stopped")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if masks is not None:
            masks.mask_grads_(plain)
        optimizer.step()
        if masks is not None:
            masks.apply_(plain)
        n = y.shape[0]
        total += n
        loss_sum += loss.item() * n
        correct += topk_correct(logits.detach(), y, (1,))[1]
        bar.set_postfix(loss=f"{loss_sum / total:.3f}", top1=f"{100 * correct / total:.1f}")
    return {"loss": loss_sum / max(total, 1), "top1": 100.0 * correct / max(total, 1)}


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    device: torch.device,
    desc: str = "eval",
    progress: bool = True,
) -> dict[str, float]:
    """Mean loss, top-1 and top-5 (percent) over ``batches``."""
    model.eval()
    total, loss_sum, c1, c5 = 0, 0.0, 0, 0
    for x, y in tqdm(batches, desc=desc, leave=False, disable=not progress):
        x, y = x.to(device), y.to(device)
        logits = model(x)
        loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
        hits = topk_correct(logits, y, (1, 5))
        c1, c5, total = c1 + hits[1], c5 + hits[5], total + y.shape[0]
    if total == 0:
        raise NapkitError(f"{desc}: the evaluation split is empty")
    return {"loss": loss_sum / total, "top1": 100.0 * c1 / total, "top5": 100.0 * c5 / total}
