"""Every bad input of issue 8 (item 3) stops with one clear message, and no earlier output is lost.

Each test starts from a copy of a finished tiny pipeline (pretrain, curvature, prune, finetune on
LeNet-5), feeds one stage one bad input, checks the message, and checks that every file of the
earlier run is byte for byte what it was and that no temporary file was left behind. Two cases run
the entrypoint in a subprocess for the exit status and stderr; the rest call the stage in-process.
"""

from __future__ import annotations

import logging
import math
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from napkit.entrypoint import bad_group_override
from napkit.errors import NapkitError
from napkit.io import load_tensors, load_torch, save_tensors
from napkit.stages import curvature, finetune, pretrain, prune
from napkit.stages.common import checkpoint_path, load_splits, model_spec
from napkit.training.trainer import fit

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model=lenet5", "data.subset_train=256", "train.epochs=1", "finetune.epochs=1", "prune=nap",
        "prune.max_iterations=1", "prune.finetune_epochs=1", "prune.tolerance=100", "curvature.num_samples=64",
        "tracking=disabled"]
OTHER = ["model=vgg16_small", "model.width=0.0625"]  # "another model"
MODELS = ("alexnet", "alexnet_small", "lenet5", "resnet50", "resnet50_small", "vgg16", "vgg16_bn", "vgg16_small")


def _compose(artifacts: Path, *overrides: str) -> DictConfig:
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=[*TINY, f"paths.artifacts={artifacts}", *overrides])


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> tuple[Path, Path]:
    """A finished LeNet-5 pipeline, and the pretrain + curvature outputs of a different model."""
    base = tmp_path_factory.mktemp("bad_input")
    good, other = base / "good", base / "other"
    cfg = _compose(good)
    for stage in (pretrain, curvature, prune, finetune):
        stage.run(cfg)
    cfg = _compose(other, *OTHER)
    for stage in (pretrain, curvature):
        stage.run(cfg)
    return good, other


@pytest.fixture
def artifacts(finished, tmp_path) -> Path:
    """A fresh copy of the finished pipeline's artifacts."""
    shutil.copytree(finished[0], tmp_path / "artifacts")
    return tmp_path / "artifacts"


@pytest.fixture
def unchanged(artifacts) -> Callable[..., None]:
    """``unchanged(*except_)``: every file of the earlier run is as it was (bar ``except_``), no temp files."""
    before = _snapshot(artifacts)

    def check(*except_: str) -> None:
        after = _snapshot(artifacts)
        leftovers = [p for p in after if p.endswith(".tmp")]
        assert not leftovers, f"temporary files left behind: {leftovers}"
        for name, data in before.items():
            if name not in except_:
                assert after.get(name) == data, f"{name} was changed or lost"
        new = sorted(set(after) - set(before))
        assert not new, f"files written despite the bad input: {new}"

    return check


def _entrypoint(stage: str, artifacts: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_RUN_ID", None)
    cmd = [sys.executable, str(ROOT / "pipelines" / f"{stage}.py"), *TINY, f"paths.artifacts={artifacts}",
           f"hydra.run.dir={artifacts.parent / 'hydra'}", "hydra.output_subdir=null", *overrides]
    return subprocess.run(cmd, cwd=artifacts.parent, env=env, capture_output=True, text=True, timeout=300)


# --- unknown names --------------------------------------------------------------------------------


@pytest.mark.slow
def test_unknown_config_group_option_exits_with_one_line(artifacts, unchanged) -> None:
    proc = _entrypoint("pretrain", artifacts, "model=lenet9000")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "napkit pretrain: error: invalid override 'model=lenet9000': no option 'lenet9000' in config group "
        f"'model'; valid choices: {', '.join(MODELS)}"], proc.stderr
    unchanged()


@pytest.mark.parametrize("argv,bad", [
    (["model=lenet5", "prune=magnitude", "structured@prune.structured=default", "tracking=disabled"], None),
    (["--config-dir", ".", "--config-name", "params", "hydra.run.dir=.", "hydra/job_logging=stdout"], None),
    (["prune.method=anything", "model.width=0.5", "model=lenet5,vgg16_small", "+model@extra=lenet5"], None),
    (["hydra/launcher=joblib", "model=null"], None),
    (["model=lenet5", "data=svhn"], "'data=svhn': no option 'svhn' in config group 'data'; valid choices: "
                                    "cifar10, digits, imagenet, mnist"),
    (["+structured@prune.structured=wide"], "no option 'wide' in config group 'structured'; valid choices: default"),
])
def test_bad_group_override_is_found_before_hydra(argv: list[str], bad: str | None) -> None:
    message = bad_group_override(argv, [ROOT / "conf"])
    assert message is None if bad is None else bad in message


