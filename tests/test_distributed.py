"""Data parallelism under torchrun on CPU (gloo): same K-FAC factors, one writer, resume works."""

from __future__ import annotations

import os
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
from napkit.io import load_torch
from napkit.stages.common import load_splits, stage_dir
from napkit.stages.curvature import estimate

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
    assert sorted(p.name for p in (tmp_path / "artifacts" / "checkpoints").iterdir()) == ["pretrain.pt"]


@pytest.mark.slow
def test_two_process_pretrain_resumes_after_kill(tmp_path: Path) -> None:
    ref = tmp_path / "ref"
    ref.mkdir()
    _torchrun("pretrain", ref, "train.epochs=3", "tracking=disabled")
    run = tmp_path / "run"
    run.mkdir()
    ckpt = run / "artifacts" / "checkpoints" / "pretrain.pt"
    proc = _torchrun("pretrain", run, "train.epochs=3", "tracking=disabled", wait=False)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if ckpt.is_file() and load_torch(ckpt)["epoch"] >= 1:
            os.killpg(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.2)
    proc.wait()
    assert int(load_torch(ckpt)["epoch"]) < 3, "the run finished before it could be killed"
    out = _torchrun("pretrain", run, "train.epochs=3", "tracking=disabled")
    assert "resumed from" in out
    a = load_torch(ref / "artifacts" / "checkpoints" / "pretrain.pt")["model"]
    b = load_torch(ckpt)["model"]
    for key in a:
        assert torch.equal(a[key], b[key]), key
