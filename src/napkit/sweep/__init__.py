"""Sweeps: the whole chain for one configuration, cached by content, and the Hydra callback that
groups a multirun under one MLflow parent run (``pipelines/run.py -m ...``)."""

from napkit.sweep.chain import SWEEP_FILE, ChainResult, read_sweep_info, run_chain

__all__ = ["SWEEP_FILE", "ChainResult", "read_sweep_info", "run_chain"]
