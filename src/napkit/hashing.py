"""Stable content hashes: matching checkpoints, MLflow runs and cached outputs to their configs."""

from __future__ import annotations

import hashlib
import json
from typing import Any


def fingerprint(*parts: Any) -> str:
    """Short stable hash of JSON-serialisable parts (configs, shapes)."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
