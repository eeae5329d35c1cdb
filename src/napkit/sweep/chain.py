"""The whole chain pretrain -> curvature -> prune -> finetune -> evaluate for one configuration.

Outputs are content addressed (``paths.content_addressed=true``): each stage writes to
``<artifacts>/<stage>/<hash of the config it depends on>/``, so jobs of a sweep that share a
model/data/train config share the pretrain and curvature outputs. A stage whose folder already
holds its ``metrics.json`` (written last, atomically) is a cache hit and is skipped; a file lock per
stage folder makes concurrent jobs (joblib, SLURM arrays on a shared file system) wait for the one
computing it instead of computing it twice.

Every chain owns one MLflow run (a child of the sweep's parent run in a multirun) and forces the
stages into it with ``MLFLOW_RUN_ID``. A cache hit logs the cached stage's metrics (and its small
files) into the run too, so every run is complete for comparison. In a multirun the chain catches a
failing stage, marks its run FAILED with the error as a tag and returns, so the sweep goes on.
"""

from __future__ import annotations

import csv
import logging
import os
import socket
import time
import traceback
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout
from omegaconf import DictConfig, OmegaConf

from napkit.data import data_fingerprint
from napkit.errors import unknown_choice
from napkit.io import read_json, write_json
from napkit.provenance import code_version
from napkit.schema import validate_config
from napkit.stages import FLOWS, stage_runner
from napkit.stages.common import clean_checkpoints, stage_dir
from napkit.tracking.mlflow_run import (
    PIPELINE_TAG,
    StageTracker,
    flatten,
    pipeline_id,
    repo_root,
    tracking_uri,
)

log = logging.getLogger("napkit.sweep")

SWEEP_FILE = "napkit_sweep.json"  # in the sweep dir: the parent run id, for jobs in other processes
PARENT_ENV = "NAPKIT_PARENT_RUN_ID"
CHAIN_FILE = "chain.json"  # beside a stage's metrics.json: how long it took, which run computed it
PARENT_TAG = "mlflow.parentRunId"
ROLE_TAG = "napkit.role"


@dataclass
class ChainResult:
    """What one chain did: each stage's metrics, which stages were cache hits, the run and status."""

    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    cached: list[str] = field(default_factory=list)
    computed: list[str] = field(default_factory=list)
    run_id: str | None = None
    status: str = "RUNNING"
    error: str | None = None


def prepare(cfg: DictConfig) -> DictConfig:
    """A copy with content-addressed outputs forced, keyed by the code version and the data's fingerprint
    too (a code change or replaced data files rerun what they touch), and the artifacts folder made
    absolute (so ``hydra.job.chdir=true`` and cluster jobs write to the same cache)."""
    cfg = cfg.copy()
    OmegaConf.set_struct(cfg, False)
    cfg.paths.content_addressed = True
    cfg.paths.code_version = code_version()
    cfg.paths.data_fingerprint = data_fingerprint(cfg.data)
    cfg.paths.artifacts = str(Path(str(cfg.paths.artifacts)).expanduser().absolute())
    return cfg


def read_sweep_info(sweep_dir: str | os.PathLike[str] | None) -> dict[str, Any]:
    """The sweep's parent-run record (written by the callback), or {} outside a tracked sweep."""
    if sweep_dir:
        path = Path(sweep_dir) / SWEEP_FILE
        if path.is_file():
            return read_json(path)
    parent = os.environ.get(PARENT_ENV)
    return {"parent_run_id": parent} if parent else {}


def ensure_experiment(client: Any, name: str) -> str:
    """The experiment's id, created (artifacts under <repo>/mlartifacts) when missing; race-safe."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(name, artifact_location=(repo_root() / "mlartifacts").as_uri())
    except Exception:  # another job created it first
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def flow(cfg: DictConfig) -> tuple[str, ...]:
    """The stages ``cfg.pipeline`` runs: ``nap`` (pretrain .. evaluate) or ``chex`` (train from scratch)."""
    name = str(cfg.get("pipeline", "nap"))
    if name not in FLOWS:
        raise unknown_choice("pipeline", name, FLOWS)
    return FLOWS[name]


def method_name(cfg: DictConfig) -> str:
    """What a run is compared by: ``chex`` for the CHEX flow, else the pruning method."""
    return "chex" if str(cfg.get("pipeline", "nap")) == "chex" else str(cfg.prune.method)


def default_run_name(cfg: DictConfig) -> str:
    return f"{cfg.model.name}-{cfg.data.name}-{method_name(cfg)}-{pipeline_id(cfg)[:6]}"


def run_name(choices: dict[str, str], overrides: Sequence[str], jobs: Sequence[Sequence[str]]) -> str:
    """``<model>/<prune>`` plus the other overrides that vary across the sweep's jobs."""
    values: dict[str, set[str]] = {}
    for job in jobs:
        for text in job:
            key, _, value = text.partition("=")
            values.setdefault(key, set()).add(value)
    varying = [o for o in overrides if len(values.get(o.partition("=")[0], ())) > 1
               and o.partition("=")[0] not in ("model", "prune")]
    return " ".join([f"{choices.get('model', '?')}/{choices.get('prune', '?')}", *varying])


@contextmanager
def _forced_run(run_id: str | None) -> Iterator[None]:
    """Set ``MLFLOW_RUN_ID`` for the stages, restore the previous value afterwards."""
    previous = os.environ.get("MLFLOW_RUN_ID")
    if run_id:
        os.environ["MLFLOW_RUN_ID"] = run_id
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("MLFLOW_RUN_ID", None)
        else:
            os.environ["MLFLOW_RUN_ID"] = previous


