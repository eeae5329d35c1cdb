"""Physical channel removal: smaller Conv2d (depthwise too) / BatchNorm / Linear layers in a model of the same class.

A pruned model is described by :func:`channel_counts` (out channels per producer; 0 for the inner
convs of a bottleneck reduced to its shortcut), so it can be rebuilt without pickled code:
``slim_to(create_model(...), counts)`` then ``load_state_dict``.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn
from torchvision.models.vision_transformer import VisionTransformer

from napkit.errors import NapkitError
from napkit.layers import modes_kept
from napkit.structured.attention import ATTENTIONS
from napkit.structured.blocks import INNER, block_of, bottlenecks, skip_block, skipped_blocks
from napkit.structured.groups import ChannelGroup, channel_groups, find_group, removed_inputs, rows
from napkit.structured.norms import norm_width, set_norm_width

Plan = Mapping[str, Tensor | Sequence[int]]


def _take(t: Tensor, keep: Tensor, dim: int = 0) -> Tensor:
    """A fresh tensor with entries ``keep`` of ``t`` along ``dim``."""
    return t.detach().index_select(dim, keep.to(t.device))


def _set_param(module: nn.Module, name: str, value: Tensor) -> None:
    old = getattr(module, name)
    setattr(module, name, nn.Parameter(value, requires_grad=old.requires_grad))


def _slice_rows(layer: nn.Module, keep: Tensor) -> None:
    """Keep output channels / units ``keep`` of a Conv2d or Linear, or heads ``keep`` of an attention."""
    if isinstance(layer, ATTENTIONS):
        layer.keep_heads(keep)
        return
    _set_param(layer, "weight", _take(layer.weight, keep))
    if layer.bias is not None:
        _set_param(layer, "bias", _take(layer.bias, keep))
    if isinstance(layer, nn.Conv2d):
        layer.out_channels = len(keep)
    else:
        layer.out_features = len(keep)


def _slice_depthwise(conv: nn.Conv2d, keep: Tensor) -> None:
    """Keep channels ``keep`` of a depthwise conv: its filters, and its groups with them."""
    _slice_rows(conv, keep)
    conv.in_channels = conv.groups = len(keep)


def slice_norm(norm: nn.Module, keep: Tensor) -> None:
    """Keep entries ``keep`` of a per-channel module (BatchNorm, a skipped block's shift): every
    parameter and every per-channel buffer (running statistics); a LayerNorm keeps normalising by its
    first width (:mod:`~napkit.structured.norms`)."""
    for name, p in list(norm.named_parameters(recurse=False)):
        _set_param(norm, name, _take(p, keep))
    for name, b in list(norm.named_buffers(recurse=False)):
        if b.dim() > 0:
            setattr(norm, name, _take(b, keep))
    set_norm_width(norm, len(keep))


def _slice_columns(layer: nn.Module, keep: Tensor, block: int) -> None:
    """Keep input channels ``keep`` of a consumer: conv input channels (of a grouped conv: the same
    positions in every group), or Linear column blocks."""
    if isinstance(layer, nn.Conv2d):
        width = layer.in_channels // layer.groups
        _set_param(layer, "weight", _take(layer.weight, keep[: len(keep) // layer.groups] % width, 1))
        layer.in_channels = len(keep)
        return
    cols = (keep[:, None] * block + torch.arange(block)).reshape(-1)
    _set_param(layer, "weight", _take(layer.weight, cols, 1))
    layer.in_features = len(cols)


def _keep_index(keep: Tensor | Sequence[int], size: int, group_id: str, *, allow_empty: bool = False) -> Tensor:
    """Validated, sorted channel indices to keep."""
    given = torch.as_tensor(keep, dtype=torch.long).reshape(-1).cpu()
    idx = torch.unique(given)  # sorted
    if idx.numel() != given.numel():
        raise NapkitError(f"keep indices of group {group_id!r} repeat a channel")
    if idx.numel() == 0:
        if allow_empty:
            return idx
        raise NapkitError(f"group {group_id!r} must keep at least one channel (only a bottleneck's conv1 or conv2 "
                          f"group may be emptied, which removes the block)")
    if int(idx[0]) < 0 or int(idx[-1]) >= size:
        raise NapkitError(
            f"keep indices of group {group_id!r} must lie in [0, {size}), got {int(idx[0])}..{int(idx[-1])}"
        )
    return idx


def _checked_keep(model: nn.Module, group: ChannelGroup, keep: Tensor | Sequence[int]) -> Tensor:
    """Validated keep indices of ``group``; a group through grouped convs keeps the same positions in
    every one of its fold blocks."""
    size = rows(model.get_submodule(group.producers[0]))
    if size != group.size:
        raise NapkitError(f"channel group {group.id!r} is stale: its producer has {size} channels, the group says "
                          f"{group.size}; trace the model again after each cut (channel_groups)")
    idx = _keep_index(keep, size, group.id)
    if group.fold > 1:
        positions = idx[: len(idx) // group.fold]
        even = torch.arange(group.fold)[:, None] * (size // group.fold) + positions
        if len(idx) % group.fold or not torch.equal(even.reshape(-1), idx):
            raise NapkitError(f"group {group.id!r} runs through grouped convs: it must keep the same channels in "
                              f"each of its {group.fold} blocks of {size // group.fold}")
    return idx


def _cut(model: nn.Module, chosen: Sequence[tuple[ChannelGroup, Tensor]]) -> None:
    """Remove every chosen group's channels but ``keep`` at once (in place).

    A BatchNorm or consumer reading a concatenation holds several groups' channels, each at its offset
    (:attr:`ChannelGroup.spans`); it is cut once, after its keep mask has been marked by all of them, so
    no offset moves under another group's cut.
    """
    blocks = {c.name: c.block for group, _ in chosen for c in group.consumers}  # the rest are norms
    for group, _ in chosen:  # check every reader against the model before the first cut
        for name, dim in group.params:
            if model.get_parameter(name).shape[dim] != group.size:
                raise NapkitError(f"channel group {group.id!r} is stale: parameter {name!r} has "
                                  f"{model.get_parameter(name).shape[dim]} channels, the group says {group.size}")
        for name in (*group.norms, *(c.name for c in group.consumers)):
            have = _reader_channels(model.get_submodule(name), blocks.get(name))
            if have != group.width(name):
                raise NapkitError(f"channel group {group.id!r} is stale: {name!r} reads {have} channels, the group says "
                                  f"{group.width(name)}; trace the model again after each cut (channel_groups)")
    for group, idx in chosen:
        for name in group.producers:
            _slice_rows(model.get_submodule(name), idx)
        for name in group.depthwise:
            _slice_depthwise(model.get_submodule(name), idx)
        for name, dim in group.params:
            owner, _, attr = name.rpartition(".")
            _set_param(model.get_submodule(owner), attr, _take(model.get_parameter(name), idx, dim))
    for name, gone in removed_inputs(chosen).items():
        keep, module = torch.nonzero(~gone).flatten(), model.get_submodule(name)
        if name in blocks:
            _slice_columns(module, keep, blocks[name])
        else:
            slice_norm(module, keep)
    for module in model.modules():  # widths a model reads from its attributes at run time
        if isinstance(module, VisionTransformer):  # it reshapes its patches to hidden_dim channels
            module.hidden_dim = module.conv_proj.out_channels


def _reader_channels(module: nn.Module, block: int | None) -> int:
    """Channels a norm (``block`` None) or consumer reads now: features, conv input channels or column blocks."""
    if block is None:
        return norm_width(module)
    if isinstance(module, nn.Conv2d):
        return module.in_channels
    return module.weight.shape[1] // block


def prune_channels(model: nn.Module, group: ChannelGroup, keep: Tensor | Sequence[int]) -> None:
    """Keep only channels ``keep`` of ``group`` in ``model`` (in place), removing the rest everywhere."""
    _cut(model, [(group, _checked_keep(model, group, keep))])


def apply(model: nn.Module, plan: Plan, *, groups: list[ChannelGroup] | None = None) -> nn.Module:
    """A pruned copy of ``model``: for each group id in ``plan``, keep only those channel indices.

    A bottleneck's conv1 or conv2 group may keep none: the block is then replaced by its shortcut
    (:func:`~napkit.structured.blocks.skip_block`) once every other group has lost its channels, so
    its constant is that of the masked branch.
    ``groups`` (from :func:`channel_groups` on ``model``) saves tracing again.
    """
    groups = channel_groups(model) if groups is None else groups
    blocks = bottlenecks(model)
    chosen = [(find_group(groups, gid), keep) for gid, keep in plan.items()]
    skips: dict[str, str] = {}
    kept = []
    for group, keep in chosen:
        block = block_of(group.id, blocks)
        if _keep_index(keep, group.size, group.id, allow_empty=block is not None).numel() == 0:
            skips.setdefault(block, group.id.rpartition(".")[2])  # type: ignore[arg-type]
        else:
            kept.append((group, keep))
    pruned = copy.deepcopy(model)
    _cut(pruned, [(group, _checked_keep(pruned, group, keep)) for group, keep in kept])
    for block, emptied in skips.items():
        skip_block(pruned, block, emptied)
    return pruned


def channel_counts(model: nn.Module) -> dict[str, int]:
    """Architecture description of a (pruned) model: out channels of every producer of a prunable group,
    and 0 for the conv1 and conv2 of every bottleneck reduced to its shortcut."""
    counts = {p: g.size for g in channel_groups(model) for p in g.producers}
    return counts | {f"{b}.{layer}": 0 for b in skipped_blocks(model) for layer in INNER}


def slim_to(model: nn.Module, counts: Mapping[str, int]) -> nn.Module:
    """Shrink a freshly created dense ``model`` in place to ``counts`` (first k channels of each group).

    ``counts`` comes from :func:`channel_counts` of a pruned model of the same architecture; loading
    that model's state dict into the result restores it exactly.
    """
    for block in bottlenecks(model):
        if any(counts.get(f"{block}.{layer}") == 0 for layer in INNER):
            skip_block(model, block)
    skipped = skipped_blocks(model)
    counts = {name: k for name, k in counts.items() if k != 0 or block_of(name, skipped) is None}
    # a group the description leaves out kept every channel (the pruned model's tracing did not offer it)
    groups = [g for g in channel_groups(model) if any(p in counts for p in g.producers)]
    extra = sorted(set(counts) - {p for g in groups for p in g.producers})
    if extra:
        raise NapkitError(f"channel counts do not describe this {type(model).__name__}: unknown layers {extra}")
    chosen = []
    for g in groups:
        sizes = {counts.get(p, -1) for p in g.producers}  # -1: a coupled layer the description misses
        if len(sizes) != 1:
            raise NapkitError(
                f"coupled layers {list(g.producers)} need one channel count, got {sorted(sizes)}"
            )
        k = sizes.pop()
        if not 1 <= k <= g.size:
            raise NapkitError(f"group {g.id!r} has {g.size} channels; cannot slim it to {k}")
        if k < g.size:  # the first k / fold channels of every block
            block = g.size // g.fold
            if k % g.fold:
                raise NapkitError(f"group {g.id!r} runs through grouped convs: {k} is not a multiple of {g.fold}")
            keep = torch.arange(g.fold)[:, None] * block + torch.arange(k // g.fold)
            chosen.append((g, keep.reshape(-1)))
    _cut(model, chosen)
    return model


def _norms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    batch_norm = nn.modules.batchnorm._BatchNorm
    return [m for m in model.modules() if isinstance(m, batch_norm) and m.track_running_stats]


@torch.no_grad()
def recalibrate_bn(model: nn.Module, loader: Iterable[Sequence[Tensor]], num_batches: int) -> nn.Module:
    """Re-estimate every BatchNorm's running statistics from ``num_batches`` batches (in place).

    Statistics are reset and averaged exactly (momentum None); only the BatchNorms run in train
    mode, so dropout stays off. Modes and momenta are restored afterwards.
    """
    if num_batches < 1:
        raise NapkitError(f"num_batches must be >= 1, got {num_batches}")
    norms = _norms(model)
    if not norms:
        return model
    momenta = [(m, m.momentum) for m in norms]
    device = next(model.parameters()).device
    seen = 0
    with modes_kept(model):
        try:
            model.eval()
            for m in norms:
                m.reset_running_stats()
                m.momentum = None
                m.train()
            for batch in loader:
                if seen == num_batches:
                    break
                model(batch[0].to(device))
                seen += 1
        finally:
            for m, momentum in momenta:
                m.momentum = momentum
    if seen == 0:
        raise NapkitError("the loader yielded no batches; cannot recalibrate BatchNorm statistics")
    return model
