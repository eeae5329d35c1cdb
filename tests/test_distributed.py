"""Data parallelism under torchrun on CPU (gloo): same K-FAC factors, one writer, resume works."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from napkit.artifacts import load_model
from napkit.curvature import load_factors
from napkit.curvature.sampling import estimate
from napkit.io import load_tensors, load_torch
from napkit.stages.common import load_splits, stage_dir

ROOT = Path(__file__).resolve().parents[1]
FAST = ["data.subset_train=256", "train.epochs=1", "model=alexnet_small", "model.width=0.125", "curvature.num_samples=96",
        "curvature.batch_size=16", "evaluate.latency_repeats=2"]


def _torchrun(stage: str, tmp: Path, *overrides: str, nproc: int = 2, wait: bool = True):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}"}
    env.pop("MLFLOW_RUN_ID", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(ROOT / "pipelines" / f"{stage}.py"), f"paths.artifacts={tmp / 'artifacts'}",
           f"hydra.run.dir={tmp / 'hydra'}", *FAST, *overrides]
    proc = subprocess.Popen(cmd, cwd=tmp, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    if not wait:
        return proc
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-4000:]
    return out


@pytest.mark.slow
def test_two_process_pretrain_and_curvature(compose_cfg, tmp_path: Path) -> None:
    _torchrun("pretrain", tmp_path)
    _torchrun("curvature", tmp_path)
    cfg = compose_cfg(f"paths.artifacts={tmp_path / 'artifacts'}", *FAST)
    model, _, _ = load_model(stage_dir(cfg, "pretrain"))
    two, _ = load_factors(stage_dir(cfg, "curvature") / "factors.safetensors", model)
    one = estimate(model, load_splits(cfg).train_plain, cfg, seed=int(cfg.seed), device=torch.device("cpu"),
                   progress=False)
    assert set(one) == set(two)
    for name in one:
        assert one[name].num_samples == two[name].num_samples == 96
        torch.testing.assert_close(two[name].G, one[name].G, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(two[name].a_dense(), one[name].a_dense(), rtol=1e-4, atol=1e-6)
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("napkit").experiment_id])
    assert len(runs) == 1  # rank 0 alone tracks; both stages joined the same run
    assert {"napkit.stage.pretrain", "napkit.stage.curvature"} <= set(runs[0].data.tags)
    assert not list((tmp_path / "artifacts" / "checkpoints").iterdir())  # completed: resume state deleted


def _kill_after_first_epoch(run: Path, ckpt: Path, epochs: int) -> int:
    """Start a two-process pretrain and SIGKILL its process group once epoch 1 is checkpointed;
    returns the epoch the checkpoint holds (``epochs`` if the run finished first)."""
    proc = _torchrun("pretrain", run, f"train.epochs={epochs}", "tracking=disabled", wait=False)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if ckpt.is_file() and load_torch(ckpt)["epoch"] >= 1:
            # torchrun's workers live in their own process groups: kill the agent and every worker
            os.killpg(proc.pid, signal.SIGKILL)
            subprocess.run(["pkill", "-KILL", "-f", f"paths.artifacts={run}/"], check=False)
            break
        time.sleep(0.05)
    out, _ = proc.communicate()
    if proc.returncode == 0 and not ckpt.is_file():  # it finished first (and deleted its resume state)
        return epochs
    assert ckpt.is_file(), f"no checkpoint was written:\n{out[-3000:]}"
    return int(load_torch(ckpt)["epoch"])


@pytest.mark.slow
def test_two_process_pretrain_resumes_after_kill(tmp_path: Path) -> None:
    epochs = 4
    ref = tmp_path / "ref"
    ref.mkdir()
    _torchrun("pretrain", ref, f"train.epochs={epochs}", "tracking=disabled")
    run = tmp_path / "run"
    ckpt = run / "artifacts" / "checkpoints" / "pretrain.pt"
    for _ in range(3):  # a loaded machine can finish the run between two polls: try again
        shutil.rmtree(run, ignore_errors=True)
        run.mkdir()
        if _kill_after_first_epoch(run, ckpt, epochs) < epochs:
            break
    assert int(load_torch(ckpt)["epoch"]) < epochs, "the run finished before it could be killed, 3 times"
    out = _torchrun("pretrain", run, f"train.epochs={epochs}", "tracking=disabled")
    assert "resumed from" in out, out[-3000:]
    assert not ckpt.exists()  # completed: its resume state is deleted
    a = load_tensors(ref / "artifacts" / "pretrain" / "model.safetensors")
    b = load_tensors(run / "artifacts" / "pretrain" / "model.safetensors")
    for key in a:
        assert torch.equal(a[key], b[key]), key