@pytest.mark.slow
def test_unknown_method_exits_with_one_line(artifacts, unchanged) -> None:
    proc = _entrypoint("prune", artifacts, "prune.method=obs_magic")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert errors == [errors[0]] and errors[0].startswith("napkit prune: error: unknown"), proc.stderr
    assert "'obs_magic'" in errors[0] and re.search(r"valid choices: .*magnitude.*nap", errors[0])
    unchanged()


@pytest.mark.parametrize("stage,override,message", [
    (pretrain, "model.name=vgg17", r"unknown model 'vgg17'; valid choices: .*lenet5.*vgg16_small"),
    (pretrain, "data.name=svhn", r"unknown dataset 'svhn'; valid choices: cifar10, digits, imagenet, mnist"),
    (pretrain, "device=tpu", r"unknown device 'tpu'; valid choices: auto, cpu"),
    (prune, "prune.mode=channels", r"unknown prune.mode 'channels'; valid choices: fine_grained, structured"),
    (prune, "prune.method=obd_magic", r"unknown .*'obd_magic'; valid choices: .*magnitude.*nap"),
    (prune, "prune.allocation=local", r"unknown allocation 'local'; valid choices: global, uniform"),
], ids=["model", "dataset", "device", "prune_mode", "method", "allocation"])
def test_unknown_name_in_a_stage_names_the_valid_ones(artifacts, unchanged, stage, override: str,
                                                      message: str) -> None:
    with pytest.raises(NapkitError, match=message):
        stage.run(_compose(artifacts, override))
    unchanged()


# --- data -----------------------------------------------------------------------------------------


def test_missing_data_root_is_named(artifacts, unchanged, tmp_path) -> None:
    missing = tmp_path / "no_imagenet"
    with pytest.raises(NapkitError, match=f"{re.escape(str(missing / 'train'))} not found; expected layout"):
        pretrain.run(_compose(artifacts, "data=imagenet", f"data.root={missing}"))
    with pytest.raises(NapkitError, match=f"MNIST not found in {re.escape(str(tmp_path / 'MNIST'))}"):
        pretrain.run(_compose(artifacts, "data=mnist", "data.download=false", f"data.root={tmp_path}"))
    unchanged()


def test_data_root_with_the_wrong_layout_is_named(artifacts, unchanged, tmp_path) -> None:
    root = tmp_path / "cifar"
    (root / "train").mkdir(parents=True)
    (root / "train" / "0001.png").write_bytes(b"not in a class folder")
    with pytest.raises(NapkitError, match=r"expected layout .*train/<class>/"):
        pretrain.run(_compose(artifacts, "data=cifar10", "data.format=imagefolder", f"data.root={root}",
                              f"paths.cache={tmp_path / 'cache'}"))
    unchanged()


# --- model, factor and checkpoint files -----------------------------------------------------------


def test_model_file_from_another_model_is_refused(artifacts, unchanged, finished) -> None:
    shutil.copy(finished[1] / "pretrain" / "model.safetensors", artifacts / "pretrain" / "model.safetensors")
    with pytest.raises(NapkitError, match=r"model.safetensors does not fit model 'lenet5'"):
        curvature.run(_compose(artifacts))
    unchanged("pretrain/model.safetensors")


def test_truncated_model_file_is_refused(artifacts, unchanged) -> None:
    path = artifacts / "pretrain" / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(NapkitError, match=f"corrupt safetensors file {re.escape(str(path))}"):
        prune.run(_compose(artifacts))
    unchanged("pretrain/model.safetensors")


def test_factor_file_from_another_model_is_refused(artifacts, unchanged, finished) -> None:
    shutil.copy(finished[1] / "curvature" / "factors.safetensors", artifacts / "curvature" / "factors.safetensors")
    with pytest.raises(NapkitError, match=r"factors.safetensors.*(layer|shape)"):
        prune.run(_compose(artifacts))
    unchanged("curvature/factors.safetensors")


def test_truncated_factor_file_is_refused(artifacts, unchanged) -> None:
    path = artifacts / "curvature" / "factors.safetensors"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(NapkitError, match=f"corrupt safetensors file {re.escape(str(path))}"):
        prune.run(_compose(artifacts))
    unchanged("curvature/factors.safetensors")


def test_truncated_resume_checkpoint_is_named(artifacts, unchanged) -> None:
    cfg = _compose(artifacts)
    path = checkpoint_path(cfg, "pretrain")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(NapkitError, match=f"cannot load checkpoint {re.escape(str(path))}.*delete it"):
        pretrain.run(cfg)
    unchanged(str(path.relative_to(artifacts)))


