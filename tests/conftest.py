"""Shared fixtures: the repository root and Hydra compositions of the real ``conf/``."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

ROOT = Path(__file__).resolve().parents[1]

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return ROOT


@pytest.fixture
def compose_cfg() -> Callable[..., DictConfig]:
    """Compose ``conf/config.yaml`` with overrides, as a stage entrypoint would."""

    def _compose(*overrides: str) -> DictConfig:
        with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
            return compose("config", overrides=list(overrides))

    return _compose
