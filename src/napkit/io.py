"""Atomic file writes and safe checkpoint loading.

Every output is written to a temporary file in the same directory and renamed into place,
so a process killed mid-write leaves either the old file or none, never a half-written one
(the next write of that file removes the killed writer's temporary file).
Checkpoints are loaded with ``weights_only=True``: a file that carries pickled code is refused.
"""

from __future__ import annotations

import glob
import json
import os
import socket
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from napkit.errors import NapkitError

_HOST = socket.gethostname()
_UMASK = os.umask(0)
os.umask(_UMASK)


def _alive(pid: int) -> bool:
    """Whether a process with this id exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _stale(tmp: Path) -> bool:
    """Whether ``tmp`` (``.<name>.<host>.<pid>.<random>.tmp``) belongs to a dead writer on this host."""
    at = tmp.name.rfind(f".{_HOST}.")
    owner = tmp.name[at + len(_HOST) + 2 : -len(".tmp")].split(".") if at > 0 else []
    return len(owner) == 2 and owner[0].isdigit() and not _alive(int(owner[0]))


def remove_stale_temps(target: Path) -> list[Path]:
    """Delete the temporary files that writers of ``target`` killed mid-write left behind.

    A temporary file is named ``.<name>.<host>.<pid>.<random>.tmp``; it is stale when its writer ran on
    this host and is gone. Files of live writers and of other hosts (a shared filesystem) are kept.
    """
    removed = []
    for tmp in target.parent.glob(f".{glob.escape(target.name)}.*.tmp"):
        if _stale(tmp):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def clean_stale_temps(*folders: Path) -> list[Path]:
    """At a stage's start: delete every dead writer's temporary file in ``folders`` (a kill inside a
    write leaves a full-size one that no later write of another file would remove)."""
    removed = []
    for folder in folders:
        for tmp in Path(folder).glob(".*.tmp") if Path(folder).is_dir() else []:
            if tmp.is_file() and _stale(tmp):
                tmp.unlink(missing_ok=True)
                removed.append(tmp)
    return removed


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` if the block succeeds.

    Temporary files that an earlier, killed writer of ``path`` left behind are removed first.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(target)
    prefix = f".{target.name}.{_HOST}.{os.getpid()}."
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        # mkstemp makes 0600 (and some writers, safetensors' among them, replace the file with another
        # 0600 one): outputs get the usual umask-based mode
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_with(path: str | os.PathLike[str], writer: Callable[[Path], None]) -> Path:
    """Run ``writer(tmp_path)`` and atomically move the result to ``path``."""
    with atomic_path(path) as tmp:
        writer(tmp)
    return Path(path)


def write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Atomically write a text file."""
    return write_with(path, lambda p: p.write_text(text))


def write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    """Atomically write ``obj`` as pretty JSON."""
    return write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def read_json(path: str | os.PathLike[str]) -> Any:
    """Read a JSON file, with a clear error if it is missing or corrupt."""
    p = Path(path)
    if not p.is_file():
        raise NapkitError(f"missing file {p}; run the stage that writes it first")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise NapkitError(f"corrupt JSON file {p}: {exc}") from exc


def _json_default(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def save_torch(path: str | os.PathLike[str], obj: Any) -> Path:
    """Atomically ``torch.save`` a checkpoint made only of tensors and plain Python values."""
    return write_with(path, lambda p: torch.save(obj, p))


def load_torch(path: str | os.PathLike[str]) -> Any:
    """Load a checkpoint with ``weights_only=True``; refuse pickled code with a clear error."""
    p = Path(path)
    if not p.is_file():
        raise NapkitError(f"missing checkpoint {p}")
    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError or RuntimeError for unsafe/corrupt files
        raise NapkitError(
            f"cannot load checkpoint {p} with weights_only=True (corrupt, or it contains pickled code): "
            f"{str(exc).splitlines()[0]}; delete it to start the stage over"
        ) from exc


def check_finite(tensors: dict[str, torch.Tensor], what: str) -> None:
    """Refuse NaN / Inf in floating-point tensors, naming the first bad one (a diverged run's weights)."""
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise NapkitError(f"{what}: {name} has {bad} NaN/Inf value(s) of {t.numel()}; the run that wrote "
                              "it diverged: rerun it (e.g. with a lower learning rate)")


def save_tensors(
    path: str | os.PathLike[str], tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> Path:
    """Atomically write tensors as a safetensors file (contiguous copies, no shared storage)."""
    clean = {k: v.detach().contiguous().clone() for k, v in tensors.items()}
    return write_with(path, lambda p: save_file(clean, str(p), metadata=metadata))


def load_tensors(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read a safetensors file, with a clear error if it is missing or corrupt."""
    p = Path(path)
    if not p.is_file():
        raise NapkitError(f"missing tensor file {p}; run the stage that writes it first")
    try:
        return load_file(str(p))
    except Exception as exc:
        raise NapkitError(f"corrupt safetensors file {p}: {exc}") from exc
