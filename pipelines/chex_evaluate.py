"""DVC stage `chex_evaluate` as a Hydra entrypoint (logic: `napkit.stages.chex`).

Alone: `python pipelines/chex_evaluate.py [overrides]` composes `conf/`.
Under DVC (chex/dvc.yaml, wdir ..): `--config-dir . --config-name params` runs on the tracked `params.yaml`.
"""

import hydra
from omegaconf import DictConfig

from napkit.entrypoint import run_stage
from napkit.stages.chex import run


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_stage("chex_evaluate", cfg, lambda c: run(c, "chex_evaluate"))


if __name__ == "__main__":
    main()
