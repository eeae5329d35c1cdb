"""One structured pruning step: score every channel, rank, remove physically, never past the target.

Reductions are factors ("x times fewer"): ``target_flops_reduction=2`` stops at half the dense
model's FLOPs. The FLOPs and parameters of any candidate removal are computed exactly from the
layer shapes (Conv2d/Linear FLOPs are bilinear in output and input channels), so a step can stop
at the first channel that reaches the target.

With ``compensate`` every consumer of a removed channel absorbs it before the cut: its kept input
weights (and bias) get the exact OBS update for removing those columns under its K-FAC factors,
the least-squares refit of its output on its kept inputs (issue #20). The NAP score is told so
(``ScoreInputs.compensated``) and ranks by the cost of exactly that. ``last_predicted_increase``
holds the undamped K-FAC quadratic model's loss increase of the last step (nan without factors).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from napkit.curvature import KFACFactors
from napkit.errors import NapkitError, unknown_choice
from napkit.pruning.allocation import CannotPruneFurther
from napkit.pruning.compensation import column_removal_update, quadratic_increase
from napkit.structured.attention import attention_input_of
from napkit.structured.blocks import BRANCH, INNER, block_of, bottlenecks
from napkit.structured.consumers import consumer_blocks
from napkit.structured.flops import module_flops
from napkit.structured.groups import (
    ChannelGroup,
    channel_groups,
    find_group,
    in_channels,
    removed_inputs,
    rows,
    trace_groups,
    warn_unpruned,
)
from napkit.structured.importance import ChannelImportance, ScoreInputs, channel_importance_class
from napkit.structured.latency import LatencyTable
from napkit.structured.norms import norm_width
from napkit.structured.surgery import apply

FactorsProvider = Callable[[nn.Module, int], dict[str, KFACFactors]]
ALLOCATIONS = ("global", "uniform")


def count_flops(model: nn.Module, input_shape: tuple[int, ...]) -> tuple[int, dict[str, int]]:
    """Total FLOPs and those of every Conv2d / Linear (depthwise too), modes kept (:func:`module_flops`)."""
    return module_flops(model, input_shape)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@dataclass
class _Layers:
    """Per-layer terms of the cost model, as tensors (group index G = "no group")."""

    producer: Tensor  # group whose channels are the layer's rows
    reads: Tensor  # (layer, group) pairs: the group's channels are some of the layer's input channels
    read_group: Tensor
    rows: Tensor
    channels: Tensor  # input channels (units of ``block`` columns)
    block: Tensor
    fold: Tensor  # conv groups: ``fold`` removed input channels take one column block from each row
    bias: Tensor
    flops_unit: Tensor  # FLOPs per (row, input channel) pair
    flops_row: Tensor  # FLOPs per row whatever its inputs (an attention head's attention maps)


class CostModel:
    """Exact params and FLOPs of ``model`` after removing ``removed[g]`` channels from each group.

    Emptying a bottleneck's conv1 or conv2 group removes the block's branch (conv1-3, bn1-3) and adds
    its per-channel shift, as :func:`~napkit.structured.surgery.apply` does. A layer or BatchNorm that
    reads a concatenation loses the channels of every group it reads. An attention whose input projection
    reads a group is one layer: heads (rows) times input channels for the projection, plus its attention
    maps per head.
    """

    def __init__(
        self, model: nn.Module, groups: list[ChannelGroup], flops: tuple[int, dict[str, int]]
    ) -> None:
        self.num_groups = len(groups)
        producer: dict[str, int] = {}
        block: dict[str, int] = {}
        reads: list[tuple[str, int]] = []
        projections: dict[str, str] = {}  # attention -> its input projection, when that reads a group
        for i, g in enumerate(groups):
            for p in g.producers + g.depthwise:  # a depthwise conv: rows of the group, one fixed input unit
                producer[p] = i
            for c in g.consumers:
                attention = attention_input_of(model, c.name)
                if attention is None:  # once per window: a repeating concatenation reads a channel k times
                    reads += [(c.name, i)] * len(g.windows(c.name))
                    block[c.name] = c.block
                    continue
                projections[attention] = c.name  # its weight per head: 3 * head_dim columns per input channel
                reads += [(attention, i)] * len(g.windows(c.name))
                block[attention] = model.get_submodule(attention).weight[0].numel() // in_channels(
                    model.get_submodule(c.name), c.block)
        names = list(dict.fromkeys([*producer, *(n for n, _ in reads)]))
        self.layers = self._layers(model, names, producer, reads, block, flops[1], len(groups), projections)
        norm_names = list(dict.fromkeys(n for g in groups for n in g.norms))
        norms = [model.get_submodule(n) for n in norm_names]
        index = {n: j for j, n in enumerate(norm_names)}
        norm_reads = [(index[n], i) for i, g in enumerate(groups) for n in g.norms for _ in g.windows(n)]
        self.norm_reads = torch.tensor([j for j, _ in norm_reads], dtype=torch.long)
        self.norm_read_group = torch.tensor([i for _, i in norm_reads], dtype=torch.long)
        self.norm_features = torch.tensor([norm_width(m) for m in norms], dtype=torch.long)
        self.norm_params = torch.tensor([sum(p.numel() for p in m.parameters(recurse=False)) // norm_width(m)
                                         for m in norms], dtype=torch.long)
        members = [(i, model.get_parameter(n)) for i, g in enumerate(groups) for n, _ in g.params]
        self.param_group = torch.tensor([i for i, _ in members], dtype=torch.long)
        self.param_unit = torch.tensor([p.numel() // groups[i].size for i, p in members], dtype=torch.long)
        self._blocks(model, groups, names, norm_names)
        zero = torch.zeros(self.num_groups + 1, dtype=torch.long)
        params0, flops0 = self._variable(zero)
        self.base_params = count_params(model) - params0
        self.base_flops = flops[0] - flops0

    def _blocks(self, model: nn.Module, groups: list[ChannelGroup], layers: list[str], norms: list[str]) -> None:
        """Which layers and norms die with which bottleneck, and the groups whose emptying kills it."""
        index = {p: i for i, g in enumerate(groups) for p in g.producers}
        names = [b for b in bottlenecks(model) if all(f"{b}.{n}" in index for n in INNER)]
        branch = {f"{b}.{m}": j for j, b in enumerate(names) for m in BRANCH}
        self.sizes = torch.tensor([g.size for g in groups] + [0], dtype=torch.long)
        self.block_inner = torch.tensor([[index[f"{b}.{n}"] for n in INNER] for b in names],
                                        dtype=torch.long).reshape(-1, len(INNER))
        self.block_residual = torch.tensor([index.get(f"{b}.conv3", len(groups)) for b in names], dtype=torch.long)
        self.block_width = torch.tensor([rows(model.get_submodule(f"{b}.conv3")) for b in names], dtype=torch.long)
        self.layer_block = torch.tensor([branch.get(n, len(names)) for n in layers], dtype=torch.long)
        self.norm_block = torch.tensor([branch.get(n, len(names)) for n in norms], dtype=torch.long)

    @staticmethod
    def _layers(
        model: nn.Module, names: list[str], producer: dict[str, int], reads: list[tuple[str, int]],
        block: dict[str, int], per_layer: dict[str, int], num_groups: int, projections: dict[str, str],
    ) -> _Layers:
        layers = [model.get_submodule(n) for n in names]
        index = {n: j for j, n in enumerate(names)}
        # a layer that consumes no group has all its columns as one fixed unit
        blocks = [block.get(n, layer.weight[0].numel()) for n, layer in zip(names, layers)]

        def longs(values: list[int]) -> Tensor:
            return torch.tensor(values, dtype=torch.long)

        r = longs([rows(layer) for layer in layers])
        c = longs([in_channels(layer, b) for layer, b in zip(layers, blocks)])
        total = longs([per_layer[n] for n in names])
        bilinear = longs([per_layer[projections.get(n, n)] for n in names])
        return _Layers(
            producer=longs([producer.get(n, num_groups) for n in names]),
            reads=longs([index[n] for n, _ in reads]),
            read_group=longs([i for _, i in reads]),
            rows=r, channels=c, block=longs(blocks), fold=longs([getattr(layer, "groups", 1) for layer in layers]),
            bias=longs([0 if layer.bias is None else layer.bias[0].numel() for layer in layers]),  # per row
            flops_unit=bilinear // (r * c), flops_row=(total - bilinear) // r,
        )

    def _variable(self, removed: Tensor) -> tuple[int, int]:
        """Params and FLOPs of the group members, ``removed`` padded with a trailing 0 ("no group")."""
        lay = self.layers
        dead = (removed[self.block_inner] >= self.sizes[self.block_inner]).any(1)
        alive = ~torch.cat([dead, torch.zeros(1, dtype=torch.bool)])
        r = lay.rows - removed[lay.producer]
        c = lay.channels - torch.zeros_like(lay.channels).index_add_(
            0, lay.reads, removed[lay.read_group] // lay.fold[lay.reads])
        features = self.norm_features - torch.zeros_like(self.norm_features).index_add_(
            0, self.norm_reads, removed[self.norm_read_group])
        shifts = (dead * (self.block_width - removed[self.block_residual])).sum()
        params = (alive[self.layer_block] * r * (c * lay.block + lay.bias)).sum() + (
            alive[self.norm_block] * self.norm_params * features).sum() + shifts + (
            self.param_unit * (self.sizes[self.param_group] - removed[self.param_group])).sum()
        return int(params), int((alive[self.layer_block] * r * (lay.flops_unit * c + lay.flops_row)).sum())

    def cost(self, removed: Tensor) -> tuple[int, int]:
        """(params, FLOPs) after removing ``removed[g]`` channels of group g."""
        padded = torch.cat([removed.long(), torch.zeros(1, dtype=torch.long)])
        params, flops = self._variable(padded)
        return self.base_params + params, self.base_flops + flops


class StructuredPruner:
    """Removes ``step_fraction`` of the remaining prunable channels per call, never past the target.

    ``importance`` is a criterion or its registered name (``damping`` goes to curvature criteria
    created by name). ``dense`` is the unpruned model the reductions refer to; ``input_shape`` the
    ``(1, C, H, W)`` shape FLOPs are counted at. ``allocation="global"`` ranks all candidate channels
    by score across groups (each group's ratio falls out); ``"uniform"`` removes the same share of
    every group (ordered within a group by score). A group keeps at least ``min_channels`` and at
    least ``1 - max_group_sparsity`` of its dense channels. ``round_to = r > 1`` keeps every group
    that loses channels at a multiple of r (rounded up: fewer removals, best-scored ones dropped),
    which CPU/GPU kernels run faster (SIMD width, tensor-core tiles). ``factors_provider(model,
    iteration)`` returns K-FAC factors keyed by the CURRENT model's layer names. ``latency``, a
    :class:`LatencyTable` of ``dense``, divides every score by the milliseconds the channel's removal
    saves at the current widths before the global ranking: loss per millisecond on the machine the
    table was measured on, for models that must get faster, not only smaller. ``remove_blocks=True``
    lets a torchvision bottleneck's conv1 or conv2 group lose every channel, which removes the block
    (:mod:`~napkit.structured.blocks`); with a latency table, such a channel is priced at the larger of
    its own saving and its share of the whole block's time, the per-layer cost only depth removal frees.
    ``compensate`` refits the consumers of removed channels (module docstring); None: on exactly when
    the criterion uses curvature (NAP), off for the baselines. The factors it and the predicted increase
    use are damped by the criterion's ``damping`` when it has one, else by ``damping``.
    ``ignore`` lists module-name prefixes left unpruned (``prune.ignore``); groups whose channel coupling
    napkit does not understand are left unpruned too, named in one :class:`UnprunedLayersWarning`.
    """

    def __init__(
        self,
        importance: str | ChannelImportance,
        dense: nn.Module,
        *,
        input_shape: tuple[int, ...],
        step_fraction: float,
        target_flops_reduction: float | None = None,
        target_params_reduction: float | None = None,
        allocation: str = "global",
        min_channels: int = 1,
        max_group_sparsity: float = 0.9,
        round_to: int = 1,
        factors_provider: FactorsProvider | None = None,
        damping: float = 0.1,
        latency: LatencyTable | None = None,
        remove_blocks: bool = False,
        compensate: bool | None = None,
        ignore: Sequence[str] = (),
    ) -> None:
        self.importance = _criterion(importance, damping)
        self.compensate = self.importance.needs_curvature if compensate is None else bool(compensate)
        self.damping = float(getattr(self.importance, "damping", damping))
        self.last_predicted_increase = math.nan
        self.last_plan: dict[str, Tensor] = {}
        if latency is not None and getattr(self.importance, "per_flop", False):
            raise NapkitError(f"channel importance {self.importance.name!r} already ranks per FLOP saved; "
                              f"with a latency table use its plain form (e.g. 'nap', not 'nap_per_flop')")
        self.latency = latency
        _check_options(step_fraction, allocation, min_channels, max_group_sparsity)
        if round_to < 1:
            raise NapkitError(f"round_to must be >= 1 (1: no rounding), got {round_to}")
        self.round_to = round_to
        if (self.importance.needs_curvature or self.compensate) and factors_provider is None:
            raise NapkitError(f"channel importance {self.importance.name!r} with compensate="
                              f"{self.compensate} needs K-FAC factors; pass a factors_provider")
        self.target = _target(target_flops_reduction, target_params_reduction)
        self.input_shape, self.step_fraction, self.allocation = input_shape, step_fraction, allocation
        self.min_channels, self.max_group_sparsity = min_channels, max_group_sparsity
        self.factors_provider = factors_provider
        self.ignore = tuple(ignore)
        tracing = trace_groups(dense, self.ignore)
        groups = tracing.groups
        if not groups:
            why = sorted({r for reasons in tracing.unpruned.values() for r in reasons})
            raise NapkitError(f"{type(dense).__name__} has no prunable channel groups (ignore={list(self.ignore)}; "
                              f"its channels meet: {'; '.join(why[:10]) or 'no Conv2d/Linear layers'})")
        if latency is not None:
            _check_timed(latency, groups)
        self.unpruned = warn_unpruned(tracing)  # producers left unpruned by a coupling napkit cannot prune
        self.dense_groups = groups
        self._dense_group = {p: g for g in groups for p in g.producers}
        self.blocks = bottlenecks(dense) if remove_blocks else []
        flops = count_flops(dense, input_shape)
        self.dense = {"params": count_params(dense), "flops": flops[0]}
        self._check_reachable(dense, groups, flops)

    def dense_group(self, group: ChannelGroup) -> ChannelGroup:
        """The dense model's group ``group`` was pruned from (ids change when a block's conv3 goes)."""
        for p in group.producers:
            if p in self._dense_group:
                return self._dense_group[p]
        raise NapkitError(f"channel group {group.id!r} is not in the dense model of this pruner")

    def density(self, model: nn.Module) -> dict[str, float]:
        """Kept share of every dense group's channels in ``model`` (0 for a removed block's groups)."""
        kept = {self.dense_group(g).id: g.size for g in channel_groups(model, self.ignore)}
        return {g.id: kept.get(g.id, 0) / g.size for g in self.dense_groups}

    def _floor(self, group: ChannelGroup) -> int:
        """Fewest channels the group may keep."""
        dense = self.dense_group(group).size
        if block_of(group.id, self.blocks) is not None:
            return 0
        return max(self.min_channels, math.ceil(round((1.0 - self.max_group_sparsity) * dense, 9)))

    def _check_reachable(
        self, dense: nn.Module, groups: list[ChannelGroup], flops: tuple[int, dict[str, int]]
    ) -> None:
        """Fail early when even the smallest allowed model misses the target."""
        if self.target is None:
            return
        room = torch.tensor([max(0, g.size - self._floor(g)) for g in groups])
        room = self._rounded(room, torch.tensor([g.size for g in groups]), _folds(groups))
        best = self._reductions(*CostModel(dense, groups, flops).cost(room))
        kind, value = self.target
        if not reduction_reached(best[kind], value):
            raise NapkitError(
                f"target {kind} reduction {value}x cannot be reached: with min_channels={self.min_channels}, "
                f"max_group_sparsity={self.max_group_sparsity} and round_to={self.round_to} the smallest model has "
                f"{best[kind]:.3f}x fewer {kind}"
            )

    def _rounded(self, removed: Tensor, sizes: Tensor, folds: Tensor) -> Tensor:
        """Removals per group cut back so each group that loses channels keeps a multiple of ``round_to``
        (and of its fold: grouped convs lose channels evenly from every group)."""
        r = torch.lcm(torch.full_like(folds, self.round_to), folds)
        if bool((r == 1).all()):
            return removed
        kept = torch.minimum(sizes, (sizes - removed + r - 1) // r * r)
        return torch.where(removed > 0, sizes - kept, removed)

    def _reductions(self, params: int, flops: int) -> dict[str, float]:
        return {"params": self.dense["params"] / params, "flops": self.dense["flops"] / flops}

    def measure(self, model: nn.Module) -> dict[str, float]:
        """Params, FLOPs (batch 1) and their reductions (dense / current) of ``model``."""
        params, flops = count_params(model), count_flops(model, self.input_shape)[0]
        red = self._reductions(params, flops)
        return {"params": params, "flops": flops,
                "params_reduction": red["params"], "flops_reduction": red["flops"]}

    def reached(self, model: nn.Module) -> bool:
        """Whether ``model`` meets the target (False without a target)."""
        if self.target is None:
            return False
        kind, value = self.target
        return reduction_reached(self.measure(model)[f"{kind}_reduction"], value)

    def __call__(self, model: nn.Module, iteration: int) -> nn.Module:
        """A new, smaller model; ``model`` itself when it already meets the target."""
        groups = channel_groups(model, self.ignore)
        flops = count_flops(model, self.input_shape)
        needs = self.importance.needs_curvature or self.compensate
        factors = self.factors_provider(model, iteration) if needs and self.factors_provider else None
        scores = self.importance(model, groups, ScoreInputs(factors, flops[1], self.compensate))
        if self.latency is not None:
            scores = {g.id: scores[g.id] / self._saved_ms(model, g) for g in groups if g.id in scores}
        group_of, channel = self._order(groups, scores)
        if group_of.numel() == 0:
            raise CannotPruneFurther(
                f"cannot prune further: every channel group is at its floor (min_channels="
                f"{self.min_channels}, max_group_sparsity={self.max_group_sparsity}) or unscored by "
                f"{self.importance.name!r}"
            )
        sizes, folds = torch.tensor([g.size for g in groups]), _folds(groups)
        k = self._stop(CostModel(model, groups, flops), group_of, sizes, folds)
        self.last_predicted_increase, self.last_plan = math.nan, {}
        if k == 0:
            return model
        removed = self._rounded(torch.bincount(group_of[:k], minlength=len(groups)), sizes, folds)
        group_of, channel = _first_per_group(group_of[:k], channel[:k], removed)
        if group_of.numel() == 0:
            raise CannotPruneFurther(f"cannot prune further: with round_to={self.round_to} no channel group can "
                                     f"lose a whole block of {self.round_to} channels in this step")
        plan = _plan(groups, group_of, channel)
        work = copy.deepcopy(model) if self.compensate else model
        if factors is not None:
            self.last_predicted_increase = compensate_consumers_(work, groups, plan, factors, self.damping,
                                                                 apply_update=self.compensate)
        self.last_plan = plan
        return apply(work, plan, groups=groups)

    def _saved_ms(self, model: nn.Module, group: ChannelGroup) -> float:
        """Milliseconds per channel the latency table credits the removal of one of ``group``'s channels."""
        assert self.latency is not None
        saved = self.latency.saved_ms(model, group)
        block = block_of(group.id, self.blocks)
        if block is None:
            return saved
        whole = self.latency.modules_ms(model, [f"{block}.conv{i}" for i in (1, 2, 3)])
        return max(saved, whole / group.size)

    def _order(self, groups: list[ChannelGroup], scores: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Candidate channels in removal order: (group index, channel index), this step's share only."""
        group_of, channel, keys = [], [], []
        for i, g in enumerate(groups):
            score = _checked(scores, g)
            if g.fold > 1:  # rank positions (summed over the fold blocks); each brings its fold channels
                score = score.view(g.fold, -1).sum(0).repeat(g.fold)
                order = torch.argsort(score[: g.size // g.fold], stable=True)
                order = (order[:, None] + torch.arange(g.fold) * (g.size // g.fold)).reshape(-1)
            else:
                order = torch.argsort(score, stable=True)
            order = order[torch.isfinite(score[order])][: max(0, g.size - self._floor(g))]
            if self.allocation == "uniform":
                order = order[: max(1, round(self.step_fraction * g.size))]
                keys.append((torch.arange(len(order), dtype=torch.float64) + 0.5) / g.size)
            else:
                keys.append(score[order])
            group_of.append(torch.full((len(order),), i, dtype=torch.long))
            channel.append(order)
        perm = torch.argsort(torch.cat(keys), stable=True)
        if self.allocation == "global":
            perm = perm[: max(1, round(self.step_fraction * sum(g.size for g in groups)))]
        return torch.cat(group_of)[perm], torch.cat(channel)[perm]

    def _stop(self, cost: CostModel, group_of: Tensor, sizes: Tensor, folds: Tensor) -> int:
        """Length of the removal prefix: all of it, or the shortest prefix that reaches the target."""
        n = group_of.numel()
        if self.target is None:
            return n
        kind, value = self.target

        def reached(k: int) -> bool:
            removed = self._rounded(torch.bincount(group_of[:k], minlength=cost.num_groups), sizes, folds)
            return reduction_reached(self._reductions(*cost.cost(removed))[kind], value)

        if not reached(n):
            return n
        lo, hi = 0, n  # reached(hi) holds; find the smallest such k
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if reached(mid) else (mid + 1, hi)
        return hi


def reduction_reached(have: float, target: float) -> bool:
    """Whether a FLOPs / parameter reduction ``have`` meets ``target``, within float error."""
    return have >= target * (1 - 1e-12)


@torch.no_grad()
def compensate_consumers_(model: nn.Module, groups: list[ChannelGroup], plan: Mapping[str, Tensor],
                          factors: Mapping[str, KFACFactors], damping: float, *,
                          apply_update: bool = True) -> float:
    """Refit every consumer of the channels ``plan`` removes (in place) and return the predicted increase.

    For each consumer (a grouped conv: each conv group), the removed channels' column blocks get the exact OBS update
    (:func:`~napkit.pruning.compensation.column_removal_update`) on its damped factors: they become
    zero and the kept columns and the bias absorb them. Physically cutting the channels afterwards
    (:func:`~napkit.structured.surgery.apply`) then changes no output. Returns the undamped K-FAC
    quadratic model's loss increase at the update, summed over the consumers; ``apply_update=False``
    only predicts the cost of removing the channels without refitting (nothing is changed). A consumer
    of a concatenation loses the channels of all its groups in one joint update.
    """
    predicted = 0.0
    chosen = [(find_group(groups, gid), keep) for gid, keep in plan.items()]
    removed = removed_inputs(chosen)
    for consumer in {c.name: c for group, _ in chosen for c in group.consumers}.values():
        gone = removed[consumer.name]
        layer = model.get_submodule(consumer.name)
        d_in = layer.weight[0].numel()
        for blk in consumer_blocks(model, consumer):
            if blk.key not in factors:
                raise NapkitError(f"no K-FAC factors for layer {blk.key!r}; estimate them on the current model")
            undamped = factors[blk.key].to(torch.float64)
            f = undamped.damped(damping)
            w_h = blk.weight.to(f.G)
            if (f.d_out, f.d_in_h) != tuple(w_h.shape):
                raise NapkitError(f"K-FAC factors of {blk.key!r} are {f.d_out}x{f.d_in_h} but the layer "
                                  f"is {w_h.shape[0]}x{w_h.shape[1]}; estimate them on the current model")
            cols = torch.zeros(w_h.shape[1], dtype=torch.bool, device=w_h.device)
            cols[:d_in] = gone[blk.channels].to(w_h.device).repeat_interleave(consumer.block)
            if not bool(cols.any()):
                continue
            delta = column_removal_update(w_h, cols, f, compensate=apply_update)
            predicted += quadratic_increase(delta, undamped)
            if apply_update:
                rows = layer.weight[blk.rows]
                rows.add_(delta[:, :d_in].reshape(rows.shape).to(rows))
                if layer.bias is not None:
                    layer.bias[blk.rows].add_(delta[:, d_in].to(layer.bias))
    return predicted


def _criterion(importance: str | ChannelImportance, damping: float) -> ChannelImportance:
    if isinstance(importance, ChannelImportance):
        return importance
    cls = channel_importance_class(importance)
    return cls(damping=damping) if cls.needs_curvature else cls()  # type: ignore[call-arg]


def _check_options(
    step_fraction: float, allocation: str, min_channels: int, max_group_sparsity: float
) -> None:
    if not 0.0 < step_fraction <= 1.0:
        raise NapkitError(f"step_fraction must be in (0, 1], got {step_fraction}")
    if allocation not in ALLOCATIONS:
        raise unknown_choice("allocation", allocation, ALLOCATIONS)
    if min_channels < 1:
        raise NapkitError(f"min_channels must be >= 1, got {min_channels}")
    if not 0.0 < max_group_sparsity <= 1.0:
        raise NapkitError(f"max_group_sparsity must be in (0, 1], got {max_group_sparsity}")


def _target(flops: float | None, params: float | None) -> tuple[str, float] | None:
    """("flops" | "params", factor) or None; a factor must exceed 1 (x times fewer)."""
    if flops is not None and params is not None:
        raise NapkitError("set target_flops_reduction or target_params_reduction, not both")
    for kind, value in (("flops", flops), ("params", params)):
        if value is None:
            continue
        if not value > 1.0:
            raise NapkitError(
                f"target_{kind}_reduction is a factor (x times fewer {kind}) and must be > 1, got {value}; "
                f"to remove a share s of the {kind}, pass 1 / (1 - s)"
            )
        return kind, float(value)
    return None


def _checked(scores: dict[str, Tensor], group: ChannelGroup) -> Tensor:
    """The group's scores as a float64 vector; errors on a missing group, a wrong shape or NaN."""
    if group.id not in scores:
        raise NapkitError(f"the importance gave no scores for channel group {group.id!r}")
    score = scores[group.id].detach().double().cpu()
    if score.shape != (group.size,):
        raise NapkitError(
            f"scores of group {group.id!r} have shape {tuple(score.shape)}, expected ({group.size},)"
        )
    if bool(torch.isnan(score).any()):
        raise NapkitError(f"scores of group {group.id!r} contain NaN")
    return score


def _check_timed(latency: LatencyTable, groups: list[ChannelGroup]) -> None:
    """Fail before any work when a layer whose saving the step would price is not in the latency table."""
    members = {n for g in groups for n in (*g.producers, *(c.name for c in g.consumers))}
    untimed = sorted(members - set(latency.specs))
    if untimed:
        more = " ..." if len(untimed) > 5 else ""
        raise NapkitError(f"the latency table times plain Conv2d and Linear layers only, and {len(untimed)} layer(s) "
                          f"of this model's channel groups are not in it ({', '.join(untimed[:5])}{more}); leave them "
                          f"out with prune.ignore, or rank without a latency table")


def _folds(groups: list[ChannelGroup]) -> Tensor:
    return torch.tensor([g.fold for g in groups], dtype=torch.long)


def _first_per_group(group_of: Tensor, channel: Tensor, counts: Tensor) -> tuple[Tensor, Tensor]:
    """The first ``counts[g]`` entries of each group g, in their original order."""
    rank = torch.zeros_like(group_of)
    for g in torch.unique(group_of).tolist():
        at = group_of == g
        rank[at] = torch.arange(int(at.sum()))
    keep = rank < counts[group_of]
    return group_of[keep], channel[keep]


def _plan(groups: list[ChannelGroup], group_of: Tensor, channel: Tensor) -> dict[str, Tensor]:
    """Keep indices of every group that loses channels."""
    plan = {}
    for i in torch.unique(group_of).tolist():
        g = groups[i]
        keep = torch.ones(g.size, dtype=torch.bool)
        keep[channel[group_of == i]] = False
        plan[g.id] = torch.nonzero(keep).flatten()
    return plan
