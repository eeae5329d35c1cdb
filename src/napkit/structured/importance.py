"""Channel importance criteria: one score per channel of every group (higher = more important).

Mirrors the fine-grained registry (:mod:`napkit.pruning.importance`): a criterion is a small class
decorated with ``@register_channel_importance``. NAP's score (nap.md s.3, changed by issue #20) is the
loss increase the K-FAC quadratic model predicts for what the pruner applies: removing the channel's
column block from every consumer, with the consumer's OBS compensation when the pruner compensates
(``ScoreInputs.compensated``), else plain removal. Once a channel is gone from every consumer, no layer
reads it, so the producer rows add no further loss: adding their own OBS term (as nap.md s.3 first
specified) counts the same removal twice and is kept only as the ``producer_rows`` ablation.

BatchNorm in the NAP score: the producer row term is computed on the conv (Linear) weights and
their own K-FAC factors; a BatchNorm between producer and consumer carries no curvature factors and
just follows its channel out. Its effect on the loss is still seen through the consumer's column
term, whose A factor is estimated on the normalised activations the consumer actually reads.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from napkit.curvature import KFACFactors, weight_with_bias
from napkit.errors import NapkitError
from napkit.pruning.importance import live_inputs
from napkit.registry import Registry
from napkit.structured.consumers import consumer_blocks
from napkit.structured.groups import ChannelGroup, Consumer, saved_flops

Scores = dict[str, Tensor]

_CHANNEL_IMPORTANCES: Registry[type[ChannelImportance]] = Registry("channel importance")


def register_channel_importance(name: str) -> Callable[[type[ChannelImportance]], type[ChannelImportance]]:
    """Class decorator: make the channel criterion available by ``name``."""
    return _CHANNEL_IMPORTANCES.named(name)


def list_channel_importances() -> list[str]:
    return _CHANNEL_IMPORTANCES.names()


def channel_importance_class(name: str) -> type[ChannelImportance]:
    """The criterion class registered as ``name``; an unknown name lists the valid ones."""
    return _CHANNEL_IMPORTANCES.get(name)


def create_channel_importance(name: str, **kwargs: object) -> ChannelImportance:
    """Instantiate a channel criterion by name; an unknown name lists the valid ones."""
    return channel_importance_class(name)(**kwargs)


@dataclass(frozen=True)
class ScoreInputs:
    """What some criteria need besides the model, keyed by the CURRENT model's layer names.

    ``compensated`` says whether the pruner refits each consumer on its kept inputs after a removal.
    """

    factors: dict[str, KFACFactors] | None = None
    layer_flops: dict[str, int] | None = None
    compensated: bool = True


class ChannelImportance(ABC):
    """Scores every channel of every group; float64 tensors of shape ``[group.size]``, keyed by group id.

    A score of +inf means "this criterion cannot judge the channel": the pruner never removes it.
    """

    name: ClassVar[str]
    needs_curvature: ClassVar[bool] = False

    @abstractmethod
    def __call__(
        self, model: nn.Module, groups: list[ChannelGroup], inputs: ScoreInputs = ScoreInputs()
    ) -> Scores:
        """Scores keyed by group id."""


def _l1(model: nn.Module, name: str) -> Tensor:
    """L1 norm of each output filter of a layer (no bias), float64."""
    w = model.get_submodule(name).weight.detach()
    return w.reshape(w.shape[0], -1).abs().sum(1, dtype=torch.float64)


@register_channel_importance("l1")
class L1Filter(ChannelImportance):
    """L1 norm of the producer filters (Li et al. 2017), summed over a coupled group's producers."""

    def __call__(
        self, model: nn.Module, groups: list[ChannelGroup], inputs: ScoreInputs = ScoreInputs()
    ) -> Scores:
        return {g.id: torch.stack([_l1(model, p) for p in g.producers]).sum(0) for g in groups}


