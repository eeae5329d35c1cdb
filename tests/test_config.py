"""The real configs: every option of every group composes and builds; params.yaml never drifts."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf import OmegaConf

from napkit.config import write_params
from napkit.models import create_model
from napkit.pruning.fine_grained import target_sparsity
from napkit.pruning.importance import create_importance
from napkit.structured import create_channel_importance

ROOT = Path(__file__).resolve().parents[1]
GROUPS = sorted(p.name for p in (ROOT / "conf").iterdir() if p.is_dir())
OVERRIDE_KEY = {"structured": "structured@prune.structured"}  # groups placed under another package


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (ROOT / "conf" / group).glob("*.yaml"))


def test_params_yaml_is_the_composed_default(tmp_path: Path) -> None:
    fresh = write_params(ROOT, tmp_path / "params.yaml")
    assert yaml.safe_load(fresh.read_text()) == yaml.safe_load((ROOT / "params.yaml").read_text()), (
        "params.yaml is stale: run `python -m napkit.config` after editing conf/"
    )


def test_groups_are_the_documented_ones() -> None:
    assert {"model", "data", "train", "curvature", "prune", "finetune", "tracking"} <= set(GROUPS)
    assert {"alexnet", "vgg16", "resnet50", "alexnet_small", "vgg16_small", "resnet50_small"} <= set(_options("model"))
    assert {"digits", "mnist", "cifar10", "imagenet"} <= set(_options("data"))


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in _options(g)])
def test_every_option_composes(compose_cfg, group: str, option: str) -> None:
    cfg = compose_cfg(f"{OVERRIDE_KEY.get(group, group)}={option}")
    OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    if group == "model":
        kwargs = OmegaConf.to_container(cfg.model, resolve=True)
        name = kwargs.pop("name")
        kwargs.pop("pretrained", None)
        size = 224 if not name.endswith("_small") else 32
        assert create_model(name, num_classes=10, in_channels=3, input_size=size, **kwargs) is not None
    if group == "prune" and cfg.prune.mode == "fine_grained":
        create_importance(cfg.prune.method, **({"damping": cfg.prune.damping} if "damping" in cfg.prune else {}))
        target_sparsity(cfg.prune.target_sparsity, cfg.prune.target_compression)
    if group == "prune" and cfg.prune.mode == "structured":
        create_channel_importance(cfg.prune.method)


def test_unknown_option_names_the_valid_ones(compose_cfg) -> None:
    with pytest.raises((MissingConfigException, ConfigCompositionException)) as err:
        compose_cfg("model=lenet9000")
    message = str(err.value)
    assert "lenet9000" in message and "vgg16_small" in message


def test_dvc_params_mirror_the_stage_dependencies() -> None:
    """dvc.yaml's per-stage params are exactly what each stage reads (STAGE_PARAMS)."""
    from napkit.stages import STAGE_PARAMS

    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert {name: tuple(stage["params"]) for name, stage in stages.items()} == STAGE_PARAMS


def test_content_addressed_dirs_share_upstream_stages(compose_cfg) -> None:
    from napkit.stages.common import stage_dir

    a = compose_cfg("paths.content_addressed=true", "prune=nap")
    b = compose_cfg("paths.content_addressed=true", "prune=magnitude")
    c = compose_cfg("paths.content_addressed=true", "prune=nap", "train.epochs=3")
    assert stage_dir(a, "pretrain") == stage_dir(b, "pretrain") and stage_dir(a, "curvature") == stage_dir(b, "curvature")
    assert stage_dir(a, "prune") != stage_dir(b, "prune")
    assert stage_dir(a, "pretrain") != stage_dir(c, "pretrain") and stage_dir(a, "evaluate") != stage_dir(c, "evaluate")
