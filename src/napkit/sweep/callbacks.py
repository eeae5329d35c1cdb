"""Hydra callback for ``pipelines/run.py -m ...``: one MLflow parent run per sweep, every job checked first.

``on_multirun_start`` (main process, before any job):
  * expands the sweep exactly as Hydra's basic sweeper will and composes every job's config, so an
    invalid override (``model=lenet9000``) stops the sweep with one line naming the valid choices
    before anything runs;
  * creates the sweep's PARENT run (tags: sweep dir, overrides, launcher, job count) and records its
    id in ``<sweep dir>/napkit_sweep.json`` (and ``$NAPKIT_PARENT_RUN_ID``), where jobs in other
    processes or on other machines (joblib, submitit/SLURM) find it.
``on_job_start`` (the job's process): caps torch threads when several local jobs share the CPU.
Each job's chain (``napkit.sweep.chain.run_chain``) creates its CHILD run (``mlflow.parentRunId``).
``on_multirun_end``: the parent becomes FINISHED, or FAILED when no child finished.

Registered in ``conf/config.yaml`` (``hydra.callbacks.napkit_sweep``); it acts only for the job
names in ``jobs`` (the chain entrypoint ``run``), so the per-stage entrypoints are unaffected.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from napkit.io import write_json
from napkit.sweep.chain import PARENT_ENV, PARENT_TAG, ROLE_TAG, SWEEP_FILE, ensure_experiment

log = logging.getLogger("napkit.sweep")

BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"


class InvalidSweep(ValueError):
    """A job of the sweep does not compose; the message is one line naming the valid choices."""


def _group_key(key: str) -> str:
    return key.lstrip("+~").split("@", 1)[0]


def explain(loader: Any, overrides: Sequence[str], exc: BaseException) -> str:
    """One line for a job that does not compose: the bad group option and the valid ones if found."""
    for text in overrides:
        if "=" not in text:
            continue
        key, value = text.split("=", 1)
        group = _group_key(key)
        try:
            options = loader.get_group_options(group)
        except Exception:  # noqa: BLE001 - not a group
            options = []
        if options and value not in options and value != "null":
            return (f"invalid override '{text}': no option '{value}' in config group '{group}'; "
                    f"valid choices: {', '.join(sorted(options))}")
    first = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
    return f"job [{' '.join(overrides)}] does not compose: {first}"


def expand_jobs(config: DictConfig) -> list[list[str]]:
    """Every job's overrides, as the basic sweeper will launch them (other sweepers: the fixed ones)."""
    loader = GlobalHydra.instance().config_loader()
    task = list(OmegaConf.to_container(config.hydra.overrides.task, resolve=False) or [])
    sweeper = config.hydra.get("sweeper") or {}
    if sweeper.get("_target_") != BASIC_SWEEPER:
        parser = OverridesParser.create(config_loader=loader)
        return [[o.input_line for o in parser.parse_overrides(task) if not o.is_sweep_override()]]
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

    params = [f"{k}={v}" for k, v in (sweeper.get("params") or {}).items()]
    parser = OverridesParser.create(config_loader=loader)
    batches = BasicSweeper.split_arguments(parser.parse_overrides(params + task), None)
    return [list(job) for batch in batches for job in batch]


def validate_jobs(config: DictConfig, jobs: Sequence[Sequence[str]]) -> None:
    """Compose every job's config; raise InvalidSweep (one line) for the first that fails."""
    loader = GlobalHydra.instance().config_loader()
    for overrides in jobs:
        try:
            loader.load_sweep_config(master_config=config, sweep_overrides=list(overrides))
        except Exception as exc:  # noqa: BLE001 - every composition error becomes one line
            raise InvalidSweep(explain(loader, overrides, exc)) from exc


def _client_and_experiment(config: DictConfig) -> tuple[Any, str] | None:
    tracking = config.get("tracking") or {}
    if not tracking.get("enabled", True):
        return None
    from mlflow.tracking import MlflowClient

    from napkit.tracking.mlflow_run import tracking_uri

    client = MlflowClient(tracking_uri(config))
    return client, ensure_experiment(client, str(tracking.get("experiment", "napkit")))


