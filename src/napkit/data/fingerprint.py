"""A cheap fingerprint of the data a configuration reads, for cache keys (content-addressed run folders).

Files under the configured ``root``: :func:`~napkit.data.datasets.folder_fingerprint` (every file's
relative path, size and modification time), so a replaced or added image gives a new key without
reading a byte of it. A dataset without files
(scikit-learn's digits, shipped in its wheel): the name and version of the package that ships it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

from napkit.data.datasets import folder_fingerprint

_EMBEDDED = {"digits": "scikit-learn"}


def data_fingerprint(data: Mapping[str, Any]) -> str:
    """16-hex digest of the files (or the shipping package) behind a ``data`` config group."""
    h = hashlib.sha256(str(data.get("name")).encode())
    root = data.get("root")
    if root and Path(str(root)).expanduser().exists():
        h.update(folder_fingerprint(Path(str(root)).expanduser()).encode())
    elif data.get("name") in _EMBEDDED:
        package = _EMBEDDED[str(data.get("name"))]
        h.update(f"{package}=={metadata.version(package)}".encode())
    return h.hexdigest()[:16]
