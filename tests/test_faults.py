"""Fault injection: SIGKILL pretrain, the prune loop, finetune and CHEX training at seeded random
moments, rerun the same command until it finishes, and require the final weights and metrics of an
uninterrupted run, bit for bit (issue 8).

Each stage runs as ``python pipelines/<stage>.py`` in a subprocess on a tiny configuration. One
uninterrupted reference per stage (module-scoped) gives the run's duration; the kill times of a chain
of attempts are drawn (seeded, stratified) across what is left of that duration, so kills land during
startup, training, checkpoint writes and the final writes. One extra attempt per stage is killed
*inside* an atomic write (the temporary file half written) to test the write protocol directly.
"""

from __future__ import annotations

import csv
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from napkit.io import load_tensors, load_torch, write_text
from napkit.stages import curvature

ROOT = Path(__file__).resolve().parents[1]
SEED = 8  # the kill schedule's seed
KILLS = 5  # random kill points per stage
TINY = ["model=vgg16_small", "model.width=0.0625", "train.epochs=5", "finetune.epochs=5",
        "prune=nap", "prune.max_iterations=3", "prune.finetune_epochs=2", "prune.tolerance=100",
        "curvature.num_samples=128"]
STAGE_OVERRIDES = {"chex_train": ["chex.epochs=4", "chex.dT=1"]}  # CHEX explores every epoch of a short run
OUTPUTS = {"chex_train": "chex/train"}  # a stage's output folder under artifacts/, when not its own name
TIMING_KEYS = ("seconds",)  # wall-clock measurements: the only values allowed to differ

