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

log = logging.getLogger(__name__)

PIPELINE_TAG = "napkit.pipeline"
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
    """Logging calls for one stage; a disabled tracker accepts them all and does nothing."""

    def __init__(self, client: MlflowClient | None, run_id: str | None, stage: str) -> None:
        self.client, self.run_id, self.stage = client, run_id, stage

    @property
    def enabled(self) -> bool:
        return self.client is not None

    def log_params(self, params: dict[str, Any]) -> None:
        if self.client:
            items = [Param(k, str(v)[:6000]) for k, v in params.items()]
            for i in range(0, len(items), 100):
                self.client.log_batch(self.run_id, params=items[i : i + 100])

    def log_metrics(self, metrics: dict[str, float], step: int | None = None, prefix: str | None = None) -> None:
        if self.client:
            pre = f"{self.stage}/" if prefix is None else prefix
            ts = int(time.time() * 1000)
            items = [Metric(f"{pre}{k}", float(v), ts, step or 0) for k, v in metrics.items()]
            for i in range(0, len(items), 500):
                self.client.log_batch(self.run_id, metrics=items[i : i + 500])

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        if self.client and Path(path).exists():
            target = artifact_path or self.stage
            if Path(path).is_dir():
                self.client.log_artifacts(self.run_id, str(path), target)
            else:
                self.client.log_artifact(self.run_id, str(path), target)

    def set_tags(self, tags: dict[str, Any]) -> None:
        if self.client:
            for k, v in tags.items():
                self.client.set_tag(self.run_id, k, str(v))


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
    """Open the MLflow run this stage belongs to; mark the stage done, or the run failed on error."""
    if not cfg.tracking.get("enabled", True) or not world().is_main:  # one writer under torchrun
        yield StageTracker(None, None, stage)
        return
    client = MlflowClient(tracking_uri(cfg))
    run_id, created = _resolve_run(client, cfg, stage)
    tracker = StageTracker(client, run_id, stage)
    if created:
        tracker.log_params(flatten(OmegaConf.to_container(cfg, resolve=True)))
    client.update_run(run_id, status="RUNNING")
    try:
        yield tracker
    except BaseException as exc:
        client.set_tag(run_id, f"napkit.error.{stage}", str(exc)[:5000])
        client.set_terminated(run_id, status="FAILED")
        raise
    client.set_tag(run_id, f"napkit.stage.{stage}", "done")
    client.set_terminated(run_id, status="FINISHED")
    log.info("%s: tracked in MLflow run %s (%s)", stage, run_id, tracking_uri(cfg))
