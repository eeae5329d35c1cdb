"""MLflow run resolution and logging for pipeline stages.

Stages run as separate processes (DVC stages), yet a user wants ONE run per pipeline execution in
``mlflow ui``. A stage therefore joins the run tagged with its pipeline id (a hash of the whole
composed config) unless that run already holds this stage's results, in which case it starts a
new one. ``MLFLOW_RUN_ID`` (set by sweeps) forces a run. The default store is a SQLite file at an
absolute path under the repository root, so runs made inside DVC's temporary experiment copies
land in the same store.

Metric keys: a per-iteration series (epochs, pruning iterations) is logged with steps under
``iter/<stage>/<name>``; a stage's summary (its metrics.json: the kept result) once, without a
step, under ``<stage>/<name>``, so the latest value MLflow shows for a summary key is the result.
A run records the code (``mlflow.source.*`` tags, ``napkit.code_version``), the DVC stage and
experiment that ran it, and the resolved config as the artifact ``config.yaml``. Upstream stages
that DVC skipped (up to date) are recorded from their metrics.json, tagged ``cached``.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf

from napkit.distributed import world
from napkit.guard import signals_held
from napkit.hashing import fingerprint
from napkit.io import read_json, write_json
from napkit.provenance import code_version, git_commit, repo_root

log = logging.getLogger(__name__)

PIPELINE_TAG = "napkit.pipeline"
PENDING_FILE = "tracking_pending.json"
ITER_PREFIX = "iter/"
CONFIG_ARTIFACT = "config.yaml"
_EXCLUDED_FROM_ID = ("tracking", "paths", "device")


def tracking_uri(cfg: DictConfig) -> str:
    """Config value, else $MLFLOW_TRACKING_URI, else sqlite:///<repo root>/mlflow.db."""
    uri = cfg.tracking.get("uri") or os.environ.get("MLFLOW_TRACKING_URI")
    return str(uri) if uri else f"sqlite:///{repo_root() / 'mlflow.db'}"


def pipeline_id(cfg: DictConfig) -> str:
    """Hash of everything that determines the pipeline's results."""
    data = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(data, dict)
    return fingerprint({k: v for k, v in data.items() if k not in _EXCLUDED_FROM_ID})


def flatten(data: Any, prefix: str = "") -> dict[str, str]:
    """Nested config -> {"a.b.c": "value"} for MLflow params."""
    if isinstance(data, dict):
        out: dict[str, str] = {}
        for k, v in data.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: str(data)}


class StageTracker:
    """Logging calls for one stage; a disabled tracker accepts them all and does nothing.

    Tracking never costs a result: if the store fails mid-stage, the tracker warns once, turns
    itself off and the stage finishes with its outputs on disk (``failed`` tells the caller).
    Every call the store did not take is kept in ``missed`` (JSON-able records) so that
    ``napkit.tracking.upload`` can replay them later.
    """

    def __init__(self, client: MlflowClient | None, run_id: str | None, stage: str) -> None:
        self.client, self.run_id, self.stage = client, run_id, stage
        self.failed = False
        self.missed: list[dict[str, Any]] = []

    @property
    def enabled(self) -> bool:
        return self.client is not None

    def fail(self, exc: BaseException) -> None:
        """Turn tracking off after an error from the store, saying so once."""
        if not self.failed:
            log.warning("%s: MLflow tracking failed (%s: %s); the stage goes on and keeps its results on disk",
                        self.stage, type(exc).__name__, str(exc).splitlines()[0][:300] if str(exc) else "")
        self.client, self.failed = None, True

    def _call(self, fn: Any, *args: Any, record: dict[str, Any] | None = None, **kwargs: Any) -> None:
        """Run one store call; a failure turns tracking off, and ``record`` (the call) is kept in ``missed``."""
        if self.client is None:
            if self.failed and record is not None:
                self.missed.append(record)
            return
        try:
            with signals_held():  # a signal waits for the write: an interrupted SQLite write keeps the store locked
                fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - any store error must not stop the stage
            self.fail(exc)
            if record is not None:
                self.missed.append(record)

    def log_params(self, params: dict[str, Any]) -> None:
        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            batch = items[i : i + 100]
            self._call(self._log_batch, params=batch,
                       record={"op": "params", "params": {p.key: p.value for p in batch}})

    def _log_batch(self, **kwargs: Any) -> None:
        assert self.client is not None and self.run_id is not None
        self.client.log_batch(self.run_id, **kwargs)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None, prefix: str | None = None,
                    timestamp: int | None = None) -> None:
        """Log ``<prefix><name>`` (``prefix`` defaults to ``<stage>/``).

        With a ``step`` the values are one point of a per-iteration series, keyed
        ``iter/<prefix><name>``; without, they are the stage's summary (logged once, at step 0), so a
        series never overwrites, nor is mistaken for, the result.
        """
        pre = f"{self.stage}/" if prefix is None else prefix
        if step is not None:
            pre = f"{ITER_PREFIX}{pre}"
        ts = int(time.time() * 1000) if timestamp is None else timestamp
        items = [Metric(f"{pre}{k}", float(v), ts, step or 0) for k, v in metrics.items()]
        for i in range(0, len(items), 500):
            batch = items[i : i + 500]
            self._call(self._log_batch, metrics=batch,
                       record={"op": "metrics", "metrics": {m.key: m.value for m in batch}, "step": step or 0,
                               "timestamp": ts})

    def log_text(self, text: str, artifact_file: str) -> None:
        """``text`` as the run's artifact ``artifact_file`` (e.g. the resolved config)."""
        self._call(lambda: self.client.log_text(self.run_id, text, artifact_file),
                   record={"op": "text", "text": text, "artifact_file": artifact_file})

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        if not Path(path).exists():
            return
        target = artifact_path or self.stage
        record = {"op": "artifact", "path": str(Path(path).resolve()), "artifact_path": target}
        if Path(path).is_dir():
            self._call(lambda: self.client.log_artifacts(self.run_id, str(path), target), record=record)
        else:
            self._call(lambda: self.client.log_artifact(self.run_id, str(path), target), record=record)

    def set_tags(self, tags: dict[str, Any]) -> None:
        for k, v in tags.items():
            self._call(self._set_tag, k, str(v), record={"op": "tags", "tags": {k: str(v)}})

    def _set_tag(self, key: str, value: str) -> None:
        assert self.client is not None and self.run_id is not None
        self.client.set_tag(self.run_id, key, value)


