"""Structured (channel) pruning: channel groups by tracing, scores, physical removal, one pruning step."""

from napkit.structured.groups import (
    ChannelGroup,
    Consumer,
    Tracing,
    UnprunedLayersWarning,
    channel_groups,
    find_group,
    saved_flops,
    trace_groups,
    warn_unpruned,
)
from napkit.structured.importance import (
    ChannelImportance,
    ScoreInputs,
    channel_importance_class,
    column_terms,
    create_channel_importance,
    list_channel_importances,
    register_channel_importance,
    row_terms,
)
from napkit.structured.pruner import ALLOCATIONS, CostModel, StructuredPruner, count_flops, count_params
from napkit.structured.surgery import apply, channel_counts, prune_channels, recalibrate_bn, slim_to

__all__ = [
    "ALLOCATIONS",
    "ChannelGroup",
    "ChannelImportance",
    "Consumer",
    "CostModel",
    "ScoreInputs",
    "StructuredPruner",
    "Tracing",
    "UnprunedLayersWarning",
    "apply",
    "channel_counts",
    "channel_groups",
    "channel_importance_class",
    "column_terms",
    "count_flops",
    "count_params",
    "create_channel_importance",
    "find_group",
    "list_channel_importances",
    "prune_channels",
    "recalibrate_bn",
    "register_channel_importance",
    "row_terms",
    "saved_flops",
    "slim_to",
    "trace_groups",
    "warn_unpruned",
]
