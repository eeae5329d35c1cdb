"""Stable content hashes: matching checkpoints, MLflow runs and cached outputs to their configs."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any


def fingerprint(*parts: Any) -> str:
    """Short stable hash of JSON-serialisable parts (configs, shapes)."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def file_digest(*paths: Path) -> str:
    """Short hash of the named files' bytes (missing files count as absent): a stage's inputs."""
    h = hashlib.sha256()
    for path in paths:
        h.update(f"{Path(path).name}:{Path(path).is_file()}".encode())
        if Path(path).is_file():
            with open(path, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
    return h.hexdigest()[:16]
