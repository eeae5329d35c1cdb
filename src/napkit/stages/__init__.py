"""The pipeline's stages as library functions: ``run(cfg) -> metrics``.

``pipelines/<stage>.py`` wraps each in a Hydra entrypoint; sweeps call them directly.
Each stage reads the previous stage's folder under ``paths.artifacts`` and writes its own.
"""

STAGES = ("pretrain", "curvature", "prune", "finetune", "evaluate")
