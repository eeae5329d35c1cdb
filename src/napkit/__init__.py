"""napkit: automatic, reproducible neural-network pruning (NAP, CHEX and baselines)."""

__version__ = "0.1.0"
