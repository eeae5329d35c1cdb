"""napkit: automatic, reproducible neural-network pruning (NAP, CHEX and baselines).

``napkit.prune(model, train_data, val_data, ...)`` prunes a trained model from Python and
``napkit.curvature_factors(model, train_data)`` estimates its K-FAC factors (:mod:`napkit.api`);
the pipeline's stages run the same code.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["PruneResult", "curvature_factors", "prune"]


def __getattr__(name: str) -> Any:
    """Import the API on first use, so ``import napkit.<module>`` stays light."""
    if name in __all__:
        from napkit import api

        return getattr(api, name)
    raise AttributeError(f"module 'napkit' has no attribute {name!r}")