class SweepCallback(Callback):
    """MLflow parent run per multirun, composition of every job checked before any job starts."""

    def __init__(self, jobs: Sequence[str] = ("run",), validate: bool = True) -> None:
        self.jobs, self.validate = tuple(jobs), validate
        self.parent_run_id: str | None = None

    def _applies(self, config: DictConfig) -> bool:
        return str(config.hydra.job.name) in self.jobs

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if not self._applies(config):
            return
        jobs = expand_jobs(config)
        if self.validate:
            try:
                validate_jobs(config, jobs)
            except InvalidSweep as exc:
                # SystemExit: Hydra turns an Exception raised by a callback into a warning
                print(f"napkit sweep: error: {exc}", file=sys.stderr)
                sys.exit(2)
            log.info("sweep: %d jobs compose", len(jobs))
        found = _client_and_experiment(config)
        if found is None:
            return
        client, exp_id = found
        sweep_dir = Path(str(config.hydra.sweep.dir))
        task = list(OmegaConf.to_container(config.hydra.overrides.task, resolve=False) or [])
        name = "sweep-" + "_".join(sweep_dir.absolute().parts[-2:])
        run = client.create_run(exp_id, run_name=name, tags={
            ROLE_TAG: "sweep", "napkit.sweep.dir": str(sweep_dir.absolute()),
            "napkit.sweep.overrides": " ".join(task)[:5000], "napkit.sweep.jobs": str(len(jobs)),
            "napkit.sweep.launcher": str((config.hydra.get("launcher") or {}).get("_target_", "")),
            "napkit.sweep.job_name": str(config.hydra.job.name)})
        self.parent_run_id = run.info.run_id
        swept: dict[str, list[str]] = {}  # one param per overridden key, its values in order
        for job in jobs:
            for text in job:
                if "=" in text:
                    key, value = text.split("=", 1)
                    swept.setdefault(key.lstrip("+~"), []).append(value)  # MLflow keys: no + or ~
        for key, values in swept.items():
            client.log_param(run.info.run_id, f"sweep.{key}"[:250], ",".join(dict.fromkeys(values))[:6000])
        sweep_dir.mkdir(parents=True, exist_ok=True)
        write_json(sweep_dir / SWEEP_FILE, {"parent_run_id": self.parent_run_id, "experiment_id": exp_id,
                                            "jobs": jobs, "started": time.time()})
        os.environ[PARENT_ENV] = self.parent_run_id
        log.info("sweep: MLflow parent run %s (%s), %d jobs", self.parent_run_id, name, len(jobs))

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        launcher = config.hydra.get("launcher") or {}
        n_jobs = launcher.get("n_jobs")
        if self._applies(config) and "joblib" in str(launcher.get("_target_", "")) and n_jobs:
            import torch

            cpus = os.cpu_count() or 1
            workers = cpus if int(n_jobs) < 0 else int(n_jobs)
            torch.set_num_threads(max(1, cpus // max(1, workers)))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if not self._applies(config) or self.parent_run_id is None:
            return
        found = _client_and_experiment(config)
        if found is None:
            return
        client, exp_id = found
        children = client.search_runs([exp_id], filter_string=f"tags.`{PARENT_TAG}` = '{self.parent_run_id}'",
                                      max_results=10000)
        finished = sum(r.info.status == "FINISHED" for r in children)
        failed = len(children) - finished
        client.set_tag(self.parent_run_id, "napkit.sweep.finished", str(finished))
        client.set_tag(self.parent_run_id, "napkit.sweep.failed", str(failed))
        client.log_metric(self.parent_run_id, "sweep/children", len(children))
        client.log_metric(self.parent_run_id, "sweep/failed", failed)
        status = "FINISHED" if finished else "FAILED"
        client.set_terminated(self.parent_run_id, status=status)
        os.environ.pop(PARENT_ENV, None)
        log.info("sweep: %d jobs finished, %d failed; parent run %s %s", finished, failed,
                 self.parent_run_id, status)
