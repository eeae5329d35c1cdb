"""Record in MLflow what a stage that finished untracked could not log (``tracking_pending.json``).

A stage whose MLflow store failed keeps going, and at its end writes every call the store did not
take (metrics with their steps and times, tags, artifacts) together with its composed config into
``<stage folder>/tracking_pending.json``. Once the store is back::

    python -m napkit.tracking.upload                  # every pending file under ./artifacts
    python -m napkit.tracking.upload artifacts/prune  # one stage (a folder or the file itself)
    python -m napkit.tracking.upload --uri http://mlflow:5000 artifacts

replays them into the run the stage belonged to (the pipeline's run, found by its config hash, or
a new one), marks the stage done and the run finished, and deletes the pending file. A file whose
upload fails again is kept, holding what is still missing.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mlflow.entities import Metric
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf

from napkit.errors import NapkitError
from napkit.io import read_json, write_json
from napkit.tracking.mlflow_run import PENDING_FILE, StageTracker, _resolve_run, flatten, tracking_uri

log = logging.getLogger(__name__)


def find_pending(paths: Sequence[str | Path]) -> list[Path]:
    """The pending files named, or found (recursively) in the folders named."""
    found: list[Path] = []
    for path in map(Path, paths):
        if path.is_file():
            found.append(path)
        elif path.is_dir():
            found.extend(sorted(path.rglob(PENDING_FILE)))
        else:
            raise NapkitError(f"{path} does not exist; name a stage folder or a {PENDING_FILE} file")
    return found


def _replay(tracker: StageTracker, record: dict[str, Any]) -> None:
    """One missed call, sent again (as it was: same metric steps and times)."""
    op, client, run_id = record["op"], tracker.client, tracker.run_id
    assert client is not None and run_id is not None
    if op == "metrics":
        metrics = [Metric(k, float(v), int(record["timestamp"]), int(record["step"]))
                   for k, v in record["metrics"].items()]
        tracker._call(lambda: client.log_batch(run_id, metrics=metrics), record=record)
    elif op == "params":
        tracker.log_params(record["params"])
    elif op == "tags":
        tracker.set_tags(record["tags"])
    elif op == "text":
        tracker.log_text(record["text"], record["artifact_file"])
    elif op == "artifact":
        path = Path(record["path"])
        if not path.exists():
            log.warning("%s: artifact %s is gone; skipped", tracker.stage, path)
        elif path.is_dir():  # file by file: the pending file itself is not an artifact
            for file in sorted(p for p in path.rglob("*") if p.is_file() and p.name != PENDING_FILE):
                parent = file.parent.relative_to(path).as_posix()
                target = record["artifact_path"] if parent == "." else f"{record['artifact_path']}/{parent}"
                tracker._call(client.log_artifact, run_id, str(file), target, record=record)
        else:
            target = record["artifact_path"]
            tracker._call(lambda: client.log_artifact(run_id, str(path), target), record=record)
    else:
        raise NapkitError(f"unknown call {op!r} in a pending tracking file; valid: artifact, metrics, params, tags, "
                          "text")


def upload(pending: Path, uri: str | None = None) -> str:
    """Replay one pending file into MLflow; returns the run id. The file is deleted once all went in."""
    saved = read_json(pending)
    try:
        stage, calls, cfg = saved["stage"], list(saved["calls"]), OmegaConf.create(saved["config"])
    except (KeyError, TypeError) as exc:
        raise NapkitError(f"{pending} is not a napkit pending tracking file (missing {exc})") from exc
    assert isinstance(cfg, DictConfig)
    if uri:
        cfg.tracking.uri = uri
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", str(cfg.tracking.get("http_retries", 2)))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(cfg.tracking.get("http_timeout", 10)))
    target = tracking_uri(cfg)
    client = MlflowClient(target)
    try:
        run_id = saved.get("run_id")
        created = False
        if run_id is None:
            run_id, created = _resolve_run(client, cfg, stage)
        tracker = StageTracker(client, run_id, stage)
        if created:
            tracker.log_params(flatten(OmegaConf.to_container(cfg, resolve=True)))
    except Exception as exc:
        raise NapkitError(f"cannot reach MLflow store {target} ({type(exc).__name__}); {pending} kept") from exc
    for record in calls:
        _replay(tracker, record)
    tracker.set_tags({f"napkit.stage.{stage}": "done", f"napkit.uploaded.{stage}": str(pending)})
    tracker._call(lambda: client.set_terminated(run_id, status="FINISHED"))
    if tracker.failed:
        write_json(pending, {**saved, "run_id": run_id, "calls": tracker.missed})
        raise NapkitError(f"upload of {pending} to {target} failed part way; what is still missing stays in it")
    pending.unlink()
    return run_id


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m napkit.tracking.upload [PATH ...] [--uri URI]``; exit status 1 if any upload failed."""
    parser = argparse.ArgumentParser(prog="python -m napkit.tracking.upload", description=__doc__.split("\n")[0])
    parser.add_argument("paths", nargs="*", default=["artifacts"],
                        help=f"stage folders or {PENDING_FILE} files (default: artifacts, searched recursively)")
    parser.add_argument("--uri", help="tracking URI (default: the one the stage used: config, "
                                      "$MLFLOW_TRACKING_URI, or sqlite:///<repo>/mlflow.db)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        pending = find_pending(args.paths)
    except NapkitError as exc:
        print(f"napkit upload: error: {exc}", file=sys.stderr)
        return 2
    if not pending:
        print(f"nothing to upload: no {PENDING_FILE} under {', '.join(args.paths)}")
        return 0
    status = 0
    for path in pending:
        try:
            run_id = upload(path, args.uri)
            print(f"uploaded {path} to MLflow run {run_id}")
        except NapkitError as exc:
            print(f"napkit upload: error: {exc}", file=sys.stderr)
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
