"""MLflow run resolution: one run per pipeline execution, shared by its stages."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest
import yaml
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from napkit.entrypoint import run_stage
from napkit.provenance import code_version, git_commit
from napkit.stages import STAGES
from napkit.stages.common import stage_dir
from napkit.tracking import stage_run
from napkit.tracking.mlflow_run import PENDING_FILE, PIPELINE_TAG, repo_root
from napkit.tracking.upload import main as upload_main

ROOT = Path(__file__).resolve().parents[1]


def _client(cfg) -> MlflowClient:
    return MlflowClient(cfg.tracking.uri)


@pytest.fixture
def tracked(compose_cfg, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # for mlflow.search_runs, as a user would read them

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
    history = client.get_metric_history(run.info.run_id, "iter/pretrain/val_top1")
    assert sorted((m.step, m.value) for m in history) == [(1, 81.0), (2, 82.0)]
    assert run.data.metrics["pretrain/val_top1"] == 91.0  # the summary, apart from the series
    assert [a.path for a in client.list_artifacts(run.info.run_id, "pretrain")] == ["pretrain/metrics.json"]
    assert "config.yaml" in [a.path for a in client.list_artifacts(run.info.run_id)]  # replayed too
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


def test_series_never_hide_the_kept_summary(tracked) -> None:
    """The loop went on to 8x, was rolled back and kept 4x: MLflow's latest value says 4x, the
    iteration series keeps all three points under its own key."""
    cfg = tracked()
    with stage_run(cfg, "prune") as t:
        for it, compression in enumerate((2.0, 4.0, 8.0), start=1):
            t.log_metrics({"compression": compression}, step=it)
            t.log_metrics({"conv1": 1 / compression}, step=it, prefix="prune/density/")
        t.log_metrics({"compression": 4.0, "kept_iteration": 2})
    (row,) = mlflow.search_runs(experiment_names=[cfg.tracking.experiment], output_format="list")
    assert row.data.metrics["prune/compression"] == 4.0
    assert row.data.metrics["iter/prune/compression"] == 8.0 and "iter/prune/density/conv1" in row.data.metrics
    history = _client(cfg).get_metric_history(row.info.run_id, "iter/prune/compression")
    assert sorted((m.step, m.value) for m in history) == [(1, 2.0), (2, 4.0), (3, 8.0)]
    assert [m.value for m in _client(cfg).get_metric_history(row.info.run_id, "prune/compression")] == [4.0]


def test_run_records_code_dvc_stage_experiment_and_resolved_config(tracked, monkeypatch) -> None:
    monkeypatch.setenv("DVC_STAGE", "prune")
    monkeypatch.setenv("DVC_EXP_NAME", "wooly-bear")
    monkeypatch.delenv("DVC_EXP_BASELINE_REV", raising=False)
    cfg = tracked("prune.step_fraction=0.3")
    with stage_run(cfg, "prune") as t:
        pass
    monkeypatch.setenv("DVC_STAGE", "finetune")
    with stage_run(cfg, "finetune"):
        pass
    run = _client(cfg).get_run(t.run_id)
    tags = run.data.tags
    assert tags["mlflow.source.git.commit"] == git_commit(ROOT) and len(tags["mlflow.source.git.commit"]) == 40
    assert tags["mlflow.source.name"] == "dvc.yaml" and tags["mlflow.source.type"] == "LOCAL"
    assert tags["napkit.dvc.stage"] == "prune,finetune" and tags["napkit.dvc.experiment"] == "wooly-bear"
    assert tags["napkit.code_version"] == code_version()
    text = (Path(mlflow.artifacts.download_artifacts(run_id=t.run_id, artifact_path="config.yaml",
                                                     tracking_uri=cfg.tracking.uri))).read_text()
    assert yaml.safe_load(text) == OmegaConf.to_container(cfg, resolve=True)
    assert yaml.safe_load(text)["prune"]["step_fraction"] == 0.3


def test_stages_dvc_skipped_are_recorded_from_their_metrics(tracked, tmp_path) -> None:
    """`dvc exp run` reran prune only: the run still holds pretrain's and curvature's results."""
    cfg = tracked()
    for stage, value in (("pretrain", 91.5), ("curvature", 2.0)):
        folder = stage_dir(cfg, stage)
        folder.mkdir(parents=True)
        (folder / "metrics.json").write_text(json.dumps({"val_top1": value, "seconds": 3.0}))
    with stage_run(cfg, "prune") as t:
        t.log_metrics({"sparsity": 0.9})
    run = _client(cfg).get_run(t.run_id)
    assert run.data.metrics["pretrain/val_top1"] == 91.5 and run.data.metrics["curvature/val_top1"] == 2.0
    assert run.data.tags["napkit.stage.pretrain"] == "cached" and run.data.tags["napkit.stage.prune"] == "done"
    assert "finetune/seconds" not in run.data.metrics  # downstream stages are not guessed
    with stage_run(cfg, "finetune"):  # the same execution goes on: prune ran here, not re-recorded
        pass
    history = _client(cfg).get_metric_history(t.run_id, "pretrain/val_top1")
    assert len(history) == 1


def test_pipeline_latest_values_equal_the_kept_results(tracked, tmp_path) -> None:
    """The five real stages, run as their entrypoints do: every summary MLflow shows (read through
    mlflow.search_runs) is the stage's metrics.json, the pruning path is a series, and no resume
    checkpoint outlives its stage. (This config rolls back: it keeps iteration 2 of 3 here.)"""
    cfg = tracked("model=lenet5", "train.epochs=2", "finetune.epochs=1", "prune.max_iterations=3",
                  "prune.finetune_epochs=1", "prune.tolerance=0.5", "curvature.num_samples=64",
                  "evaluate.latency=false", "data.subset_train=192")
    for stage in STAGES:
        run_stage(stage, cfg)
        assert not list((tmp_path / "artifacts" / "checkpoints").glob(f"{stage}*")), stage
    (row,) = mlflow.search_runs(experiment_names=[cfg.tracking.experiment], output_format="list")
    for stage in STAGES:
        saved = json.loads((stage_dir(cfg, stage) / "metrics.json").read_text())
        for key, value in saved.items():
            assert row.data.metrics[f"{stage}/{key}"] == pytest.approx(value), (stage, key)
    kept = int(row.data.metrics["prune/kept_iteration"])
    history = _client(cfg).get_metric_history(row.info.run_id, "iter/prune/compression")
    assert len(history) == row.data.metrics["prune/iterations"] + 1  # the dense model is iteration 0
    assert [m.value for m in history if m.step == kept] == [pytest.approx(row.data.metrics["prune/compression"])]
    assert len(_client(cfg).get_metric_history(row.info.run_id, "iter/pretrain/val_top1")) == 2
