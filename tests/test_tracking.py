"""MLflow run resolution: one run per pipeline execution, shared by its stages."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from napkit.tracking import stage_run
from napkit.tracking.mlflow_run import PENDING_FILE, PIPELINE_TAG, repo_root
from napkit.tracking.upload import main as upload_main


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


def _untracked_stage(cfg, tmp_path: Path) -> Path:
    """Run a fake pretrain stage against an unreachable store; returns its pending file."""
    out = tmp_path / "artifacts" / "pretrain"
    out.mkdir(parents=True)
    (out / "metrics.json").write_text('{"val_top1": 91.0}\n')
    with stage_run(cfg, "pretrain") as t:
        for epoch in (1, 2):
            t.log_metrics({"val_top1": 80.0 + epoch}, step=epoch)
        t.log_metrics({"val_top1": 91.0})
        t.log_artifact(out)
    assert t.failed and len(t.missed) >= 4
    return out / PENDING_FILE


def test_untracked_stage_is_uploaded_later(compose_cfg, tmp_path, monkeypatch, caplog) -> None:
    """The store is down for the whole stage: everything it missed is written down, and
    ``napkit.tracking.upload`` later puts it into the pipeline's run, as if it had been up."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = compose_cfg("tracking.uri=http://127.0.0.1:9", f"paths.artifacts={tmp_path / 'artifacts'}")
    with caplog.at_level("WARNING"):
        pending = _untracked_stage(cfg, tmp_path)
    assert "python -m napkit.tracking.upload" in caplog.text and str(pending) in caplog.text
    saved = json.loads(pending.read_text())
    assert saved["stage"] == "pretrain" and saved["run_id"] is None and saved["config"]["seed"] == 0

    # still down: the file is kept, the command says so and fails
    assert upload_main([str(tmp_path / "artifacts")]) == 1
    assert pending.is_file()

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert upload_main(["--uri", uri, str(tmp_path / "artifacts")]) == 0
    assert not pending.exists()
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("napkit").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.tags["napkit.stage.pretrain"] == "done" and run.data.tags[PIPELINE_TAG]
    assert run.data.params["seed"] == "0"
    history = client.get_metric_history(run.info.run_id, "pretrain/val_top1")
    assert sorted((m.step, m.value) for m in history) == [(0, 91.0), (1, 81.0), (2, 82.0)]
    assert [a.path for a in client.list_artifacts(run.info.run_id, "pretrain")] == ["pretrain/metrics.json"]
    # the next stage of the same pipeline, tracked normally, joins the uploaded run
    with stage_run(compose_cfg(f"tracking.uri={uri}", f"paths.artifacts={tmp_path / 'artifacts'}"),
                   "curvature") as t:
        t.log_metrics({"seconds": 1.0})
    assert t.run_id == run.info.run_id


def test_tracked_rerun_drops_an_obsolete_pending_file(tracked, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    pending = _untracked_stage(tracked("tracking.uri=http://127.0.0.1:9"), tmp_path)
    assert pending.is_file()
    with stage_run(tracked(), "pretrain"):
        pass
    assert not pending.exists()
    assert upload_main([str(tmp_path / "artifacts")]) == 0  # nothing left to upload


def test_upload_names_a_missing_path(tmp_path, capsys) -> None:
    assert upload_main([str(tmp_path / "nowhere")]) == 2
    assert f"napkit upload: error: {tmp_path / 'nowhere'} does not exist" in capsys.readouterr().err
