"""Shared body of the ``pipelines/<stage>.py`` Hydra entrypoints: run a stage, report bad input in one line."""

from __future__ import annotations

import importlib
import logging
import sys

from omegaconf import DictConfig

from napkit.distributed import init_from_env, shutdown
from napkit.errors import NapkitError
from napkit.stages import STAGES

log = logging.getLogger("napkit")


def run_stage(stage: str, cfg: DictConfig) -> dict[str, float]:
    """Run ``napkit.stages.<stage>.run(cfg)``; a NapkitError exits with status 2 and one clear line."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; valid: {', '.join(STAGES)}")
    module = importlib.import_module(f"napkit.stages.{stage}")
    try:
        init_from_env(str(cfg.get("distributed", {}).get("backend", "auto")))
        metrics = module.run(cfg)
    except NapkitError as exc:
        print(f"napkit {stage}: error: {exc}", file=sys.stderr)
        sys.exit(2)
    finally:
        shutdown()
    if not metrics:  # ranks other than 0 report nothing
        return metrics
    log.info("%s done: %s", stage, ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
    return metrics