@register_channel_importance("bn_gamma")
class BnGamma(ChannelImportance):
    """|gamma| of the BatchNorm (network slimming, Liu et al. 2017), summed over a coupled group.

    Groups without BatchNorm (e.g. hidden Linear units) get +inf: slimming cannot judge them.
    """

    def __call__(
        self, model: nn.Module, groups: list[ChannelGroup], inputs: ScoreInputs = ScoreInputs()
    ) -> Scores:
        if not any(g.norms for g in groups):
            raise NapkitError(f"bn_gamma needs BatchNorm layers; {type(model).__name__} has none")
        return {g.id: self._group(model, g) for g in groups}

    @staticmethod
    def _group(model: nn.Module, group: ChannelGroup) -> Tensor:
        if not group.norms:
            return torch.full((group.size,), math.inf, dtype=torch.float64)
        gammas = [model.get_submodule(n).weight.detach().abs().double()[window]
                  for n in group.norms for window in group.windows(n)]
        return torch.stack(gammas).sum(0)


@register_channel_importance("random")
class RandomChannels(ChannelImportance):
    """Uniform random scores: the floor every criterion must beat."""

    def __init__(self, seed: int = 0) -> None:
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(
        self, model: nn.Module, groups: list[ChannelGroup], inputs: ScoreInputs = ScoreInputs()
    ) -> Scores:
        return {g.id: torch.rand(g.size, generator=self.generator, dtype=torch.float64) for g in groups}


@register_channel_importance("nap")
class NapChannels(ChannelImportance):
    """OBS under K-FAC for channels (nap.md s.3, issue #20) on pi-damped factors.

    Per channel, summed over its consumers: ``0.5 tr(W_B^T G W_B P_B)`` over the channel's column block B,
    with ``P_B = ([A^-1]_BB)^-1`` when the consumers are compensated (the joint OBS cost of the block)
    and ``P_B = A_BB`` when they are not (the cost of zeroing it). ``producer_rows`` adds the producer
    rows' own OBS term ``w_i^T A w_i / (2 [G^-1]_ii)`` (``w_i`` row i of ``W_h``), the earlier score, for
    ablation only: it double-counts. A channel that was zero on every sample (dead ReLU) scores 0 at
    its consumers. ``per_flop`` divides by the FLOPs the removal saves (FLOPs targets).

    A consumer of a concatenation is scored once over all its input channels; each group takes its
    window. A grouped-conv consumer is scored per conv group, on that group's factors (its channels' columns live
    in their group's weight block only). Depthwise filters add no term, for the same reason the producer
    rows add none: they only carry the channel to its consumers, whose column terms already price the
    channel's removal. A group with a consumer that has no factors (it never ran as a module) scores +inf.
    """

    needs_curvature = True

    def __init__(self, damping: float = 0.1, per_flop: bool = False, producer_rows: bool = False) -> None:
        self.damping, self.per_flop, self.producer_rows = damping, per_flop, producer_rows

    def __call__(
        self, model: nn.Module, groups: list[ChannelGroup], inputs: ScoreInputs = ScoreInputs()
    ) -> Scores:
        factors, layer_flops = inputs.factors, inputs.layer_flops
        if factors is None:
            raise NapkitError(f"{self.name} needs K-FAC factors of the current model; pass factors")
        if self.per_flop and layer_flops is None:
            raise NapkitError(f"{self.name} with per_flop needs the model's per-layer FLOPs")
        scores: Scores = {}
        per_consumer: dict[str, Tensor | None] = {}  # a concatenation's consumer serves several groups
        for g in groups:
            terms = []
            for c in g.consumers:
                windows = g.windows(c.name)
                if len(windows) > 1:  # one concatenation repeats the channels: their columns go jointly
                    terms.append(self._repeated_terms(model, c, windows, factors, inputs.compensated))
                    continue
                if c.name not in per_consumer:
                    per_consumer[c.name] = self._consumer_terms(model, c, factors, inputs.compensated)
                t = per_consumer[c.name]
                terms.append(None if t is None else t[windows[0]])
            if self.producer_rows:
                terms += [self._row_terms(model, p, factors) for p in g.producers]
            if any(t is None for t in terms):  # a consumer that never ran as a module: NAP cannot judge it
                scores[g.id] = torch.full((g.size,), math.inf, dtype=torch.float64)
                continue
            score = torch.stack(terms).sum(0) if terms else torch.zeros(g.size, dtype=torch.float64)
            if layer_flops is not None and self.per_flop:
                score = score / saved_flops(model, g, layer_flops)
            scores[g.id] = score
        return scores

    def _consumer_terms(self, model: nn.Module, consumer: Consumer, factors: dict[str, KFACFactors],
                        compensated: bool) -> Tensor | None:
        """Column terms of every input channel of one consumer, block by block (a grouped conv: per conv
        group, on that group's factors); None when the consumer has no factors (it never ran as a module)."""
        blocks = consumer_blocks(model, consumer)
        if any(b.key not in factors for b in blocks):
            return None
        return torch.cat([column_terms(b.weight, self._damped(b.key, b.weight, factors), consumer.block, compensated)
                          * _live_channels(factors[b.key], consumer.block) for b in blocks])

    def _repeated_terms(self, model: nn.Module, consumer: Consumer, windows: tuple[slice, ...],
                        factors: dict[str, KFACFactors], compensated: bool) -> Tensor | None:
        """Column terms of a group whose every channel the consumer reads once per window: one joint block of
        all its columns per channel (None without factors)."""
        blocks = consumer_blocks(model, consumer)
        if len(blocks) != 1 or blocks[0].key not in factors:
            return None  # the tracer keeps grouped convs off concatenations; no factors: NAP cannot judge it
        b = consumer.block
        units = torch.stack([torch.arange(w.start, w.stop) for w in windows], 1)  # [channels, reads]
        columns = (units[:, :, None] * b + torch.arange(b)).reshape(len(units), -1)
        f = factors[blocks[0].key]
        terms = column_terms(blocks[0].weight, self._damped(blocks[0].key, blocks[0].weight, factors), b, compensated,
                             columns=columns)
        return terms * _live_channels(f, b)[units].amax(1)

    def _row_terms(self, model: nn.Module, name: str, factors: dict[str, KFACFactors]) -> Tensor:
        """The ``producer_rows`` ablation's term of one producer (a Conv2d / Linear with factors)."""
        if name not in factors:  # e.g. an attention's heads: their rows have no factors of their own
            raise NapkitError(f"producer_rows needs K-FAC factors of every producer; {name!r} has none")
        return row_terms(model, name, self._damped(name, weight_with_bias(model.get_submodule(name)), factors))

    def _damped(self, key: str, w_h: Tensor, factors: dict[str, KFACFactors]) -> KFACFactors:
        """The damped factors of ``key`` (a layer or a conv group), checked against its current ``W_h``."""
        if key not in factors:
            raise NapkitError(f"no K-FAC factors for layer {key!r}; estimate them on the current model")
        f = factors[key]
        if float(f.g_mean_eig()) <= torch.finfo(f.G.dtype).tiny:
            raise NapkitError(
                f"layer {key!r} has (numerically) zero output-gradient curvature G: the loss does not depend "
                f"on its outputs (e.g. a zero-initialised residual BatchNorm); NAP needs a trained model"
            )
        if (f.d_out, f.d_in_h) != tuple(w_h.shape):
            raise NapkitError(
                f"K-FAC factors of {key!r} are {f.d_out}x{f.d_in_h} but the layer is "
                f"{w_h.shape[0]}x{w_h.shape[1]}; they were estimated on another (unpruned?) model"
            )
        return f.damped(self.damping)


