"""The pipeline's stages as library functions: ``run(cfg) -> metrics``.

``pipelines/<stage>.py`` wraps each in a Hydra entrypoint; sweeps call them directly.
Each stage reads the previous stage's folder under ``paths.artifacts`` and writes its own.
Two flows share the machinery, chosen by the top-level ``pipeline`` key: ``nap`` prunes a trained
model, ``chex`` trains a compact one from scratch (CHEX, docs/chex.md).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

STAGES = ("pretrain", "curvature", "prune", "finetune", "evaluate")
CHEX_STAGES = ("chex_train", "chex_compact", "chex_evaluate")
FLOWS: dict[str, tuple[str, ...]] = {"nap": STAGES, "chex": CHEX_STAGES}

# Top-level config sections each stage reads besides its inputs (dvc.yaml's `params`, tested equal;
# seed and data for the splits every stage loads).
# A stage's results depend on its own keys and those of every stage before it in its flow.
STAGE_PARAMS: dict[str, tuple[str, ...]] = {
    "pretrain": ("seed", "model", "data", "train"),
    "curvature": ("seed", "data", "curvature"),
    "prune": ("seed", "data", "curvature", "prune", "finetune"),  # curvature: re-estimated per iteration
    "finetune": ("seed", "data", "prune", "finetune"),  # prune.one_shot: nothing to fine-tune
    "evaluate": ("seed", "data", "evaluate"),
    "chex_train": ("seed", "model", "data", "chex"),
    "chex_compact": ("seed", "data", "chex"),
    "chex_evaluate": ("seed", "data", "evaluate"),
}


def flow_of(stage: str) -> tuple[str, ...]:
    """The flow a stage belongs to."""
    for flow in FLOWS.values():
        if stage in flow:
            return flow
    raise ValueError(f"unknown stage {stage!r}; valid: {', '.join(s for f in FLOWS.values() for s in f)}")


def stage_runner(stage: str) -> Callable[[Any], dict[str, float]]:
    """``run(cfg)`` of a stage (the CHEX stages share one module)."""
    flow_of(stage)
    if stage in CHEX_STAGES:
        module = importlib.import_module("napkit.stages.chex")
        return lambda cfg: module.run(cfg, stage)
    return importlib.import_module(f"napkit.stages.{stage}").run