def test_resume_checkpoint_of_another_model_is_ignored(artifacts, finished, caplog) -> None:
    """A resume checkpoint of another configuration is never loaded: the stage warns and starts over."""
    cfg = _compose(artifacts)
    reference = (artifacts / "pretrain" / "model.safetensors").read_bytes()
    shutil.copy(finished[1] / "checkpoints" / "pretrain.pt", checkpoint_path(cfg, "pretrain"))
    with caplog.at_level(logging.WARNING):
        pretrain.run(cfg)
    assert "ignoring checkpoint" in caplog.text and "from another configuration" in caplog.text
    assert (artifacts / "pretrain" / "model.safetensors").read_bytes() == reference  # retrained, identically


def test_finetune_never_resumes_the_checkpoint_of_another_pruned_model(artifacts, caplog) -> None:
    """The prune stage reran and wrote a different model (same config): the finished fine-tune
    checkpoint belongs to the old one and must not be resumed (it would bring the old weights back)."""
    before = load_tensors(artifacts / "finetune" / "model.safetensors")
    weights = load_tensors(artifacts / "prune" / "model.safetensors")
    save_tensors(artifacts / "prune" / "model.safetensors", {k: v * 0.5 for k, v in weights.items()})
    with caplog.at_level(logging.WARNING):
        finetune.run(_compose(artifacts))
    assert "ignoring checkpoint" in caplog.text
    after = load_tensors(artifacts / "finetune" / "model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before)


class _Payload:
    """Unpickling this runs code: it creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("stage,checkpoint", [(pretrain, "pretrain"), (prune, "prune_loop"),
                                              (finetune, "finetune")])
def test_checkpoint_with_pickled_code_is_refused(artifacts, unchanged, tmp_path, stage, checkpoint: str) -> None:
    cfg = _compose(artifacts)
    path = checkpoint_path(cfg, checkpoint)
    marker = tmp_path / "code_ran"
    torch.save({"fingerprint": "x", "epoch": 1, "model": _Payload(marker)}, path)
    with pytest.raises(NapkitError, match=f"cannot load checkpoint {re.escape(str(path))} with weights_only=True"):
        stage.run(cfg)
    assert not marker.exists(), "the checkpoint's code ran"
    unchanged(str(path.relative_to(artifacts)))
    torch.load(path, weights_only=False)  # the payload is live: loading it unsafely runs it
    assert marker.exists()


# --- pruning target -------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides,message", [
    (("prune.target_sparsity=0.95", "prune.max_layer_sparsity=0.5"),
     r"target sparsity 0.95 cannot be reached: with max_layer_sparsity=0.5 .* at most 0.5 \(compression 2x\)"),
    (("prune.target_sparsity=null", "prune.target_compression=1000"),
     r"target sparsity 0.999 cannot be reached: with max_layer_sparsity=0.99"),
    (("prune.target_sparsity=1.0",), r"prune.target_sparsity must be in \[0, 1\), got 1.0"),
], ids=["layer_cap", "compression", "all_weights"])
def test_unreachable_pruning_target_fails_before_the_loop(artifacts, unchanged, overrides, message: str) -> None:
    with pytest.raises(NapkitError, match=message):
        prune.run(_compose(artifacts, *overrides))
    unchanged()


# --- training diverges ----------------------------------------------------------------------------


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(artifacts) -> None:
    """Epoch 1 is checkpointed; the weights then turn NaN: epoch 2 stops with a clear error before any
    update, and the checkpoint still holds epoch 1's finite weights, from which a rerun resumes."""
    cfg = _compose(artifacts, "train.epochs=3")
    splits = load_splits(cfg)
    ckpt = artifacts / "checkpoints" / "diverging.pt"

    def train(on_epoch: Callable[[int, dict], None] | None = None) -> torch.nn.Module:
        torch.manual_seed(0)
        model = model_spec(cfg, splits).build()

        def poison(epoch: int, row: dict) -> None:
            if on_epoch is not None:
                on_epoch(epoch, row)
            if epoch == 1 and on_epoch is not None:
                with torch.no_grad():
                    next(model.parameters()).fill_(math.nan)

        fit(model, splits.train, splits.val, cfg=cfg.train, batch_size=64, eval_batch_size=256, seed=0,
            device=torch.device("cpu"), checkpoint=ckpt, on_epoch=poison, progress=False)
        return model

    with pytest.raises(NapkitError, match=r"train 2/3: loss became nan \(try a lower learning rate\); stopped"):
        train(on_epoch=lambda epoch, row: None)
    state = load_torch(ckpt)
    assert state["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    model = train()  # the rerun resumes from the good epoch 1
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert load_torch(ckpt)["epoch"] == 3


def test_diverging_stage_keeps_the_previous_outputs(artifacts, unchanged) -> None:
    """A learning rate that blows the loss up in epoch 1 stops pretrain; nothing of the earlier run is lost."""
    with pytest.raises(NapkitError, match=r"pretrain 1/1: loss became (nan|inf)"):
        pretrain.run(_compose(artifacts, "train.optimizer.lr=1e12"))
    unchanged()