@contextmanager
def stage_lock(out: Path, stage: str) -> Iterator[None]:
    """Exclusive lock on a stage folder; says so when it has to wait for another job."""
    out.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(out.parent / f".{out.name}.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.info("%s: another job is computing %s, waiting", stage, out)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def _is_done(out: Path) -> bool:
    return (out / "metrics.json").is_file()


def _small_files(out: Path) -> list[Path]:
    """What a cache hit copies into its run: tables, plots, metrics (never the models)."""
    return [p for p in sorted(out.iterdir()) if p.is_file() and p.suffix in (".csv", ".png", ".json")]


def _log_cache_hit(tracker: StageTracker, stage: str, out: Path, metrics: dict[str, float]) -> None:
    if not tracker.enabled:
        return
    tracker.log_metrics(metrics)
    for path in _small_files(out):
        tracker.log_artifact(path, stage)
    if stage == "prune" and (out / "layers.csv").is_file():  # the per-layer ratios at the kept iteration
        with (out / "layers.csv").open() as fh:
            density = {row["layer"]: float(row["density"]) for row in csv.DictReader(fh)}
        tracker.log_metrics(density, prefix="prune/density/")  # a summary, as a computed prune logs it
    tracker.set_tags({f"napkit.stage.{stage}": "cached", f"napkit.cache.{stage}": str(out)})


def run_chain(cfg: DictConfig, *, stages: Sequence[str] | None = None, parent_run_id: str | None = None,
              run_name: str | None = None, tags: dict[str, str] | None = None,
              catch: bool = False) -> ChainResult:
    """Run ``stages`` (default: ``cfg.pipeline``'s flow) in order for ``cfg`` with content-addressed
    caching, in one MLflow run.

    ``parent_run_id`` makes the run a child of a sweep's parent run. ``catch=True`` (multirun)
    turns a failing stage into a FAILED run and a returned result instead of an exception.
    """
    cfg = prepare(cfg)
    stages = flow(cfg) if stages is None else stages
    result = ChainResult()
    client = None
    if cfg.tracking.get("enabled", True):
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri(cfg))
        exp_id = ensure_experiment(client, str(cfg.tracking.experiment))
        run_tags = {PIPELINE_TAG: pipeline_id(cfg), ROLE_TAG: "chain", **(tags or {})}
        if parent_run_id:
            run_tags[PARENT_TAG] = parent_run_id
        run = client.create_run(exp_id, run_name=run_name or default_run_name(cfg), tags=run_tags)
        result.run_id = run.info.run_id
        StageTracker(client, result.run_id, "chain").log_params(flatten(OmegaConf.to_container(cfg, resolve=True)))
        log.info("chain: MLflow run %s%s", result.run_id, f" (parent {parent_run_id})" if parent_run_id else "")

    current = "config"  # what failed: the config's validation, else the stage that raised
    t_chain = time.perf_counter()
    with _forced_run(result.run_id):
        tracker = StageTracker(client, result.run_id, "chain")
        try:
            validate_config(cfg)  # a bad value fails in one line before any stage's work
            for stage in stages:
                current = stage
                out = stage_dir(cfg, stage)
                t0 = time.perf_counter()
                with stage_lock(out, stage):
                    if _is_done(out):
                        metrics = read_json(out / "metrics.json")
                        info = read_json(out / CHAIN_FILE) if (out / CHAIN_FILE).is_file() else {}
                        if "seconds" not in metrics and "seconds" in info:
                            metrics["seconds"] = info["seconds"]
                        log.info("%s: cache hit, reusing %s", stage, out)
                        _log_cache_hit(StageTracker(client, result.run_id, stage), stage, out, metrics)
                        result.cached.append(stage)
                    else:
                        log.info("%s: computing into %s", stage, out)
                        metrics = dict(stage_runner(stage)(cfg))
                        clean_checkpoints(cfg, stage)  # completed: its resume state is dead weight
                        seconds = time.perf_counter() - t0
                        write_json(out / CHAIN_FILE, {"seconds": seconds, "run_id": result.run_id,
                                                      "host": socket.gethostname(), "finished": time.time(),
                                                      "key": out.name})
                        if "seconds" not in metrics:  # prune and evaluate do not time themselves
                            metrics["seconds"] = seconds
                            StageTracker(client, result.run_id, stage).log_metrics({"seconds": seconds})
                        result.computed.append(stage)
                result.metrics[stage] = metrics
                tracker.log_metrics({f"{stage}_seconds": time.perf_counter() - t0}, prefix="chain/")
        except Exception as exc:  # noqa: BLE001 - a failing job must not stop a sweep
            result.status, result.error = "FAILED", f"{current}: {type(exc).__name__}: {exc}"
            if client is not None:
                client.set_tag(result.run_id, "napkit.error", result.error[:5000])
                client.set_tag(result.run_id, "napkit.error.traceback", traceback.format_exc()[-5000:])
                client.set_terminated(result.run_id, status="FAILED")
            if not catch:
                raise
            log.error("chain failed at %s (the sweep goes on): %s", current, result.error)
            return result
        except BaseException:  # Ctrl-C, SLURM's SIGTERM->KeyboardInterrupt: not a failure of the config
            if client is not None:
                client.set_terminated(result.run_id, status="KILLED")
            raise
        result.status = "FINISHED"
        if client is not None:
            tracker.log_metrics({"seconds": time.perf_counter() - t_chain,
                                 "cache_hits": len(result.cached)}, prefix="chain/")
            client.set_tag(result.run_id, "napkit.cache_hits", ",".join(result.cached) or "none")
            client.set_terminated(result.run_id, status="FINISHED")
    return result
