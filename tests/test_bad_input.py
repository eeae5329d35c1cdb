"""Every bad input of issues 8 and 19 stops with one clear message, and no earlier output is lost.

Each test starts from a copy of a finished tiny pipeline (pretrain, curvature, prune, finetune on
LeNet-5), feeds one stage one bad input, checks the message, and checks that every file of the
earlier run is byte for byte what it was and that no temporary file was left behind.

The table-driven cases (``CONFIG_CASES``, ``PROBE_CASES``, ``FILE_CASES``) go through
``napkit.entrypoint.run_stage`` in-process, as the Hydra entrypoints do: each asserts exit status 2,
exactly one stderr line naming the cause, and the earlier outputs intact. A few cases run the real
entrypoint in a subprocess (exit status, stderr, SIGTERM with MLflow's KILLED status, a concurrent
run refused by the lock); kills between the writes of an output set are injected by monkeypatching.
"""

from __future__ import annotations

import logging
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from napkit.artifacts import MASKS, MODEL_JSON, MODEL_WEIGHTS, load_model, save_model, sha256
from napkit.entrypoint import bad_group_override, run_stage
from napkit.errors import NapkitError
from napkit.io import load_tensors, load_torch, read_json, save_tensors, write_json
from napkit.stages import curvature, finetune, pretrain, prune
from napkit.stages.common import checkpoint_path, load_splits, model_spec
from napkit.training.trainer import fit

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model=lenet5", "data.subset_train=256", "train.epochs=1", "finetune.epochs=1", "prune=nap",
        "prune.max_iterations=1", "prune.finetune_epochs=1", "prune.tolerance=100", "curvature.num_samples=64",
        "tracking=disabled"]
OTHER = ["model=vgg16_small", "model.width=0.0625"]  # "another model"
MODELS = sorted(p.stem for p in (ROOT / "conf" / "model").glob("*.yaml"))  # the config group's options


def _compose(artifacts: Path, *overrides: str) -> DictConfig:
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=[*TINY, f"paths.artifacts={artifacts}", *overrides])


