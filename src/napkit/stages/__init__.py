"""The pipeline's stages as library functions: ``run(cfg) -> metrics``.

``pipelines/<stage>.py`` wraps each in a Hydra entrypoint; sweeps call them directly.
Each stage reads the previous stage's folder under ``paths.artifacts`` and writes its own.
"""

STAGES = ("pretrain", "curvature", "prune", "finetune", "evaluate")

# Top-level config sections each stage reads besides its inputs (dvc.yaml's `params`, tested equal;
# seed and data for the splits every stage loads).
# A stage's results depend on its own keys and those of every stage before it.
STAGE_PARAMS: dict[str, tuple[str, ...]] = {
    "pretrain": ("seed", "model", "data", "train"),
    "curvature": ("seed", "data", "curvature"),
    "prune": ("seed", "data", "curvature", "prune", "finetune"),  # curvature: re-estimated per iteration
    "finetune": ("seed", "data", "finetune"),
    "evaluate": ("seed", "data", "evaluate"),
}
