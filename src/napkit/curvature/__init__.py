"""Curvature stage: K-FAC factors of every prunable layer (nap.md section 1)."""

from napkit.curvature.factors import KFACFactors, weight_with_bias
from napkit.curvature.kfac import (
    FISHER_TYPES,
    a_block_size,
    all_reduce_factors,
    conv_patches,
    estimate_kfac,
    lattice_step,
    merge_factors,
    sample_labels,
)
from napkit.curvature.storage import load_factors, model_fingerprint, save_factors, shape_fingerprint

__all__ = [
    "FISHER_TYPES",
    "KFACFactors",
    "a_block_size",
    "all_reduce_factors",
    "conv_patches",
    "estimate_kfac",
    "lattice_step",
    "load_factors",
    "merge_factors",
    "model_fingerprint",
    "sample_labels",
    "save_factors",
    "shape_fingerprint",
    "weight_with_bias",
]
