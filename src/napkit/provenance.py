"""Which code produced a result: the git commit and a digest of the code that runs.

``code_version()`` keys caches (the sweep's run folders) and tags MLflow runs: it changes whenever
a file under ``src/``, ``pipelines/`` or ``conf/`` changes, committed or not, and not for commits
that change no code or for files elsewhere (docs, benchmarks). Committing an uncommitted change
gives a new version for the same bytes: one extra rerun, never a stale cache hit.
"""

from __future__ import annotations

import hashlib
import subprocess
from collections.abc import Sequence
from pathlib import Path

CODE_PATHS = ("src", "pipelines", "conf")
_SKIPPED_PARTS = ("__pycache__", ".pytest_cache")


def _git(root: Path, *args: str) -> str | None:
    """stdout of ``git -C root args``, or None outside a git checkout (or without git)."""
    try:
        proc = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, check=False)
    except OSError:
        return None
    return proc.stdout if proc.returncode == 0 else None


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


def _default_root() -> Path:
    """The checkout the running napkit package was imported from (the code that runs)."""
    return repo_root(Path(__file__).resolve().parent)


def git_commit(root: Path | None = None) -> str | None:
    """The checked-out commit (40 hex digits), or None outside a git checkout or before the first commit."""
    out = _git(root or _default_root(), "rev-parse", "--verify", "-q", "HEAD")
    return out.strip() if out else None


def _code_files(root: Path, paths: Sequence[str]) -> list[Path]:
    """Every file under ``paths`` but byte code and tool caches."""
    files = [p for name in paths if (root / name).exists()
             for p in ((root / name).rglob("*") if (root / name).is_dir() else [root / name])]
    return sorted(p for p in files if p.is_file() and not p.name.endswith(".pyc")
                  and not any(part in _SKIPPED_PARTS for part in p.relative_to(root).parts))


def _hash_files(h: hashlib._Hash, root: Path, files: Sequence[Path]) -> None:
    """Each file's path and bytes (a deleted one as such) into ``h``."""
    for path in files:
        h.update(path.relative_to(root).as_posix().encode() + b"\0")
        h.update(hashlib.sha256(path.read_bytes()).digest() if path.is_file() else b"<deleted>")


def code_version(root: Path | None = None, paths: Sequence[str] = CODE_PATHS) -> str:
    """16-hex digest of the code under ``paths`` (relative to ``root``, default the repository root).

    In a git checkout: the committed tree hashes of ``paths`` (``git rev-parse HEAD:<path>``) plus a
    digest of what differs from them (modified, deleted and untracked, not ignored, files) — cheap
    and exact. Outside one (an sdist, a copied folder): a digest of every file's bytes.
    """
    if root is None and not (_default_root() / "src").is_dir():  # an installed package: hash the package
        root, paths = Path(__file__).resolve().parent, (".",)
    root = Path(root or _default_root()).resolve()
    h = hashlib.sha256()
    top = _git(root, "rev-parse", "--show-toplevel")
    present = [p for p in paths if (root / p).exists()]
    # not its own checkout (DVC's temp copies live inside the repo's .dvc/tmp), or no commit to diff against
    if top is None or Path(top.strip()).resolve() != root or git_commit(root) is None or not present:
        h.update(b"files\0")
        _hash_files(h, root, _code_files(root, paths))
        return h.hexdigest()[:16]
    h.update(b"git\0")
    for name in present:
        tree = _git(root, "rev-parse", "-q", "--verify", f"HEAD:{name}")
        h.update(f"{name}={(tree or 'untracked').strip()}\0".encode())
    changed = (_git(root, "diff", "HEAD", "--name-only", "-z", "--", *present) or "").split("\0")
    changed += (_git(root, "ls-files", "--others", "--exclude-standard", "-z", "--", *present) or "").split("\0")
    names = sorted({n for n in changed if n and not any(part in _SKIPPED_PARTS for part in Path(n).parts)})
    _hash_files(h, root, [root / n for n in names])
    return h.hexdigest()[:16]
