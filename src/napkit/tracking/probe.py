"""Before a stage's work: is the MLflow store it will write to writable? (A read-only ``mlflow.db``
otherwise fails deep inside MLflow, after the work.)"""

from __future__ import annotations

import sqlite3
import tempfile
from pathlib import Path
from urllib.parse import unquote, urlparse

from omegaconf import DictConfig

from napkit.errors import NapkitError
from napkit.tracking.mlflow_run import tracking_uri


def _writable_db(path: Path) -> bool:
    """Whether SQLite can start a write transaction on the existing database ``path`` (rolled back)."""
    try:
        con = sqlite3.connect(f"file:{path}?mode=rw", uri=True, timeout=10)
        try:
            con.execute("BEGIN IMMEDIATE")
            con.rollback()
        finally:
            con.close()
    except sqlite3.Error:
        return False
    return True


def _writable_dir(path: Path) -> bool:
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError:
        return False
    return True


def check_store(cfg: DictConfig) -> None:
    """Refuse, in one line, a local store (SQLite file or folder) this process cannot write.

    Remote stores (http, databricks) are not probed: an unreachable server already degrades to an
    untracked run with a pending-upload file.
    """
    if not cfg.tracking.get("enabled", True):
        return
    uri = tracking_uri(cfg)
    parsed = urlparse(uri)
    if parsed.scheme == "sqlite":
        path = Path(unquote(uri[len("sqlite:///"):]))
        ok = _writable_db(path) if path.exists() else _writable_dir(path.parent)
    elif parsed.scheme in ("", "file"):
        path = Path(unquote(parsed.path) if parsed.scheme else uri)
        ok = _writable_dir(path)
    else:
        return
    if not ok:
        raise NapkitError(f"tracking.uri={uri}: the MLflow store {path} is not writable; allowed: a writable "
                          "SQLite file or folder, or tracking=disabled to run untracked")