def _snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` but the stage locks (empty files that hold no output)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.parent.name != ".locks"}


def _rehash(folder: Path) -> None:
    """Make model.json list the current hashes of its files: a consistent set with the bad content."""
    saved = read_json(folder / MODEL_JSON)
    saved["files"] = {name: sha256(folder / name) for name in saved["files"]}
    write_json(folder / MODEL_JSON, saved)


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
    assert errors == [errors[0]], proc.stderr
    assert errors[0].startswith("napkit prune: error: prune.method=obs_magic: "), proc.stderr
    assert re.search(r"allowed: one of .*magnitude.*nap", errors[0])
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
    _rehash(artifacts / "pretrain")
    with pytest.raises(NapkitError, match=r"model.safetensors does not fit model 'lenet5'"):
        curvature.run(_compose(artifacts))
    unchanged("pretrain/model.safetensors", "pretrain/model.json")


def test_truncated_model_file_is_refused(artifacts, unchanged) -> None:
    path = artifacts / "pretrain" / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(NapkitError, match=f"{re.escape(str(path))} does not match the sha256 in model.json"):
        prune.run(_compose(artifacts))
    _rehash(artifacts / "pretrain")  # even listed with its own hash, the truncated file is refused
    with pytest.raises(NapkitError, match=f"corrupt safetensors file {re.escape(str(path))}"):
        prune.run(_compose(artifacts))
    unchanged("pretrain/model.safetensors", "pretrain/model.json")


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
    _rehash(artifacts / "prune")
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

    diverged = (r"train 2/3: loss became nan \(features\.0 has NaN/Inf weights\) \(try a lower learning rate\); "
                r"stopped")
    with pytest.raises(NapkitError, match=diverged):
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


# --- issue 19: the table. Every case runs through run_stage: exit 2, one line, outputs intact -------


def _run_stage(stage: str, cfg: DictConfig, capsys) -> tuple[int | None, list[str]]:
    """(exit status, stderr lines) of ``run_stage`` in-process, as the Hydra entrypoint runs it."""
    capsys.readouterr()
    try:
        run_stage(stage, cfg)
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    return code, capsys.readouterr().err.strip().splitlines()


def _assert_refused(stage: str, cfg: DictConfig, capsys, pattern: str) -> str:
    code, lines = _run_stage(stage, cfg, capsys)
    assert code == 2, f"exit {code}: {lines}"
    assert len(lines) == 1, f"expected one line, got {lines}"
    assert lines[0].startswith(f"napkit {stage}: error: "), lines[0]
    assert re.search(pattern, lines[0]), f"{pattern!r} not in {lines[0]!r}"
    return lines[0]


# (override, what the line must say): types, ranges, choices and unknown keys of every group
CONFIG_CASES = [
    ("train.epochs=-1", r"train\.epochs=-1: allowed: an integer >= 1$"),
    ("finetune.epochs=0", r"finetune\.epochs=0: allowed: an integer >= 1$"),
    ("train.epochs=1.5", r"train\.epochs=1\.5: allowed: an integer >= 1$"),
    ("train.epochs=ten", r"train\.epochs=ten: allowed: an integer >= 1$"),
    ("prune.max_layer_sparsity=2", r"prune\.max_layer_sparsity=2: allowed: a number in \(0, 1\)"),
    ("prune.tolerance=abc", r"prune\.tolerance=abc: allowed: a number >= 0"),
    ("prune.tolerance=-1", r"prune\.tolerance=-1: allowed: a number >= 0"),
    ("seed=-1", r"seed=-1: allowed: an integer in \[0, 4294967296\)$"),
    ("seed=abc", r"seed=abc: allowed: an integer"),
    ("data.batch_size=0", r"data\.batch_size=0: allowed: an integer >= 1$"),
    ("data.eval_batch_size=-5", r"data\.eval_batch_size=-5: allowed: an integer >= 1$"),
    ("train.optimizer.lr=-1", r"train\.optimizer\.lr=-1: allowed: a number > 0"),
    ("finetune.optimizer.lr=0", r"finetune\.optimizer\.lr=0: allowed: a number > 0"),
    ("train.optimizer.momentum=1.5", r"train\.optimizer\.momentum=1\.5: allowed: a number in \[0, 1\)"),
    ("train.optimizer.weight_decay=-0.1", r"train\.optimizer\.weight_decay=-0\.1: allowed: a number >= 0"),
    ("train.label_smoothing=1.0", r"train\.label_smoothing=1\.0: allowed: a number in \[0, 1\)"),
    ("train.amp=yes", r"train\.amp=yes: allowed: true or false$"),
    ("data.augment=1", r"data\.augment=1: allowed: true or false$"),
    ("data.val_fraction=0", r"data\.val_fraction=0: allowed: a number in \(0, 1\)"),
    ("data.val_fraction=1.0", r"data\.val_fraction=1\.0: allowed: a number in \(0, 1\)"),
    ("data.test_fraction=1.0", r"data\.test_fraction=1\.0: allowed: a number in \(0, 1\)"),
    ("data.subset_train=0", r"data\.subset_train=0: allowed: an integer >= 1, or null$"),
    ("data.input_size=0", r"data\.input_size=0: allowed: an integer >= 1"),
    ("curvature.num_samples=0", r"curvature\.num_samples=0: allowed: an integer >= 1$"),
    ("curvature.fisher=emp", r"curvature\.fisher=emp: allowed: one of true, empirical$"),
    ("curvature.dtype=float16", r"curvature\.dtype=float16: allowed: one of float32, float64$"),
    ("curvature.a_max_positions=0", r"curvature\.a_max_positions=0: allowed: an integer >= 1, or null$"),
    ("curvature.chunk_size=-3", r"curvature\.chunk_size=-3: allowed: an integer >= 1$"),
    ("prune.method=obs_magic", r"prune\.method=obs_magic: allowed: one of .*magnitude.*nap"),
    ("prune.mode=channels", r"prune\.mode=channels: allowed: one of fine_grained, structured$"),
    ("prune.allocation=local", r"prune\.allocation=local: allowed: one of global, uniform$"),
    ("prune.target_sparsity=1.0", r"prune\.target_sparsity=1\.0: allowed: a number in \[0, 1\)"),
    ("prune.target_compression=0.5", r"prune\.target_compression=0\.5: allowed: a number > 1"),
    ("prune.step_fraction=0", r"prune\.step_fraction=0: allowed: a number in \(0, 1\]"),
    ("prune.max_iterations=0", r"prune\.max_iterations=0: allowed: an integer >= 1$"),
    ("prune.finetune_epochs=-1", r"prune\.finetune_epochs=-1: allowed: a number >= 0$"),
    ("prune.damping=0", r"prune\.damping=0: allowed: a number > 0"),
    ("prune.compensation=maybe", r"prune\.compensation=maybe: allowed: one of none, rowwise, exact"),
    ("prune.structured.round_to=0", r"prune\.structured\.round_to=0: allowed: an integer >= 1$"),
    ("prune.structured.max_group_sparsity=1", r"prune\.structured\.max_group_sparsity=1: allowed: a number in"),
    ("prune.structured.target_flops_reduction=1", r"target_flops_reduction=1: allowed: a number > 1, or null"),
    ("evaluate.latency_repeats=0", r"evaluate\.latency_repeats=0: allowed: an integer >= 1$"),
    ("tracking.enabled=maybe", r"tracking\.enabled=maybe: allowed: true or false$"),
    ("chex.S=1.0", r"chex\.S=1\.0: allowed: a number in \[0, 1\)$"),
    ("chex.dT=0", r"chex\.dT=0: allowed: an integer >= 1$"),
    ("chex.regrowth=greedy", r"chex\.regrowth=greedy: allowed: one of importance, random$"),
    ("model.name=vgg17", r"model\.name=vgg17: allowed: one of alexnet, .*lenet5.*vgg16_small, <any torchvision classifier>, <package.module.builder>$"),
    ("data.name=svhn", r"data\.name=svhn: allowed: one of cifar10, digits, imagenet, mnist$"),
    ("device=tpu", r"device=tpu: allowed: one of auto, cpu, cuda, cuda:N, mps$"),
    ("distributed.backend=mpi", r"distributed\.backend=mpi: allowed: one of auto, gloo, nccl$"),
    ("paths.content_addressed=sometimes", r"paths\.content_addressed=sometimes: allowed: true or false$"),
    ("train.optimizer._target_=torch.optim.Nope", r"train\.optimizer\._target_=torch\.optim\.Nope: allowed: an "
                                                   r"importable class"),
    ("+train.epochz=3", r"train\.epochz=3: unknown key; valid keys: amp, epochs, label_smoothing, optimizer, "
                        r"scheduler$"),
    ("+seedd=1", r"seedd=1: unknown key; valid keys: chex, chex_flow, curvature, data, .*seed"),
    ("+prune.structured.per_flopp=true", r"per_flopp=True: unknown key; valid keys: .*per_flop"),
    ("+train.optimizer.lrr=0.1", r"train\.optimizer\.lrr=0\.1: unknown key; valid keys: _target_, _partial_, lr,"),
    ("+model.depth=3", r"model\.depth=3: unknown key; valid keys: batch_norm, dropout, name"),
    ("pipeline=foo", r"pipeline=foo: allowed: one of nap, chex$"),
]


@pytest.mark.parametrize("override,message", CONFIG_CASES, ids=[c[0].lstrip("+") for c in CONFIG_CASES])
def test_bad_config_value_is_refused_before_any_work(artifacts, unchanged, capsys, override: str,
                                                     message: str) -> None:
    _assert_refused("pretrain", _compose(artifacts, override), capsys, message)
    unchanged()


def test_free_form_experiment_metadata_and_valid_configs_pass(compose_cfg) -> None:
    """The schema accepts every config group option of conf/ and free-form ``experiment`` metadata."""
    from napkit.schema import validate_config

    for group in ("model", "data", "prune", "tracking"):
        for option in sorted(p.stem for p in (ROOT / "conf" / group).glob("*.yaml")):
            validate_config(compose_cfg(f"{group}={option}"))
    validate_config(compose_cfg("+experiment.name=baseline", "+experiment.notes={a: 1}", "pipeline=chex"))
    validate_config(OmegaConf.load(ROOT / "params.yaml"))


def _a_file(ctx: Path) -> str:
    (ctx / "a_file").write_text("not a folder")
    return str(ctx / "a_file")


# (overrides given the test's tmp_path, what the line must say): what the stage needs, probed before work
PROBE_CASES = {
    "cuda_absent": (lambda t: ["device=cuda"], r"device=cuda: this machine has 0 CUDA device\(s\); allowed here: "
                                                r"auto, cpu"),
    "cuda_index": (lambda t: ["device=cuda:7"], r"device=cuda:7: this machine has \d+ CUDA device"),
    "artifacts_is_a_file": (lambda t: [f"paths.artifacts={_a_file(t)}"], r"paths\.artifacts=.*a_file: .*a_file is a "
                                                                          r"file; allowed: a folder"),
    "artifacts_below_a_file": (lambda t: [f"paths.artifacts={_a_file(t)}/out"], r"a_file is a file; allowed: a "
                                                                                 r"folder"),
    "artifacts_unwritable": (lambda t: ["paths.artifacts=/proc/napkit-artifacts"],
                             r"paths\.artifacts=/proc/napkit-artifacts: cannot write in .*; allowed: a writable"),
    "mlflow_db_read_only": (lambda t: ["tracking=local", "tracking.uri=sqlite:////proc/version"],
                            r"tracking\.uri=sqlite:////proc/version: the MLflow store /proc/version is not writable; "
                            r"allowed: .*tracking=disabled"),
    "mlflow_dir_unwritable": (lambda t: ["tracking=local", "tracking.uri=sqlite:////proc/napkit/mlflow.db"],
                              r"the MLflow store /proc/napkit/mlflow\.db is not writable"),
    "mlflow_folder_unwritable": (lambda t: ["tracking=local", "tracking.uri=file:///proc/napkit-mlruns"],
                                 r"the MLflow store /proc/napkit-mlruns is not writable"),
    "mnist_absent": (lambda t: ["data=mnist", "data.download=false", f"data.root={t / 'none'}"],
                     r"data\.root=.*none: .*train-images-idx3-ubyte not found; put the mnist files there"),
    "cifar_folder_absent": (lambda t: ["data=cifar10", "data.format=imagefolder", f"data.root={t / 'none'}"],
                            r"data\.root=.*none: .*none/train not found"),
    "cifar_batches_absent": (lambda t: ["data=cifar10", "data.download=false", f"data.root={t / 'none'}"],
                             r"cifar-10-batches-py not found"),
    "imagenet_absent": (lambda t: ["data=imagenet", f"data.root={t / 'none'}"], r"none/train not found"),
}


@pytest.mark.parametrize("case", list(PROBE_CASES))
def test_what_a_stage_needs_is_probed_before_work(artifacts, unchanged, capsys, tmp_path, case: str) -> None:
    if case == "cuda_absent" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    overrides, message = PROBE_CASES[case]
    _assert_refused("pretrain", _compose(artifacts, *overrides(tmp_path)), capsys, message)
    unchanged()


# --- bad files: (stage, damage(artifacts, tmp_path) -> extra overrides, message, files it changes) ------


def _edit_tensors(path: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    """Rewrite a safetensors file through ``edit`` keeping its metadata, then rehash its set."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata()
    tensors = load_tensors(path)
    edit(tensors)
    save_tensors(path, tensors, metadata=meta)
    if (path.parent / MODEL_JSON).is_file():
        _rehash(path.parent)


def _first(tensors: dict[str, torch.Tensor], value: float) -> None:
    key = next(k for k, v in tensors.items() if v.is_floating_point() and v.dim() > 1)
    tensors[key][0].fill_(value)


def _drop_json_hashes(a: Path, t: Path) -> list[str]:
    saved = read_json(a / "pretrain" / MODEL_JSON)
    saved.pop("files")
    write_json(a / "pretrain" / MODEL_JSON, saved)
    return []


def _truncate(rel: str, keep: int | None = None) -> Callable[[Path, Path], list[str]]:
    def damage(a: Path, t: Path) -> list[str]:
        data = (a / rel).read_bytes()
        (a / rel).write_bytes(data[: keep if keep is not None else len(data) // 2])
        return []

    return damage


def _replace_with(rel: str, src_rel: str) -> Callable[[Path, Path], list[str]]:
    def damage(a: Path, t: Path) -> list[str]:
        shutil.copy(a / src_rel, a / rel)
        return []

    return damage


def _delete(rel: str) -> Callable[[Path, Path], list[str]]:
    def damage(a: Path, t: Path) -> list[str]:
        (a / rel).unlink()
        return []

    return damage


def _tensors(rel: str, edit: Callable[[dict[str, torch.Tensor]], None]) -> Callable[[Path, Path], list[str]]:
    def damage(a: Path, t: Path) -> list[str]:
        _edit_tensors(a / rel, edit)
        return []

    return damage


def _write(rel: str, text: str) -> Callable[[Path, Path], list[str]]:
    def damage(a: Path, t: Path) -> list[str]:
        (a / rel).write_text(text)
        return []

    return damage


def _drop_mask(tensors: dict[str, torch.Tensor]) -> None:
    tensors.pop(min(tensors))


def _mnist_damaged(a: Path, t: Path) -> list[str]:
    root = t / "mnist"
    shutil.copytree(ROOT / "tests" / "fixtures" / "mnist", root)
    path = root / "MNIST" / "raw" / "t10k-labels-idx1-ubyte"
    path.write_bytes(b"\x00\x00\x08\x03" + path.read_bytes()[4:])
    return ["data=mnist", "data.download=false", f"data.root={root}"]


def _cifar_truncated(a: Path, t: Path) -> list[str]:
    root = t / "cifar"
    shutil.copytree(ROOT / "tests" / "fixtures" / "cifar10", root)
    path = root / "test" / "ship" / "0001.jpg"
    path.write_bytes(path.read_bytes()[:150])
    return ["data=cifar10", "data.format=imagefolder", f"data.root={root}", f"paths.cache={t / 'cache'}"]


def _hold_lock(a: Path, t: Path) -> list[str]:
    """Another process holds pretrain's output lock (as a running pretrain would)."""
    lock = a / ".locks" / "pretrain.lock"
    lock.parent.mkdir(exist_ok=True)
    code = ("import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
            "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, str(os.getpid()).encode()); print('locked', flush=True); "
            "time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(lock)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
    _HOLDERS.append(proc)
    return []


_HOLDERS: list[subprocess.Popen] = []

FILE_CASES = {
    "set_without_hashes": ("curvature", _drop_json_hashes, r"pretrain/model\.json lists no file hashes .*rerun the "
                                                           r"stage", ["pretrain/model.json"]),
    "weights_of_another_set": ("curvature", _replace_with("pretrain/model.safetensors", "finetune/model.safetensors"),
                               r"pretrain/model\.safetensors does not match the sha256 in model\.json: an incomplete "
                               r"output set", ["pretrain/model.safetensors"]),
    "weights_truncated": ("curvature", _truncate("pretrain/model.safetensors"),
                          r"model\.safetensors does not match the sha256", ["pretrain/model.safetensors"]),
    "masks_file_missing": ("finetune", _delete("prune/masks.safetensors"),
                           r"prune/masks\.safetensors is missing: an incomplete output set", ["prune/masks.safetensors"]),
    "masks_of_another_set": ("finetune", _replace_with("prune/masks.safetensors", "prune/model.safetensors"),
                             r"prune/masks\.safetensors does not match the sha256", ["prune/masks.safetensors"]),
    "masks_missing_a_layer": ("finetune", _tensors("prune/masks.safetensors", _drop_mask),
                              r"prune/masks\.safetensors has no mask for layer\(s\) [\w.]+ \(it would be trained dense\)",
                              ["prune/masks.safetensors", "prune/model.json"]),
    "nan_weights": ("curvature", _tensors("pretrain/model.safetensors", lambda t: _first(t, math.nan)),
                    r"pretrain/model\.safetensors: [\w.]+weight has \d+ NaN/Inf value\(s\)",
                    ["pretrain/model.safetensors", "pretrain/model.json"]),
    "inf_weights": ("finetune", _tensors("prune/model.safetensors", lambda t: _first(t, math.inf)),
                    r"prune/model\.safetensors: [\w.]+weight has \d+ NaN/Inf", ["prune/model.safetensors",
                                                                                 "prune/model.json"]),
    "nan_factors": ("prune", _tensors("curvature/factors.safetensors", lambda t: _first(t, math.nan)),
                    r"curvature/factors\.safetensors: [\w.]+ has \d+ NaN/Inf", ["curvature/factors.safetensors"]),
    "factors_truncated": ("prune", _truncate("curvature/factors.safetensors", 1000),
                          r"corrupt safetensors file .*factors\.safetensors", ["curvature/factors.safetensors"]),
    "model_json_corrupt": ("curvature", _write("pretrain/model.json", "{nope"),
                           r"corrupt JSON file .*pretrain/model\.json", ["pretrain/model.json"]),
    "model_json_missing": ("curvature", _delete("pretrain/model.json"),
                           r"missing file .*pretrain/model\.json; run the stage that writes it first",
                           ["pretrain/model.json"]),
    "checkpoint_truncated": ("pretrain", _truncate("checkpoints/pretrain.pt"),
                             r"cannot load checkpoint .*pretrain\.pt .*delete it", ["checkpoints/pretrain.pt"]),
    "mnist_idx_header": ("pretrain", _mnist_damaged, r"corrupt MNIST file .*t10k-labels-idx1-ubyte \(idx magic 2051, "
                                                     r"expected 2049\); delete it and re-download it", []),
    "truncated_jpeg": ("pretrain", _cifar_truncated, r"cannot decode image .*test/ship/0001\.jpg \(.*\); the file is "
                                                     r"truncated or corrupt: delete it, or re-extract", []),
    "concurrent_run": ("pretrain", _hold_lock, r"another run of pretrain \(pid \d+\) is writing .*pretrain; wait for "
                                               r"it to finish or stop it", []),
}


@pytest.mark.parametrize("case", list(FILE_CASES))
def test_bad_or_incomplete_file_is_refused_with_its_name(artifacts, unchanged, capsys, tmp_path,
                                                         case: str) -> None:
    stage, damage, message, changed = FILE_CASES[case]
    try:
        extra = damage(artifacts, tmp_path)
        after_damage = _snapshot(artifacts)
        _assert_refused(stage, _compose(artifacts, *extra), capsys, message)
        assert _snapshot(artifacts) == after_damage, "the refused run changed its inputs or earlier outputs"
        unchanged(*changed)
    finally:
        while _HOLDERS:
            holder = _HOLDERS.pop()
            holder.kill()
            holder.wait()


def test_the_table_has_at_least_60_cases() -> None:
    assert len(CONFIG_CASES) + len(PROBE_CASES) + len(FILE_CASES) + len(KILL_POINTS) >= 60


# --- kills between the writes of an output set ------------------------------------------------------


class _Killed(Exception):
    """Stands for the process dying at the injected point."""


KILL_POINTS = ("writing model.safetensors", "writing masks.safetensors", "between the two renames",
               "before model.json")


@pytest.mark.parametrize("point", KILL_POINTS)
def test_kill_between_output_writes_never_yields_a_mixed_set(artifacts, monkeypatch, point: str) -> None:
    """finetune's set is model.safetensors + masks.safetensors + model.json. A kill while the tensor files
    are written leaves the previous set whole (it still loads, byte for byte); a kill in the short
    rename phase leaves a set the next stage refuses (hash mismatch), never a mixed one accepted."""
    import napkit.artifacts as artifacts_module
    import napkit.io as io_module

    folder = artifacts / "finetune"
    before = {n: (folder / n).read_bytes() for n in (MODEL_WEIGHTS, MASKS, MODEL_JSON)}
    model, spec, masks = load_model(folder)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.5)
    first = next(iter(masks.masks.values()))
    first.view(-1)[first.view(-1).nonzero()[0]] = False  # the new set prunes one more weight
    masks.apply_(model)
    calls = {"save": 0, "replace": 0}
    real_save, real_replace = artifacts_module.save_file, io_module.os.replace

    def save(tensors, path, *args, **kwargs):
        calls["save"] += 1
        real_save(tensors, path, *args, **kwargs)
        if point == f"writing {['', MODEL_WEIGHTS, MASKS][calls['save']]}":
            raise _Killed(point)

    def replace(src, dst):
        calls["replace"] += 1
        real_replace(src, dst)
        if point == "between the two renames" and calls["replace"] == 1:
            raise _Killed(point)

    def write_json(*args, **kwargs):
        raise _Killed(point)

    monkeypatch.setattr(artifacts_module, "save_file", save)
    monkeypatch.setattr(io_module.os, "replace", replace)
    if point == "before model.json":
        monkeypatch.setattr(artifacts_module, "write_json", write_json)
    with pytest.raises(_Killed):
        save_model(folder, model, spec, masks)
    monkeypatch.undo()
    assert not list(folder.glob("*.tmp")) and not list(folder.glob(".*.tmp"))
    if point.startswith("writing"):
        assert {n: (folder / n).read_bytes() for n in before} == before
        loaded, _, loaded_masks = load_model(folder)
        assert loaded_masks is not None
    else:
        with pytest.raises(NapkitError, match=r"does not match the sha256 in model\.json: an incomplete output"):
            load_model(folder)
    save_model(folder, model, spec, masks)  # the rerun completes the set
    loaded, _, _ = load_model(folder)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))


def test_model_set_files_follow_the_umask(artifacts) -> None:
    folder = artifacts / "finetune"
    model, spec, masks = load_model(folder)
    import napkit.io as io_module

    saved, io_module._UMASK = io_module._UMASK, 0o027
    try:
        save_model(folder, model, spec, masks)
    finally:
        io_module._UMASK = saved
    assert {(folder / n).stat().st_mode & 0o777 for n in (MODEL_WEIGHTS, MASKS, MODEL_JSON)} == {0o640}


def test_stale_temporary_files_are_cleaned_at_stage_start(artifacts, capsys) -> None:
    """A kill inside a safetensors write leaves a full-size temporary file; the next run of the stage
    removes it at start, whatever file it belonged to (a live writer's is kept)."""
    import socket

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    host = socket.gethostname()
    stale = artifacts / "evaluate" / f".layer_ratios.png.{host}.{gone.pid}.x1y2z3.tmp"
    stale_ckpt = artifacts / "checkpoints" / f".prune_loop.pt.{host}.{gone.pid}.a1b2c3.tmp"
    live = artifacts / "evaluate" / f".metrics.json.{host}.{os.getpid()}.d4e5f6.tmp"
    for path in (stale, stale_ckpt, live):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"\0" * 4096)
    cfg = _compose(artifacts, "evaluate.latency=false")
    code, lines = _run_stage("evaluate", cfg, capsys)
    assert code == 0, lines
    assert not stale.exists() and not stale_ckpt.exists() and live.exists()


# --- the real entrypoint: exit status and stderr, signals, a concurrent run ------------------------


def test_entrypoint_refuses_a_bad_value_in_one_line(artifacts, unchanged) -> None:
    proc = _entrypoint("pretrain", artifacts, "seed=-1")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "napkit pretrain: error: seed=-1: allowed: an integer in [0, 4294967296)"], proc.stderr
    unchanged()


def test_misspelled_key_in_params_yaml_and_in_overrides_is_refused(artifacts, unchanged, tmp_path) -> None:
    """DVC runs the stages on params.yaml: a typo there is refused (not silently ignored), as is a
    misspelled override (which Hydra would report over many lines)."""
    params = OmegaConf.load(ROOT / "params.yaml")
    params.prune.max_layer_sparsty = 0.5  # the typo
    params.paths.artifacts = str(artifacts)
    params.tracking.enabled = False
    (tmp_path / "conf").mkdir()
    OmegaConf.save(params, tmp_path / "conf" / "params.yaml")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(ROOT / "pipelines" / "prune.py"), "--config-dir", str(tmp_path / "conf"),
           "--config-name", "params", f"hydra.run.dir={tmp_path / 'hydra'}", "hydra.output_subdir=null"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "napkit prune: error: prune.max_layer_sparsty=0.5: unknown key; valid keys: allocation, "
        "bn_recalibration_batches, compensation, damping, eval_test, finetune_epochs, grid, ignore, max_exact, "
        "max_iterations, max_layer_sparsity, method, mode, one_shot, recompute_curvature, step_fraction, "
        "stop_on_tolerance, structured, target_compression, target_sparsity, tolerance"], proc.stderr
    proc = _entrypoint("pretrain", artifacts, "train.epochz=3")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "napkit pretrain: error: train.epochz=3: unknown key; valid keys: amp, epochs, label_smoothing, optimizer, "
        "scheduler"], proc.stderr
    unchanged()


def _run_status(db: Path) -> list[str]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{db}")
    exp = client.get_experiment_by_name("napkit")
    return [r.info.status for r in client.search_runs([exp.experiment_id])] if exp else []


def test_sigterm_ends_the_run_killed_keeps_the_checkpoint_and_a_second_run_is_locked_out(
        artifacts, unchanged, capsys) -> None:
    """A real pretrain subprocess: after its first checkpoint, a second run of the stage on the same
    outputs is refused by the lock (exit 2, one line naming the holder), then SIGTERM stops the first:
    exit 143, the MLflow run KILLED, the epoch checkpoint kept, the earlier outputs intact."""
    db = artifacts.parent / "mlflow.db"
    ckpt = artifacts / "checkpoints" / "pretrain.pt"
    old_ckpt = ckpt.read_bytes()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("MLFLOW_RUN_ID", None)
    overrides = [*TINY, f"paths.artifacts={artifacts}", "train.epochs=500", "tracking=local",
                 f"tracking.uri=sqlite:///{db}"]
    cmd = [sys.executable, str(ROOT / "pipelines" / "pretrain.py"), *overrides,
           f"hydra.run.dir={artifacts.parent / 'hydra'}", "hydra.output_subdir=null"]
    proc = subprocess.Popen(cmd, cwd=artifacts.parent, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    try:
        deadline = time.monotonic() + 240
        while (not ckpt.is_file() or ckpt.read_bytes() == old_ckpt) and proc.poll() is None \
                and time.monotonic() < deadline:
            time.sleep(0.1)
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
            cfg = compose("config", overrides=[o for o in overrides if not o.startswith("tracking")]
                          + ["tracking=disabled"])
        line = _assert_refused("pretrain", cfg, capsys, rf"another run of pretrain \(pid {proc.pid}\) is writing "
                                                        rf".*pretrain; wait for it to finish or stop it")
        assert str(artifacts / ".locks" / "pretrain.lock") in line
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err[-3000:]
    ours = [x for x in err.splitlines() if x.startswith("napkit pretrain:")]
    assert ours == ["napkit pretrain: stopped by SIGTERM; the last checkpoint is kept: rerun the same command to "
                    "resume"], err[-3000:]
    assert "Traceback" not in err
    assert _run_status(db) == ["KILLED"]
    state = load_torch(ckpt)
    assert state["epoch"] >= 1 and all(torch.isfinite(v).all() for v in state["model"].values())
    unchanged("checkpoints/pretrain.pt")


def test_a_signal_during_a_store_write_waits_for_the_write(artifacts, capsys, monkeypatch) -> None:
    """SIGTERM arriving inside an MLflow write (a CI run once caught one mid SQLite transaction: the store stayed
    locked and ending the run failed with a traceback): the write completes, then the stage stops as usual."""
    from mlflow.tracking import MlflowClient

    real = MlflowClient.log_batch
    written: list[str] = []

    def log_batch_interrupted(self, run_id, metrics=(), **kwargs):
        if metrics and not written:
            os.kill(os.getpid(), signal.SIGTERM)  # delivered now, in the middle of the call
            written.extend(m.key for m in metrics)
        return real(self, run_id, metrics=metrics, **kwargs)

    monkeypatch.setattr(MlflowClient, "log_batch", log_batch_interrupted)
    db = artifacts.parent / "sigterm_write.db"
    cfg = _compose(artifacts, "train.epochs=3", "tracking=local", f"tracking.uri=sqlite:///{db}")
    code, lines = _run_stage("pretrain", cfg, capsys)
    assert code == 143 and not [x for x in lines if "Traceback" in x], lines
    assert _run_status(db) == ["KILLED"]
    client = MlflowClient(f"sqlite:///{db}")
    run = client.search_runs([client.get_experiment_by_name("napkit").experiment_id])[0]
    assert written and set(written) <= set(run.data.metrics)  # the interrupted write landed whole


def test_the_signal_line_is_a_line_of_its_own_after_a_progress_bar(artifacts, capsys) -> None:
    """SIGTERM in the middle of a progress bar drawn below another (a CI run once printed the stop line after a
    bar's text): the bars are cleared and the line is a line of its own."""
    from tqdm import tqdm

    def runner(cfg: DictConfig) -> dict[str, float]:
        outer = tqdm(total=1, desc="pretrain", leave=False, file=sys.stderr, mininterval=0)  # still open
        for i in tqdm(range(5), desc="pretrain 1/3", leave=False, file=sys.stderr, mininterval=0):  # drawn below
            if i == 2:
                os.kill(os.getpid(), signal.SIGTERM)
        outer.close()
        return {}

    cfg = _compose(artifacts, "tracking=disabled")
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        run_stage("pretrain", cfg, runner=runner)
    err = capsys.readouterr().err
    assert exit_.value.code == 143 and "pretrain 1/3" in err  # the bar was drawn
    assert "napkit pretrain: stopped by SIGTERM; the last checkpoint is kept: rerun the same command to resume" \
        in err.splitlines()


def test_held_signals_raise_after_the_block_and_a_second_one_at_once() -> None:
    from napkit.errors import Interrupted
    from napkit.guard import signals_held, signals_raise

    done = []
    with signals_raise(), pytest.raises(Interrupted, match="SIGTERM"):
        with signals_held():
            os.kill(os.getpid(), signal.SIGTERM)
            done.append("the write")  # still runs: the signal waits
    assert done == ["the write"]
    with signals_raise(), pytest.raises(Interrupted, match="SIGINT"):
        with signals_held():
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGINT)  # a second signal: a hung store can still be stopped
            done.append("never")
    assert done == ["the write"]


def test_sigint_in_process_exits_130_and_marks_the_run_killed(artifacts, unchanged, capsys,
                                                              monkeypatch) -> None:
    """Ctrl-C during training (here: right after the first epoch's checkpoint is written)."""
    from napkit.training import trainer

    real = trainer.save_torch

    def save_then_interrupt(path, obj):
        real(path, obj)
        os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(trainer, "save_torch", save_then_interrupt)
    db = artifacts.parent / "sigint.db"
    cfg = _compose(artifacts, "train.epochs=3", "tracking=local", f"tracking.uri=sqlite:///{db}")
    code, lines = _run_stage("pretrain", cfg, capsys)
    assert code == 130
    assert [x for x in lines if x.startswith("napkit")] == [
        "napkit pretrain: stopped by SIGINT; the last checkpoint is kept: rerun the same command to resume"]
    assert _run_status(db) == ["KILLED"]
    assert load_torch(artifacts / "checkpoints" / "pretrain.pt")["epoch"] == 1
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is restored
    unchanged("checkpoints/pretrain.pt")


@pytest.mark.parametrize("argv,bad", [
    (["model=lenet5", "prune=magnitude", "structured@prune.structured=default", "hydra.run.dir=x"], None),
    (["train.epochs=3", "+experiment.name=x", "train.optimizer.lr=0.1", "~prune.damping", "seed=1,2"], None),
    (["train.epochz=3"], "train.epochz=3: unknown key; valid keys: amp, epochs, label_smoothing, optimizer, "
                         "scheduler"),
    (["prune.structured.roundto=8"], "prune.structured.roundto=8: unknown key; valid keys: compensate, "
                                     "latency_batch, max_group_sparsity, per_flop, remove_blocks, round_to, "
                                     "step_fraction, target_flops_reduction, target_params_reduction, tolerance"),
    (["sed=1"], "sed=1: unknown key; valid keys: chex, chex_flow, curvature, data, device, distributed, "
                "dvc_flows, evaluate, experiment, finetune, hydra, model, paths, pipeline, prune, seed, tracking, "
                "train"),
], ids=["groups", "valid_keys", "typo", "nested_typo", "top_level_typo"])
def test_unknown_override_key_is_found_before_hydra(argv: list[str], bad: str | None) -> None:
    from napkit.schema import unknown_override

    message = unknown_override(argv)
    assert message is None if bad is None else message.startswith(bad), message