@register_channel_importance("nap_per_flop")
class NapPerFlop(NapChannels):
    """NAP score divided by the FLOPs the channel's removal saves: loss per FLOP, for FLOPs targets."""

    def __init__(self, damping: float = 0.1, producer_rows: bool = False) -> None:
        super().__init__(damping=damping, per_flop=True, producer_rows=producer_rows)


def _live_channels(f: KFACFactors, block: int) -> Tensor:
    """1.0 for each input channel of a consumer that was nonzero on some sample (undamped ``A``), else 0.0:
    a dead channel (e.g. behind a dead ReLU) costs nothing to remove, whatever the damping says."""
    live = live_inputs(f)[: f.d_in].reshape(-1, block)
    return live.amax(1).to(f.G.device)


def row_terms(model: nn.Module, name: str, f: KFACFactors) -> Tensor:
    """OBS cost of removing each output row of layer ``name``: ``w_i^T A w_i / (2 [G^-1]_ii)``."""
    w = weight_with_bias(model.get_submodule(name)).to(f.G)
    return ((f.mul_a(w) * w).sum(1) / (2.0 * f.g_inv_diag())).double()


def column_terms(w_h: Tensor, f: KFACFactors, block: int, compensated: bool = True, *,
                 columns: Tensor | None = None) -> Tensor:
    """Quadratic-model cost of removing each input channel (column block B of ``block`` columns) of ``W_h``.

    ``0.5 tr(W_B^T G W_B P_B)``. Compensated (the other columns refit, the joint OBS cost):
    ``P_B = ([A^-1]_BB)^-1``, for one column ``w_j^T G w_j / (2 [A^-1]_jj)``. Not compensated (zeroing):
    ``P_B = A_BB``. ``columns`` (``[channels, k]``) gives each channel's columns where they are not one
    consecutive block (a channel a concatenation repeats).
    """
    w = w_h.to(f.G)[:, : f.d_in]
    if columns is None:  # consecutive blocks: views, no copy of a large W
        channels = f.d_in // block
        wb = w.reshape(w.shape[0], channels, block)
        gwb = (f.G @ w).reshape(w.shape[0], channels, block)
        p = _schur_blocks(f, channels, block) if compensated else _a_blocks(f, channels, block)
    else:
        columns = columns.to(w.device)
        wb, gwb = w[:, columns], (f.G @ w)[:, columns]
        p = _spd_inverse(_gathered_blocks(f.a_inverse(), columns)) if compensated else _gathered_blocks(
            f.A if f.A is not None else f.A_blocks, columns)
    m = torch.einsum("ocb,oce->cbe", wb, gwb)
    return (0.5 * (m * p).sum((1, 2))).double()


