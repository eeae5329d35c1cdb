"""DVC stage `evaluate` as a Hydra entrypoint (logic: `napkit.stages.evaluate`).

Alone: `python pipelines/evaluate.py [overrides]` composes `conf/`.
Under DVC: `--config-dir . --config-name params` runs on the tracked `params.yaml`.
"""

import hydra
from omegaconf import DictConfig

from napkit.entrypoint import check_command_line, run_stage


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_stage("evaluate", cfg)


if __name__ == "__main__":
    check_command_line("evaluate", __file__)  # a bad config group option: one line, before Hydra
    main()
