"""What ``run_stage`` does around a stage: probe what it needs, lock its output, turn signals into exits.

* ``probe``: the device exists, the output folder is writable (and ``paths.artifacts`` is a folder),
  the data is where the config says, the upstream outputs are complete and finite, the MLflow store
  is writable -- before any long work.
* ``stage_lock``: one run per stage output at a time (an advisory ``flock``, released by the kernel
  when the holder dies, so a killed run never leaves a stale lock).
* ``signals_raise``: SIGTERM / SIGINT raise :class:`~napkit.errors.Interrupted`, so the stage unwinds
  (MLflow run ended as KILLED, the last checkpoint kept) and the entrypoint exits 128 + signal; inside
  ``signals_held`` (every MLflow store call) the signal waits for the call to finish.
"""

from __future__ import annotations

import fcntl
import os
import signal
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from omegaconf import DictConfig

from napkit.errors import Interrupted, NapkitError


def output_dir(cfg: DictConfig, stage: str) -> Path:
    """The folder ``stage`` writes (``stage_dir``, CHEX's ``<artifacts>/chex/<part>`` included)."""
    from napkit.stages.common import stage_dir

    return stage_dir(cfg, stage)


def check_device(name: str) -> None:
    """A configured accelerator must exist on this machine."""
    if name.startswith("cuda"):
        index = int(name.split(":", 1)[1]) if ":" in name else 0
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if index >= count:
            gpus = "".join(f", cuda:{i}" for i in range(count))
            raise NapkitError(f"device={name}: this machine has {count} CUDA device(s); allowed here: auto, "
                              f"cpu{gpus}")
    elif name == "mps" and not torch.backends.mps.is_available():
        raise NapkitError("device=mps: MPS is not available on this machine; allowed here: auto, cpu")


def check_writable(cfg: DictConfig, out: Path) -> None:
    """``paths.artifacts`` is (or can become) a folder, and ``out`` accepts new files."""
    artifacts = Path(cfg.paths.artifacts)
    for parent in (artifacts, *artifacts.parents):
        if parent.exists() and not parent.is_dir():
            raise NapkitError(f"paths.artifacts={artifacts}: {parent} is a file; allowed: a folder (created "
                              "when missing)")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as exc:
        raise NapkitError(f"paths.artifacts={artifacts}: cannot write in {out} ({exc.strerror}); allowed: a "
                          "writable folder") from None


def check_data(data: DictConfig) -> None:
    """The dataset's files are where ``data.root`` says (unless the loader may download them)."""
    from napkit.data.datasets import check_present

    check_present(str(data.name), {str(k): v for k, v in data.items()})


# the model sets (and factor files) each stage reads from the stages before it
MODEL_INPUTS = {"curvature": ("pretrain",), "prune": ("pretrain",), "finetune": ("prune",),
                "evaluate": ("pretrain", "finetune")}
FACTOR_INPUTS = {"prune": "curvature/factors.safetensors"}


def check_inputs(cfg: DictConfig, stage: str) -> None:
    """The upstream outputs ``stage`` reads are complete sets (hashes match), finite and readable."""
    from napkit.artifacts import load_model
    from napkit.curvature import load_factors
    from napkit.stages.common import stage_dir

    for upstream in MODEL_INPUTS.get(stage, ()):
        load_model(stage_dir(cfg, upstream))
    if stage in FACTOR_INPUTS:
        upstream, name = FACTOR_INPUTS[stage].split("/")
        path = stage_dir(cfg, upstream) / name
        if path.is_file():  # criteria without curvature never read it
            load_factors(path)


def probe(cfg: DictConfig, stage: str) -> None:
    """Everything ``stage`` will need, checked before it starts work."""
    from napkit.tracking.probe import check_store

    check_device(str(cfg.get("device", "auto")))
    check_writable(cfg, output_dir(cfg, stage))
    check_data(cfg.data)
    check_inputs(cfg, stage)
    check_store(cfg)


@contextmanager
def stage_lock(cfg: DictConfig, stage: str) -> Iterator[Path]:
    """Hold ``<artifacts>/.locks/<output>.lock`` while the stage runs; a second run is refused in one line."""
    out = output_dir(cfg, stage)
    name = str(out.relative_to(cfg.paths.artifacts)).replace(os.sep, "-")
    path = Path(cfg.paths.artifacts) / ".locks" / f"{name}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise NapkitError(f"another run of {stage} (pid {holder}) is writing {out}; wait for it to "
                              f"finish or stop it (lock {path})") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield path
    finally:
        os.close(fd)  # releases the lock


class _Held:
    """Signals that arrived inside :func:`signals_held` blocks (depth > 0), to raise when the outermost ends."""

    depth = 0
    pending: int | None = None


@contextmanager
def signals_held() -> Iterator[None]:
    """Within the block, a signal :func:`signals_raise` turns into ``Interrupted`` waits for the block's end, so a
    store write (an SQLite transaction of the MLflow run) is never cut in half and left holding its lock. A second
    signal while one waits raises at once (a hung store can still be stopped)."""
    _Held.depth += 1
    try:
        yield
    finally:
        _Held.depth -= 1
        if not _Held.depth and _Held.pending is not None:
            signum, _Held.pending = _Held.pending, None
            raise Interrupted(signum)


@contextmanager
def signals_raise() -> Iterator[None]:
    """Within the block, SIGTERM and SIGINT raise ``Interrupted(signum)`` (main thread only), after any
    :func:`signals_held` block they arrive in."""
    sigs = (signal.SIGTERM, signal.SIGINT)

    def handler(signum: int, frame: object) -> None:
        if _Held.depth and _Held.pending is None:
            _Held.pending = signum
            return
        _Held.pending = None
        raise Interrupted(signum)

    try:
        previous = {s: signal.signal(s, handler) for s in sigs}
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
