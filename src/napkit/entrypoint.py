"""Shared body of the ``pipelines/<stage>.py`` Hydra entrypoints: run a stage, report bad input in one line."""

from __future__ import annotations

import importlib
import logging
import sys
from collections.abc import Callable

from omegaconf import DictConfig

from napkit.distributed import init_from_env, shutdown
from napkit.errors import NapkitError
from napkit.stages import STAGES

log = logging.getLogger("napkit")


def run_stage(stage: str, cfg: DictConfig,
              runner: Callable[[DictConfig], dict[str, float]] | None = None) -> dict[str, float]:
    """Run ``runner(cfg)`` (default ``napkit.stages.<stage>.run``) under torchrun's process group
    if any; a NapkitError exits with status 2 and one clear line."""
    if runner is None:
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}; valid: {', '.join(STAGES)}")
        runner = importlib.import_module(f"napkit.stages.{stage}").run
    try:
        main_rank = init_from_env(str(cfg.get("distributed", {}).get("backend", "auto"))).is_main
        metrics = runner(cfg)
    except NapkitError as exc:
        print(f"napkit {stage}: error: {exc}", file=sys.stderr)
        sys.exit(2)
    finally:
        shutdown()
    if not metrics or not main_rank:  # one report per job, from rank 0
        return metrics
    log.info("%s done: %s", stage, ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
    return metrics