def _resolve_run(client: MlflowClient, cfg: DictConfig, stage: str) -> tuple[str, bool]:
    """(run id, created) for this stage: forced by MLFLOW_RUN_ID, joined by pipeline id, or new."""
    forced = os.environ.get("MLFLOW_RUN_ID")
    if forced:
        return forced, False
    name = str(cfg.tracking.experiment)
    exp = client.get_experiment_by_name(name)
    exp_id = exp.experiment_id if exp else client.create_experiment(
        name, artifact_location=(repo_root() / "mlartifacts").as_uri())
    pid = pipeline_id(cfg)
    runs = client.search_runs([exp_id], filter_string=f"tags.`{PIPELINE_TAG}` = '{pid}'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    if runs and f"napkit.stage.{stage}" not in runs[0].data.tags:
        return runs[0].info.run_id, False
    run_name = f"{cfg.model.name}-{cfg.data.name}-{cfg.prune.method}-{pid[:6]}"
    run = client.create_run(exp_id, run_name=run_name, tags={PIPELINE_TAG: pid})
    return run.info.run_id, True


def provenance_tags(run_tags: dict[str, str]) -> dict[str, str]:
    """What produced this stage's results: commit, code digest, entry point, DVC stage and experiment.

    ``run_tags`` (the run's current tags) lets ``napkit.dvc.stage`` list every DVC stage of the run.
    """
    env = os.environ
    root = repo_root()
    commit = env.get("DVC_EXP_BASELINE_REV") or git_commit(root)
    dvc_stage = env.get("DVC_STAGE")
    if dvc_stage:
        source = dvc_stage.rsplit(":", 1)[0] if ":" in dvc_stage else "dvc.yaml"
    else:
        script = Path(sys.argv[0]).resolve() if sys.argv and sys.argv[0] else None
        source = script.relative_to(root).as_posix() if script and script.is_relative_to(root) else str(
            script or "python")
    tags = {"mlflow.source.type": "LOCAL", "mlflow.source.name": source, "napkit.code_version": code_version()}
    if commit:
        tags["mlflow.source.git.commit"] = commit
    if dvc_stage:
        stages = [s for s in run_tags.get("napkit.dvc.stage", "").split(",") if s]
        tags["napkit.dvc.stage"] = ",".join([*stages, dvc_stage] if dvc_stage not in stages else stages)
    if env.get("DVC_EXP_NAME"):
        tags["napkit.dvc.experiment"] = env["DVC_EXP_NAME"]
    return tags


def log_skipped_upstream(tracker: StageTracker, cfg: DictConfig, stage: str, run_tags: dict[str, str]) -> list[str]:
    """Record the summaries of the upstream stages this run lacks (DVC skipped them as up to date) from
    their metrics.json, at the file's time, tagged ``napkit.stage.<s>=cached``; returns those stages."""
    from napkit.stages import STAGES  # the stages import this module
    from napkit.stages.common import stage_dir

    if stage not in STAGES:
        return []
    logged = []
    for upstream in STAGES[: STAGES.index(stage)]:
        path = stage_dir(cfg, upstream) / "metrics.json"
        if f"napkit.stage.{upstream}" in run_tags or not path.is_file():
            continue
        metrics = {k: v for k, v in read_json(path).items() if isinstance(v, int | float)}
        tracker.log_metrics(metrics, prefix=f"{upstream}/", timestamp=int(path.stat().st_mtime * 1000))
        tracker.set_tags({f"napkit.stage.{upstream}": "cached", f"napkit.cache.{upstream}": str(path.parent)})
        logged.append(upstream)
    return logged


@contextmanager
def stage_run(cfg: DictConfig, stage: str) -> Iterator[StageTracker]:
    """Open the MLflow run this stage belongs to; mark the stage done, or the run failed on error.

    On entry the run gets the provenance tags, the resolved config (``config.yaml``) and the
    summaries of upstream stages it lacks. An unreachable store is reported in one warning and the
    stage runs untracked.
    """
    if not cfg.tracking.get("enabled", True) or not world().is_main:  # one writer under torchrun
        yield StageTracker(None, None, stage)
        return
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", str(cfg.tracking.get("http_retries", 2)))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(cfg.tracking.get("http_timeout", 10)))
    uri = tracking_uri(cfg)
    tracker = StageTracker(None, None, stage)
    run_tags: dict[str, str] | None = None
    try:
        with signals_held():
            client = MlflowClient(uri)
            run_id, created = _resolve_run(client, cfg, stage)
            tracker = StageTracker(client, run_id, stage)
            if created:
                tracker.log_params(flatten(OmegaConf.to_container(cfg, resolve=True)))
            client.update_run(run_id, status="RUNNING")
            run_tags = dict(client.get_run(run_id).data.tags)
    except Exception as exc:  # noqa: BLE001 - the store is down: run untracked, say so
        tracker.fail(exc)
    tracker.set_tags(provenance_tags(run_tags or {}))
    tracker.log_text(OmegaConf.to_yaml(cfg, resolve=True), CONFIG_ARTIFACT)
    if run_tags is not None:  # untracked: the upstream stages' own pending files hold their summaries
        skipped = log_skipped_upstream(tracker, cfg, stage, run_tags)
        if skipped:
            log.info("%s: run %s records up-to-date %s from their metrics.json", stage, tracker.run_id,
                     ", ".join(skipped))
    try:
        yield tracker
    except BaseException as exc:
        tracker.set_tags({f"napkit.error.{stage}": str(exc)[:5000]})
        status = end_status(exc)
        tracker._call(lambda: tracker.client.set_terminated(tracker.run_id, status=status))
        raise
    tracker.set_tags({f"napkit.stage.{stage}": "done"})
    tracker._call(lambda: tracker.client.set_terminated(tracker.run_id, status="FINISHED"))
    marker = pending_path(cfg, stage)
    if tracker.failed:
        write_json(marker, {"stage": stage, "uri": uri, "run_id": tracker.run_id,
                            "config": OmegaConf.to_container(cfg, resolve=True), "calls": tracker.missed})
        log.warning("%s: finished UNTRACKED (MLflow store %s failed); outputs are on disk; once the store is "
                    "back, `python -m napkit.tracking.upload %s` records what was missed", stage, uri, marker)
    else:
        marker.unlink(missing_ok=True)  # tracked now: an older pending upload is obsolete
        log.info("%s: tracked in MLflow run %s (%s)", stage, tracker.run_id, uri)


def end_status(exc: BaseException) -> str:
    """The MLflow status of a run a stage left by ``exc``: KILLED for a signal or Ctrl-C, else FAILED."""
    from napkit.errors import Interrupted

    return "KILLED" if isinstance(exc, Interrupted | KeyboardInterrupt) else "FAILED"


def pending_path(cfg: DictConfig, stage: str) -> Path:
    """Where a stage that finished untracked keeps the calls the store missed:
    ``<stage folder>/tracking_pending.json``."""
    from napkit.stages.common import stage_dir  # the stages import this module

    try:
        folder = stage_dir(cfg, stage)
    except ValueError:  # a stage outside the DVC pipeline (no content-addressed key)
        folder = Path(cfg.paths.artifacts) / stage
    return folder / PENDING_FILE
