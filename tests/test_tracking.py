"""MLflow run resolution: one run per pipeline execution, shared by its stages."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from napkit.tracking import stage_run
from napkit.tracking.mlflow_run import PIPELINE_TAG, repo_root


def _client(cfg) -> MlflowClient:
    return MlflowClient(cfg.tracking.uri)


@pytest.fixture
def tracked(compose_cfg, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"

    def make(*overrides: str):
        return compose_cfg(f"tracking.uri={uri}", f"paths.artifacts={tmp_path / 'artifacts'}", *overrides)

    return make


def _runs(cfg):
    client = _client(cfg)
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    return client.search_runs([exp.experiment_id])


def test_stages_of_one_pipeline_share_a_run(tracked) -> None:
    cfg = tracked()
    with stage_run(cfg, "pretrain") as t:
        t.log_metrics({"val_top1": 90.0})
    with stage_run(cfg, "curvature") as t:
        t.log_metrics({"seconds": 1.0})
    runs = _runs(cfg)
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.metrics["pretrain/val_top1"] == 90.0 and "curvature/seconds" in run.data.metrics
    assert run.data.params["model.name"] == cfg.model.name
    assert run.data.tags["napkit.stage.pretrain"] == "done"


def test_changed_config_or_rerun_starts_a_new_run(tracked) -> None:
    cfg = tracked()
    with stage_run(cfg, "prune"):
        pass
    with stage_run(tracked("prune.step_fraction=0.3"), "prune"):
        pass
    with stage_run(cfg, "prune"):  # the same stage again: a new execution
        pass
    runs = _runs(cfg)
    assert len(runs) == 3
    assert len({r.data.tags[PIPELINE_TAG] for r in runs}) == 2


def test_failure_marks_run_failed_with_error(tracked) -> None:
    cfg = tracked()
    with pytest.raises(RuntimeError):
        with stage_run(cfg, "pretrain"):
            raise RuntimeError("boom")
    run = _runs(cfg)[0]
    assert run.info.status == "FAILED"
    assert run.data.tags["napkit.error.pretrain"] == "boom"


def test_disabled_tracking_logs_nothing(tracked) -> None:
    cfg = tracked("tracking=disabled")
    with stage_run(cfg, "pretrain") as t:
        t.log_metrics({"x": 1.0})
        assert not t.enabled


def test_repo_root_sees_through_dvc_temp_copies(tmp_path: Path) -> None:
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    inner = tmp_path / ".dvc" / "tmp" / "exps" / "tmpabc" / "pipelines"
    inner.mkdir(parents=True)
    assert repo_root(inner) == tmp_path
    assert repo_root(tmp_path / "pipelines") == tmp_path


def test_unreachable_store_does_not_stop_the_stage(compose_cfg, tmp_path, monkeypatch, caplog) -> None:
    """A tracking server that refuses connections: the stage body runs, a warning says tracking failed."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    cfg = compose_cfg("tracking.uri=http://127.0.0.1:9", f"paths.artifacts={tmp_path}")
    ran = []
    with caplog.at_level("WARNING"):
        with stage_run(cfg, "pretrain") as t:
            t.log_metrics({"x": 1.0})
            ran.append(True)
    assert ran and t.failed and not t.enabled
    assert "MLflow tracking failed" in caplog.text and "UNTRACKED" in caplog.text
