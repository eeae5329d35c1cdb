"""K-FAC factors of every prunable layer and grouped conv (nap.md section 1)."""

from napkit.curvature.factors import KFACFactors, weight_with_bias
from napkit.curvature.grouped import group_key, group_weight, split_key
from napkit.curvature.kfac import (
    FISHER_TYPES,
    LayersNotRunWarning,
    a_block_size,
    all_reduce_factors,
    estimate_kfac,
    estimated_layers,
    merge_factors,
    sample_labels,
)
from napkit.curvature.patches import conv_patches, lattice_step
from napkit.curvature.storage import load_factors, model_fingerprint, save_factors, shape_fingerprint

__all__ = [
    "FISHER_TYPES",
    "KFACFactors",
    "LayersNotRunWarning",
    "a_block_size",
    "all_reduce_factors",
    "conv_patches",
    "estimate_kfac",
    "estimated_layers",
    "group_key",
    "group_weight",
    "lattice_step",
    "load_factors",
    "merge_factors",
    "model_fingerprint",
    "sample_labels",
    "save_factors",
    "shape_fingerprint",
    "split_key",
    "weight_with_bias",
]
