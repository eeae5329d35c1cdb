"""Spec steps (c) and (d): the most-recently-used (MRU) weight bank and importance-sampled regrowth.

The bank holds a copy of every tensor that carries a prunable channel. Restoring a channel copies
its filter, bias, consumer input slices, BatchNorm gamma, beta and running statistics back from
the bank; the bank is snapshotted just before a new mask is applied, so a pruned channel's entries
are the values it had when it was last alive.

Regrowth: for each candidate filter j outside the kept set T, ``eps_j = ||w_j - P_T w_j||^2`` (its
residual after projecting on the span of the kept filters); ``regrow_l`` candidates are drawn
without replacement with probabilities ``softmax(eps / T)`` (``random``: uniform). The spec's rule is
``T = 1``. With BatchNorm after every conv, filter norms settle near 1-2 and the kept filters span
little of a ``C_in*kh*kw``-dimensional space, so ``eps_j`` is close to ``||w_j||^2`` for every
candidate and ``softmax(eps)`` is close to uniform (:func:`distance_from_uniform` measures how
close); a smaller ``T`` **[ours]** sharpens it.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from napkit.chex.masks import ChexLayer, channel_tensors
from napkit.errors import NapkitError

REGROWTH = ("importance", "random")
REINIT = ("mru", "zero")


class MRUBank:
    """Copies of every tensor carrying a prunable channel, keyed by qualified name."""

    def __init__(self, layers: list[ChexLayer]) -> None:
        self.layers = layers
        self.tensors: dict[str, Tensor] = {}

    @torch.no_grad()
    def snapshot(self, model: nn.Module) -> None:
        """Copy the current values of every tracked tensor."""
        for l in self.layers:
            for name, view, _ in channel_tensors(model, l):
                self.tensors[name] = view.detach().reshape(-1).clone()  # one flat copy per tensor

    @torch.no_grad()
    def restore(self, model: nn.Module, channels: dict[str, Tensor]) -> None:
        """Copy the bank's values of ``channels[layer id]`` (bool per channel) back into ``model``."""
        if not self.tensors:
            raise NapkitError("the MRU bank is empty; snapshot it first")
        for l in self.layers:
            sel = channels.get(l.id)
            if sel is None or not bool(sel.any()):
                continue
            for name, view, _ in channel_tensors(model, l):
                saved = self.tensors[name].view(view.shape)
                idx = torch.nonzero(sel).flatten().to(view.device)
                view.index_copy_(1, idx, saved.index_select(1, idx.to(saved.device)).to(view.device))

    def state_dict(self) -> dict[str, Tensor]:
        return {k: v.cpu() for k, v in self.tensors.items()}

    def load_state_dict(self, state: dict[str, Tensor], device: torch.device | None = None) -> None:
        self.tensors = {k: v.to(device) if device is not None else v.clone() for k, v in state.items()}


def projection_residuals(x: Tensor, kept: Tensor) -> Tensor:
    """``||x_j - P_T x_j||^2`` for every column j of ``x`` (float64), T = span of columns ``kept``."""
    x = x.double()
    if kept.numel() == 0:
        return (x ** 2).sum(0)
    q, _ = torch.linalg.qr(x[:, kept])
    resid = x - q @ (q.T @ x)
    return (resid ** 2).sum(0).clamp_min(0.0)


def check_regrowth(method: str, temperature: float) -> None:
    """Reject an unknown regrowth method or a temperature that is not positive."""
    if method not in REGROWTH:
        raise NapkitError(f"unknown chex.regrowth {method!r}; valid choices: {', '.join(REGROWTH)}")
    if not temperature > 0.0:
        raise NapkitError(f"chex.regrowth_temperature must be > 0, got {temperature}")


def regrowth_probabilities(
    x: Tensor, kept: Tensor, *, method: str = "importance", temperature: float = 1.0
) -> tuple[Tensor, Tensor]:
    """The candidate columns outside ``kept`` and the probability of drawing each one first."""
    check_regrowth(method, temperature)
    outside = torch.ones(x.shape[1], dtype=torch.bool)
    outside[kept] = False
    candidates = torch.nonzero(outside).flatten()
    if method == "importance" and candidates.numel():
        probs = torch.softmax(projection_residuals(x, kept)[candidates] / temperature, dim=0)
    else:
        probs = torch.ones(candidates.numel(), dtype=torch.float64)
    probs = probs.clamp_min(1e-12)  # softmax may underflow; every candidate stays drawable
    return candidates, probs / probs.sum()


def distance_from_uniform(probs: Tensor) -> float:
    """Total-variation distance of ``probs`` from the uniform distribution over as many candidates
    (0: importance sampling draws like random regrowth; towards 1: it concentrates on few)."""
    return float(0.5 * (probs - 1.0 / probs.numel()).abs().sum()) if probs.numel() else 0.0


def sample_regrowth(
    x: Tensor, kept: Tensor, count: int, *, generator: torch.Generator, method: str = "importance",
    temperature: float = 1.0,
) -> Tensor:
    """Sorted indices of ``count`` columns outside ``kept``, drawn without replacement."""
    candidates, probs = regrowth_probabilities(x, kept, method=method, temperature=temperature)
    return draw(candidates, probs, count, generator)


def draw(candidates: Tensor, probs: Tensor, count: int, generator: torch.Generator) -> Tensor:
    """Sorted ``min(count, #candidates)`` of ``candidates`` drawn without replacement by ``probs``."""
    count = min(count, candidates.numel())
    if count <= 0:
        return torch.zeros(0, dtype=torch.long)
    return torch.sort(candidates[torch.multinomial(probs, count, replacement=False, generator=generator)]).values