# Runs a stage entrypoint, killing itself with SIGKILL halfway through the Nth atomic write of the file
# (every write, single files and output sets alike, goes through napkit.io.atomic_path) named by
# $NAPKIT_TEST_KILL_IN_WRITE ("<file name>:<N>"): the temporary file is left half written.
KILL_IN_WRITE = r"""
import contextlib, os, runpy, signal, sys
from pathlib import Path
import napkit.io as io
name, nth = os.environ["NAPKIT_TEST_KILL_IN_WRITE"].rsplit(":", 1)
seen, original = [0], io.atomic_path
@contextlib.contextmanager
def atomic_path(path):
    with original(path) as tmp:
        yield tmp
        if Path(path).name == name:
            seen[0] += 1
            if seen[0] == int(nth):
                data = tmp.read_bytes()
                tmp.write_bytes(data[: len(data) // 2])
                os.kill(os.getpid(), signal.SIGKILL)
io.atomic_path = atomic_path
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@dataclass
class Reference:
    """An uninterrupted run: its artifacts, the seconds from start to its first output (imports, data,
    model: the startup) and from there to its "<stage> done" line (the work)."""

    artifacts: Path
    startup: float
    work: float


@dataclass
class Attempt:
    kill_at: str  # when the kill came ("startup+1.2s", "work+3.4s", "in a write of <file>"); "" if none
    landed: bool  # the stage was still working (not yet done) when the kill came
    progress_before: float  # share of the work the checkpoints held when the attempt started
    log: str


def _overrides(artifacts: Path, *extra: str) -> list[str]:
    hydra = [f"hydra.run.dir={artifacts.parent / 'hydra'}", "hydra.output_subdir=null",
             "hydra/job_logging=stdout"]
    return [*TINY, f"paths.artifacts={artifacts}", "tracking=disabled", *hydra, *extra]


def _env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra}
    for key in ("MLFLOW_RUN_ID", "MLFLOW_TRACKING_URI", "NAPKIT_TEST_KILL_IN_WRITE"):
        if key not in extra:
            env.pop(key, None)
    return env


def _start(stage: str, artifacts: Path, log: Path, *, kill_in_write: str | None = None) -> subprocess.Popen:
    """``python pipelines/<stage>.py <overrides>`` in its own process group, output to ``log``."""
    script = str(ROOT / "pipelines" / f"{stage}.py")
    prefix = [sys.executable, "-c", KILL_IN_WRITE] if kill_in_write else [sys.executable]
    env = _env(NAPKIT_TEST_KILL_IN_WRITE=kill_in_write) if kill_in_write else _env()
    artifacts.mkdir(parents=True, exist_ok=True)
    with log.open("w") as fh:  # the child keeps its own descriptor
        return subprocess.Popen([*prefix, script, *_overrides(artifacts, *STAGE_OVERRIDES.get(stage, []))],
                                cwd=artifacts.parent, env=env,
                                stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)


def _finish(proc: subprocess.Popen, log: Path) -> None:
    proc.wait(timeout=600)
    assert proc.returncode == 0, f"exit {proc.returncode}:\n{log.read_text()[-4000:]}"


def _done(stage: str, log: Path) -> bool:
    return f"{stage} done:" in log.read_text(errors="replace")


def _wait(proc: subprocess.Popen, until: Callable[[], bool], timeout: float = 600.0) -> float:
    """Poll until ``until()`` or the process exits; returns the time it took."""
    t0 = time.perf_counter()
    while proc.poll() is None and not until() and time.perf_counter() - t0 < timeout:
        time.sleep(0.01)
    return time.perf_counter() - t0


def _run(stage: str, artifacts: Path) -> Reference:
    """Run a stage to completion, timing its startup and its work."""
    log = artifacts.parent / f"{stage}-ref.log"
    proc = _start(stage, artifacts, log)
    startup = _wait(proc, lambda: log.stat().st_size > 0)
    work = _wait(proc, lambda: _done(stage, log))
    _finish(proc, log)
    return Reference(artifacts, startup, work)


def _kill_attempt(stage: str, artifacts: Path, log: Path, *, startup_delay: float | None = None,
                  work_delay: float | None = None,
                  after: Callable[[], bool] | None = None) -> tuple[subprocess.Popen, bool]:
    """Start the stage and SIGKILL it ``startup_delay`` seconds after the start, or ``work_delay`` seconds
    after its first output (and after ``after()`` holds, e.g. a new checkpoint); landed: it had not
    finished its work yet."""
    proc = _start(stage, artifacts, log)
    if startup_delay is not None:
        _wait(proc, lambda: False, timeout=startup_delay)
    else:
        _wait(proc, lambda: log.stat().st_size > 0)
        if after is not None:
            _wait(proc, after)
        _wait(proc, lambda: False, timeout=work_delay or 0.0)
    landed = proc.poll() is None and not _done(stage, log)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return proc, landed


def _chain(stage: str, run_dir: Path, ref: Reference, progress: Callable[[Path], float],
           kill_in_write: str, tables: tuple[str, ...]) -> list[Attempt]:
    """Kill ``stage`` once inside a write and at ``KILLS`` seeded random moments, then let it finish.

    The moments are stratified draws: one during the startup (imports, data, model), the others
    ``u * remaining`` seconds into the work, where ``remaining`` is the reference's work time less the
    progress the checkpoints already hold, so kills land in training steps, validation, checkpoint
    writes and the final writes. The first two work kills wait for a new checkpoint first (then
    ``u`` * 0.5 s), so at least two reruns resume from real, partial progress however fast or loaded
    the machine is. A kill that comes after the stage finished (a machine faster than
    the reference's) counts as missed: that run's outputs must match too, and the chain starts over.
    """
    artifacts = run_dir / "artifacts"
    rng = random.Random(f"{SEED}-{stage}")
    strata = rng.sample(range(KILLS), KILLS) + [rng.randrange(1, KILLS) for _ in range(3)]
    attempts: list[Attempt] = []

    def write_kill() -> None:
        log = run_dir / f"{stage}-write-kill.log"
        before = progress(artifacts)
        proc = _start(stage, artifacts, log, kill_in_write=kill_in_write)
        proc.wait(timeout=600)
        assert proc.returncode == -signal.SIGKILL, f"no write of {kill_in_write}:\n{log.read_text()[-3000:]}"
        attempts.append(Attempt(f"in a write of {kill_in_write}", True, before, log.read_text()))

    checkpoint_write = kill_in_write.split(":")[0].endswith(".pt")
    if checkpoint_write:  # a checkpoint is written early; an output file only at the end
        write_kill()
    for i, stratum in enumerate(strata):
        if sum(a.landed for a in attempts if a.kill_at.startswith(("startup", "work", "checkpoint"))) == KILLS:
            break
        done = progress(artifacts)
        u = (stratum + rng.random()) / KILLS
        log = run_dir / f"{stage}-kill{i}.log"
        if stratum == 0:
            delay, when = u * KILLS * ref.startup, "startup"
            proc, landed = _kill_attempt(stage, artifacts, log, startup_delay=delay)
        elif sum(a.kill_at.startswith("checkpoint") for a in attempts) < 2 and done < 1.0:
            delay, when = 0.5 * rng.random(), "checkpoint"
            proc, landed = _kill_attempt(stage, artifacts, log, work_delay=delay,
                                         after=lambda d=done: progress(artifacts) > d)
        else:
            delay, when = u * ref.work * (1.0 - done), "work"
            proc, landed = _kill_attempt(stage, artifacts, log, work_delay=delay)
        attempts.append(Attempt(f"{when}+{delay:.2f}s", landed, done, log.read_text()))
        if not landed:  # it finished first: check it, then start over
            assert proc.returncode in (0, -signal.SIGKILL), \
                f"exit {proc.returncode}:\n{log.read_text()[-4000:]}"
            _assert_identical(stage, ref.artifacts, artifacts, tables)
            shutil.rmtree(artifacts / OUTPUTS.get(stage, stage))
            shutil.rmtree(artifacts / "checkpoints")
    if not checkpoint_write:
        write_kill()
    log = run_dir / f"{stage}-final.log"
    _finish(_start(stage, artifacts, log), log)
    attempts.append(Attempt("", False, progress(artifacts), log.read_text()))
    kills = [a for a in attempts if a.kill_at.startswith(("startup", "work", "checkpoint"))]
    print(f"\n{stage} (reference: startup {ref.startup:.1f}s, work {ref.work:.1f}s): killed in a write of "
          f"{kill_in_write}, and at " + ", ".join(
              f"{a.kill_at} (progress {a.progress_before:.2f}, {'landed' if a.landed else 'missed'})"
              for a in kills))
    landed = sum(a.landed for a in kills)
    assert landed == KILLS and landed > len(kills) - landed, "most kills must land before the stage finishes"
    assert sum(0 < a.progress_before < 1 for a in attempts) >= 2, "the kills must interrupt real progress"
    _assert_identical(stage, ref.artifacts, artifacts, tables)
    return attempts


def _epoch_progress(name: str, epochs: int) -> Callable[[Path], float]:
    def progress(artifacts: Path) -> float:
        ckpt = artifacts / "checkpoints" / f"{name}.pt"
        return int(load_torch(ckpt)["epoch"]) / epochs if ckpt.is_file() else 0.0

    return progress


def _loop_progress(iterations: int) -> Callable[[Path], float]:
    def progress(artifacts: Path) -> float:
        ckpt = artifacts / "checkpoints" / "prune_loop.pt"
        return (len(load_torch(ckpt)["records"]) - 1) / iterations if ckpt.is_file() else 0.0

    return progress


def _metrics(folder: Path) -> dict:
    saved = json.loads((folder / "metrics.json").read_text())
    return {k: v for k, v in saved.items() if k not in TIMING_KEYS}


def _csv(path: Path) -> list[dict[str, str]]:
    with path.open() as fh:
        return [{k: v for k, v in row.items() if k not in TIMING_KEYS} for row in csv.DictReader(fh)]


def _assert_identical(stage: str, ref: Path, run: Path, tables: tuple[str, ...]) -> None:
    """Same weights (and masks) bit for bit, same metrics and tables but for timings, no temporary files."""
    a, b = ref / OUTPUTS.get(stage, stage), run / OUTPUTS.get(stage, stage)
    names = sorted(p.name for p in a.glob("*.safetensors"))
    assert "model.safetensors" in names and names == sorted(p.name for p in b.glob("*.safetensors"))
    for name in names:  # weights, and fine-grained or channel masks
        ta, tb = load_tensors(a / name), load_tensors(b / name)
        assert set(ta) == set(tb), name
        for key in ta:
            assert torch.equal(ta[key], tb[key]), f"{name}: {key} differs from the uninterrupted run"
    assert json.loads((b / "model.json").read_text()) == json.loads((a / "model.json").read_text())
    assert _metrics(b) == _metrics(a)
    for table in tables:
        assert _csv(b / table) == _csv(a / table), table
    leftovers = sorted(str(p.relative_to(run)) for p in run.rglob("*.tmp"))
    assert not leftovers, f"temporary files left behind: {leftovers}"


def _copy_stages(src: Path, dst: Path, *stages: str) -> None:
    for stage in stages:
        shutil.copytree(src / stage, dst / stage)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("faults")


@pytest.fixture(scope="module")
def pretrain_ref(work: Path) -> Reference:
    """Uninterrupted pretrain, then curvature in-process on its model (the prune loop's inputs)."""
    artifacts = work / "ref-pretrain" / "artifacts"
    ref = _run("pretrain", artifacts)
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[o for o in _overrides(artifacts) if not o.startswith("hydra")])
    curvature.run(cfg)
    return ref


@pytest.fixture(scope="module")
def prune_ref(work: Path, pretrain_ref: Reference) -> Reference:
    artifacts = work / "ref-prune" / "artifacts"
    _copy_stages(pretrain_ref.artifacts, artifacts, "pretrain", "curvature")
    return _run("prune", artifacts)


@pytest.fixture(scope="module")
def finetune_ref(work: Path, prune_ref: Reference) -> Reference:
    artifacts = work / "ref-finetune" / "artifacts"
    _copy_stages(prune_ref.artifacts, artifacts, "prune")
    return _run("finetune", artifacts)


def _resumed(attempts: list[Attempt], marker: str) -> bool:
    return any(marker in a.log for a in attempts[1:])


@pytest.mark.slow
def test_pretrain_killed_anywhere_resumes_bit_identically(work: Path, pretrain_ref: Reference) -> None:
    run_dir = work / "kill-pretrain"
    attempts = _chain("pretrain", run_dir, pretrain_ref, _epoch_progress("pretrain", 5),
                      kill_in_write="pretrain.pt:2", tables=("history.csv",))
    assert _resumed(attempts, "resumed from")


@pytest.mark.slow
def test_prune_loop_killed_anywhere_resumes_bit_identically(work: Path, pretrain_ref: Reference,
                                                            prune_ref: Reference) -> None:
    run_dir = work / "kill-prune"
    _copy_stages(pretrain_ref.artifacts, run_dir / "artifacts", "pretrain", "curvature")
    iterations = int(json.loads((prune_ref.artifacts / "prune" / "metrics.json").read_text())["iterations"])
    assert iterations >= 2
    attempts = _chain("prune", run_dir, prune_ref, _loop_progress(iterations),
                      kill_in_write="prune_loop.pt:1", tables=("iterations.csv", "layers.csv"))
    assert _resumed(attempts, "prune loop: resumed after")


@pytest.mark.slow
def test_finetune_killed_anywhere_resumes_bit_identically(work: Path, pretrain_ref: Reference,
                                                          finetune_ref: Reference) -> None:
    run_dir = work / "kill-finetune"
    _copy_stages(finetune_ref.artifacts, run_dir / "artifacts", "prune")
    attempts = _chain("finetune", run_dir, finetune_ref, _epoch_progress("finetune", 5),
                      kill_in_write="model.safetensors:1", tables=("history.csv",))
    assert _resumed(attempts, "resumed from")


@pytest.fixture(scope="module")
def chex_ref(work: Path) -> Reference:
    return _run("chex_train", work / "ref-chex" / "artifacts")


@pytest.mark.slow
def test_chex_killed_anywhere_resumes_bit_identically(work: Path, chex_ref: Reference) -> None:
    """Exploration state too: masks, MRU bank and exploration log come back exactly."""
    attempts = _chain("chex_train", work / "kill-chex", chex_ref, _epoch_progress("chex_train", 4),
                      kill_in_write="chex_train.pt:2", tables=("history.csv", "explorations.csv"))
    assert _resumed(attempts, "resumed from")


def test_next_write_removes_a_killed_writers_temporary_file(tmp_path: Path) -> None:
    """Temporary files of a dead writer on this host go; a live writer's and another host's stay."""
    target = tmp_path / "model.safetensors"
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    stale = tmp_path / f".{target.name}.{socket.gethostname()}.{gone.pid}.abc123.tmp"
    live = tmp_path / f".{target.name}.{socket.gethostname()}.{os.getpid()}.def456.tmp"
    remote = tmp_path / f".{target.name}.other-host.{gone.pid}.ghi789.tmp"
    other = tmp_path / f".history.csv.{socket.gethostname()}.{gone.pid}.jkl012.tmp"
    for path in (stale, live, remote, other):
        path.write_bytes(b"half")
    write_text(target, "whole")
    assert target.read_text() == "whole"
    assert not stale.exists() and live.exists() and remote.exists() and other.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in (target, live, remote, other))


def test_atomic_writes_follow_the_umask(tmp_path: Path) -> None:
    """Outputs get 0666 minus the umask like any file (mkstemp's private 0600 would lock others out)."""
    old = os.umask(0o022)
    try:
        import napkit.io as io

        saved, io._UMASK = io._UMASK, 0o022
        try:
            path = write_text(tmp_path / "metrics.json", "{}")
        finally:
            io._UMASK = saved
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644