def _schur_blocks(f: KFACFactors, channels: int, b: int) -> Tensor:
    """``([A^-1]_BB)^-1`` for each channel's column block B (``[channels, b, b]``)."""
    if f.A_blocks is not None and f.A_blocks.shape[1] == b:
        return f.A_blocks  # blocks of a block-diagonal A are exactly the channels' blocks
    return _spd_inverse(_inverse_blocks(f, channels, b))


def _a_blocks(f: KFACFactors, channels: int, b: int) -> Tensor:
    """Diagonal blocks ``A_BB`` of the weight columns, one per channel (``[channels, b, b]``)."""
    if f.A is not None:
        return _diagonal_blocks(f.A, channels, b)
    assert f.A_blocks is not None
    return _diagonal_blocks(f.A_blocks, channels, b)


def _inverse_blocks(f: KFACFactors, channels: int, b: int) -> Tensor:
    """Diagonal blocks ``[A^-1]_BB`` of the weight columns, one per channel."""
    return _diagonal_blocks(f.a_inverse(), channels, b)


def _diagonal_blocks(m: Tensor, channels: int, b: int) -> Tensor:
    """Blocks ``M_BB`` of consecutive ``b`` columns of a dense ``M`` (2-D) or a block-diagonal one (3-D)."""
    if m.dim() == 2:
        d = channels * b
        return m[:d, :d].reshape(channels, b, channels, b).diagonal(dim1=0, dim2=2).permute(2, 0, 1)
    return _gathered_blocks(m, torch.arange(channels * b, device=m.device).reshape(channels, b))


def _gathered_blocks(m: Tensor, idx: Tensor) -> Tensor:
    """``M[i, i]`` for each row ``i`` of column indices ``idx`` (``[channels, k, k]``), of a dense ``M`` (2-D) or a
    block-diagonal one (3-D)."""
    idx = idx.to(m.device)
    if m.dim() == 2:
        return m[idx[:, :, None], idx[:, None, :]]
    s = m.shape[1]  # block-diagonal: entries across blocks are zero
    blk, off = idx // s, idx % s
    vals = m[blk[:, :, None], off[:, :, None], off[:, None, :]]
    same = blk[:, :, None] == blk[:, None, :]
    return torch.where(same, vals, torch.zeros((), dtype=vals.dtype, device=vals.device))


def _spd_inverse(m: Tensor) -> Tensor:
    """Inverse of a batch of symmetric positive definite matrices (Cholesky)."""
    chol, info = torch.linalg.cholesky_ex(m)
    if bool((info != 0).any()):
        raise NapkitError("a block of A^-1 is not positive definite; increase the damping")
    return torch.cholesky_inverse(chol)
