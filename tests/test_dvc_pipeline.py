"""End to end through DVC: `dvc repro` runs all five stages, is cached, and reruns only what changed."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from napkit.config import write_params

ROOT = Path(__file__).resolve().parents[1]
FAST = ["train.epochs=2", "finetune.epochs=1", "prune.max_iterations=2", "prune.step_fraction=0.6",
        "prune.tolerance=100", "curvature.num_samples=128", "evaluate.latency_repeats=2",
        "data.subset_train=400"]


def _dvc(repo: Path, *args: str, uri: str | None = None, **env_vars: str) -> str:
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri or f"sqlite:///{repo / 'mlflow.db'}",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}", **env_vars}
    env.pop("MLFLOW_RUN_ID", None)
    proc = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=repo, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, f"dvc {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def _scratch_repo(repo: Path, overrides: list[str]) -> Path:
    """A scratch clone of the project's pipeline files in a fresh git repo, with ``overrides`` as params."""
    for name in ("conf", "pipelines", "src", ".dvc"):
        shutil.copytree(ROOT / name, repo / name, ignore=shutil.ignore_patterns("tmp", "cache", "__pycache__"))
    for name in ("dvc.yaml", ".dvcignore"):
        shutil.copy(ROOT / name, repo / name)
    write_params(repo, overrides=overrides)
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    return repo


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """A scratch clone of the project's pipeline files in a fresh git repo, with fast params."""
    return _scratch_repo(tmp_path_factory.mktemp("napkit_repo"), FAST)


@pytest.mark.slow
def test_dvc_repro_end_to_end(repo: Path) -> None:
    out = _dvc(repo, "repro")
    for stage in ("pretrain", "curvature", "prune", "finetune", "evaluate"):
        assert f"Running stage '{stage}'" in out
    metrics = json.loads((repo / "artifacts/evaluate/metrics.json").read_text())
    assert {"top1", "params", "params_nonzero", "flops", "flops_effective"} <= set(metrics)
    assert metrics["sparsity"] > 0.5

    # nothing changed: nothing runs
    again = _dvc(repo, "repro")
    assert "Running stage" not in again

    # dvc metrics show lists top-1, parameters and FLOPs
    shown = json.loads(_dvc(repo, "metrics", "show", "--json"))
    flat = json.dumps(shown)
    for key in ("top1", "params_nonzero", "flops_effective"):
        assert key in flat

    # one MLflow run holds all five stages
    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("napkit").experiment_id])
    assert len(runs) == 1
    assert {f"napkit.stage.{s}" for s in ("pretrain", "curvature", "prune", "finetune", "evaluate")} <= set(
        runs[0].data.tags)

    # a prune parameter change reruns prune, finetune and evaluate only
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["prune"]["step_fraction"] = 0.5
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = _dvc(repo, "repro")
    assert "Running stage 'pretrain'" not in out and "Running stage 'curvature'" not in out
    for stage in ("prune", "finetune", "evaluate"):
        assert f"Running stage '{stage}'" in out
    runs = client.search_runs([client.get_experiment_by_name("napkit").experiment_id])
    assert len(runs) == 2  # a new pipeline execution is a new run


@pytest.mark.slow
def test_dvc_repro_completes_when_the_tracking_server_is_unreachable(tmp_path: Path) -> None:
    """MLFLOW_TRACKING_URI names a server nobody listens on: every stage still runs and writes its
    metrics, says that tracking failed, and leaves what MLflow missed for `napkit.tracking.upload`."""
    repo = _scratch_repo(tmp_path / "repo", [*FAST, "model=lenet5", "train.epochs=1", "prune.max_iterations=1",
                                             "curvature.num_samples=64", "data.subset_train=256"])
    stages = ("pretrain", "curvature", "prune", "finetune", "evaluate")
    out = _dvc(repo, "repro", uri="http://127.0.0.1:9", MLFLOW_HTTP_REQUEST_MAX_RETRIES="0")
    for stage in stages:
        assert f"Running stage '{stage}'" in out
        assert f"{stage}: MLflow tracking failed" in out and f"{stage}: finished UNTRACKED" in out
        assert json.loads((repo / f"artifacts/{stage}/metrics.json").read_text())
        assert (repo / f"artifacts/{stage}/tracking_pending.json").is_file()
    assert {"top1", "params_nonzero", "flops_effective"} <= set(
        json.loads((repo / "artifacts/evaluate/metrics.json").read_text()))
    assert not (repo / "mlflow.db").exists()

    # the store is back: one command records the whole pipeline in one run
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": store}
    env.pop("MLFLOW_RUN_ID", None)
    proc = subprocess.run([sys.executable, "-m", "napkit.tracking.upload", "artifacts"], cwd=repo, env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not list(repo.glob("artifacts/*/tracking_pending.json"))
    client = MlflowClient(store)
    (run,) = client.search_runs([client.get_experiment_by_name("napkit").experiment_id])
    assert {f"napkit.stage.{s}" for s in stages} <= set(run.data.tags)
    for key in ("pretrain/val_top1", "prune/sparsity", "finetune/val_top1", "evaluate/top1"):
        assert key in run.data.metrics, key
