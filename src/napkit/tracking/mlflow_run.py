"""MLflow run resolution and logging for pipeline stages.

Stages run as separate processes (DVC stages), yet a user wants ONE run per pipeline execution in
``mlflow ui``. A stage therefore joins the run tagged with its pipeline id (a hash of the whole
composed config) unless that run already holds this stage's results, in which case it starts a
new one. ``MLFLOW_RUN_ID`` (set by sweeps) forces a run. The default store is a SQLite file at an
absolute path under the repository root, so runs made inside DVC's temporary experiment copies
land in the same store.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf

from napkit.distributed import world
from napkit.hashing import fingerprint
from napkit.io import write_json

log = logging.getLogger(__name__)

PIPELINE_TAG = "napkit.pipeline"
PENDING_FILE = "tracking_pending.json"
_EXCLUDED_FROM_ID = ("tracking", "paths", "device")


def repo_root(start: Path | None = None) -> Path:
    """The project root: the nearest folder with dvc.yaml, seen through DVC's temporary exp copies."""
    here = (start or Path.cwd()).resolve()
    parts = here.parts
    if ".dvc" in parts:  # .../repo/.dvc/tmp/exps/<tmp>/... -> .../repo
        return Path(*parts[: parts.index(".dvc")])
    for folder in (here, *here.parents):
        if (folder / "dvc.yaml").is_file():
            return folder
    return here


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
            fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - any store error must not stop the stage
            self.fail(exc)
            if record is not None:
                self.missed.append(record)

    def log_params(self, params: dict[str, Any]) -> None:
        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            batch = items[i : i + 100]
            self._call(lambda: self.client.log_batch(self.run_id, params=batch),
                       record={"op": "params", "params": {p.key: p.value for p in batch}})

    def log_metrics(self, metrics: dict[str, float], step: int | None = None, prefix: str | None = None,
                    timestamp: int | None = None) -> None:
        pre = f"{self.stage}/" if prefix is None else prefix
        ts = int(time.time() * 1000) if timestamp is None else timestamp
        items = [Metric(f"{pre}{k}", float(v), ts, step or 0) for k, v in metrics.items()]
        for i in range(0, len(items), 500):
            batch = items[i : i + 500]
            self._call(lambda: self.client.log_batch(self.run_id, metrics=batch),
                       record={"op": "metrics", "metrics": {m.key: m.value for m in batch}, "step": step or 0,
                               "timestamp": ts})

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
            self._call(lambda: self.client.set_tag(self.run_id, k, str(v)),
                       record={"op": "tags", "tags": {k: str(v)}})


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


@contextmanager
def stage_run(cfg: DictConfig, stage: str) -> Iterator[StageTracker]:
    """Open the MLflow run this stage belongs to; mark the stage done, or the run failed on error.

    An unreachable store is reported in one warning and the stage runs untracked.
    """
    if not cfg.tracking.get("enabled", True) or not world().is_main:  # one writer under torchrun
        yield StageTracker(None, None, stage)
        return
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", str(cfg.tracking.get("http_retries", 2)))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(cfg.tracking.get("http_timeout", 10)))
    uri = tracking_uri(cfg)
    tracker = StageTracker(None, None, stage)
    try:
        client = MlflowClient(uri)
        run_id, created = _resolve_run(client, cfg, stage)
        tracker = StageTracker(client, run_id, stage)
        if created:
            tracker.log_params(flatten(OmegaConf.to_container(cfg, resolve=True)))
        client.update_run(run_id, status="RUNNING")
    except Exception as exc:  # noqa: BLE001 - the store is down: run untracked, say so
        tracker.fail(exc)
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
