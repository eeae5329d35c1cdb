"""CHEX: prune and regrow channels while training from scratch (docs/chex.md; Hou et al., CVPR 2022).

``train_chex`` trains a freshly built model under a channel budget, exploring (CSS pruning +
importance-sampled regrowth with MRU re-initialisation) at the scheduled epochs; ``compact``
turns the masked model into a physically smaller one with :func:`napkit.structured.surgery.apply`.
"""

from napkit.chex.budget import layer_budgets, layer_scores
from napkit.chex.css import css_keep, filter_matrix, l1_keep, leverage_scores
from napkit.chex.explorer import Explorer, StepRecord, compact, sparsity_for_flops
from napkit.chex.masks import ChannelMasks, ChexLayer, channel_tensors, chex_layers
from napkit.chex.regrow import (
    REGROWTH,
    REINIT,
    MRUBank,
    distance_from_uniform,
    projection_residuals,
    regrowth_probabilities,
    sample_regrowth,
)
from napkit.chex.schedule import Schedule
from napkit.chex.trainer import make_explorer, train_chex

__all__ = [
    "REGROWTH",
    "REINIT",
    "ChannelMasks",
    "ChexLayer",
    "Explorer",
    "MRUBank",
    "Schedule",
    "StepRecord",
    "channel_tensors",
    "chex_layers",
    "compact",
    "css_keep",
    "distance_from_uniform",
    "filter_matrix",
    "l1_keep",
    "layer_budgets",
    "layer_scores",
    "leverage_scores",
    "make_explorer",
    "projection_residuals",
    "regrowth_probabilities",
    "sample_regrowth",
    "sparsity_for_flops",
    "train_chex",
]
