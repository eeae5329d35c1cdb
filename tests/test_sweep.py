"""Sweeps: `pipelines/run.py -m` with one MLflow parent per sweep and a child per job, content-addressed
stage cache shared across jobs, failing jobs isolated, invalid overrides refused up front, the report."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from napkit.sweep.chain import SWEEP_FILE, run_name

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model=alexnet_small", "train.epochs=1", "finetune.epochs=1", "prune.max_iterations=1",
        "prune.tolerance=100", "curvature.num_samples=32",
        "evaluate.latency_repeats=2", "data.subset_train=128"]
# jobs in parallel where the joblib launcher is installed (`.[launchers]`): exercises the stage locks
PARALLEL = (["hydra/launcher=napkit_joblib", "hydra.launcher.n_jobs=2"]
            if importlib.util.find_spec("hydra_plugins.hydra_joblib_launcher") else [])


def _env(tmp: Path) -> dict[str, str]:
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}",
           "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false", "OMP_NUM_THREADS": "1"}
    for key in ("MLFLOW_RUN_ID", "NAPKIT_PARENT_RUN_ID"):
        env.pop(key, None)
    return env


def _sweep(tmp: Path, name: str, *overrides: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "pipelines/run.py", "-m", *overrides, f"paths.artifacts={tmp / 'artifacts'}",
           f"hydra.sweep.dir={tmp / 'sweeps' / name}"]
    return subprocess.run(cmd, cwd=ROOT, env=_env(tmp), capture_output=True, text=True, timeout=600)


def _client(tmp: Path) -> tuple[MlflowClient, str]:
    client = MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")
    return client, client.get_experiment_by_name("napkit").experiment_id


def _parent(tmp: Path, name: str) -> str:
    import json

    return json.loads((tmp / "sweeps" / name / SWEEP_FILE).read_text())["parent_run_id"]


def _children(tmp: Path, parent: str) -> list:
    client, exp = _client(tmp)
    return client.search_runs([exp], filter_string=f"tags.`mlflow.parentRunId` = '{parent}'")


def test_invalid_option_fails_before_any_job(tmp_path: Path) -> None:
    proc = _sweep(tmp_path, "bad", "model=alexnet_small,lenet9000", "prune=nap,magnitude")
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("napkit sweep: error:")]
    assert len(errors) == 1, proc.stderr[-2000:]
    assert "model=lenet9000" in errors[0] and "valid choices:" in errors[0] and "alexnet_small" in errors[0]
    assert "Traceback" not in proc.stderr
    # nothing ran, nothing tracked
    assert not (tmp_path / "artifacts").exists()
    assert not list(tmp_path.glob("sweeps/bad/*/run.log")) and "Launching" not in proc.stdout
    assert not (tmp_path / "mlflow.db").exists()


def test_run_name_names_what_varies() -> None:
    jobs = [["model=a", "prune=nap", "seed=0", "train.epochs=1"], ["model=a", "prune=nap", "seed=1", "train.epochs=1"]]
    assert run_name({"model": "a", "prune": "nap"}, jobs[1], jobs) == "a/nap seed=1"


@pytest.fixture(scope="module")
def swept(tmp_path_factory) -> Path:
    """Sweep A: 2 methods x 1 model; sweep B: a cached job and a job failing at run time."""
    tmp = tmp_path_factory.mktemp("sweep")
    a = _sweep(tmp, "a", "prune=nap,magnitude", *TINY, *PARALLEL)
    assert a.returncode == 0, f"{a.stdout[-3000:]}\n{a.stderr[-3000:]}"
    b = _sweep(tmp, "b", "prune=magnitude", "prune.step_fraction=0.5,0", *TINY)
    assert b.returncode == 0, f"{b.stdout[-3000:]}\n{b.stderr[-3000:]}"
    return tmp


@pytest.mark.slow
def test_sweep_parent_children_and_cache(swept: Path) -> None:
    client, exp = _client(swept)
    parent = _parent(swept, "a")
    assert client.get_run(parent).info.status == "FINISHED"
    children = _children(swept, parent)
    assert len(children) == 2 and all(r.info.status == "FINISHED" for r in children)
    assert {r.data.tags["napkit.choice.prune"] for r in children} == {"nap", "magnitude"}
    for run in children:  # every child holds every stage's results, computed or cached
        assert {"pretrain/val_top1", "curvature/seconds", "prune/seconds", "evaluate/top1",
                "evaluate/seconds"} <= set(run.data.metrics)
        assert any(k.startswith("prune/density/") for k in run.data.metrics)
    # pretrain and curvature computed once, shared; prune per method
    art = swept / "artifacts"
    assert len([p for p in (art / "pretrain").iterdir() if p.is_dir()]) == 1
    assert len([p for p in (art / "curvature").iterdir() if p.is_dir()]) == 1
    assert len(list((art / "prune").glob("*/metrics.json"))) == 2
    hits = sorted(r.data.tags.get("napkit.cache_hits", "") for r in children)
    assert hits[0] == "none" or hits[1] == "none"
    assert any(h.startswith("pretrain,curvature") for h in hits)
    logs = "".join(p.read_text() for p in (swept / "sweeps" / "a").glob("*/run.log"))
    assert logs.count("pretrain: cache hit") == 1 and logs.count("pretrain: computing") == 1


@pytest.mark.slow
def test_failing_job_is_marked_and_the_sweep_goes_on(swept: Path) -> None:
    client, _ = _client(swept)
    parent = _parent(swept, "b")
    children = {r.data.tags["napkit.sweep.job"]: r for r in _children(swept, parent)}
    assert len(children) == 2
    ok, bad = children["0"], children["1"]
    assert ok.info.status == "FINISHED"
    assert ok.data.tags["napkit.cache_hits"] == "pretrain,curvature,prune,finetune,evaluate"  # same config as in A
    assert bad.info.status == "FAILED"
    # refused by the schema before any stage of that job ran: one line naming the key, the value, what is allowed
    assert re.search(r"^config: NapkitError: prune\.step_fraction=0: allowed: a number in \(0, 1\]",
                     bad.data.tags["napkit.error"])
    run = client.get_run(parent)
    assert run.info.status == "FINISHED"
    assert run.data.tags["napkit.sweep.failed"] == "1" and run.data.tags["napkit.sweep.finished"] == "1"


@pytest.mark.slow
def test_report_has_plots_and_table(swept: Path) -> None:
    out = swept / "reports" / "a.html"
    cmd = [sys.executable, "-m", "napkit.report", "--experiment", "napkit", "--sweep", _parent(swept, "a"),
           "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(swept), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = out.read_text()
    assert text.count("data:image/png;base64,") >= 2  # trade-off curves and per-layer ratios
    assert "<table" in text and "nap" in text and "magnitude" in text and "alexnet_small" in text
    assert text.count("<tr") == 3  # header + 2 runs
    # the whole experiment, failed run included, as Markdown
    md = swept / "reports" / "all.md"
    proc = subprocess.run([sys.executable, "-m", "napkit.report", "--out", str(md)], cwd=ROOT, env=_env(swept),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = [line for line in md.read_text().splitlines() if line.startswith("| alexnet_small")]
    assert len(table) == 4 and sum("FAILED" in line for line in table) == 1
    assert list((swept / "reports" / "all_files").glob("*.png"))


@pytest.mark.slow
def test_dvc_exp_queue_tracks_into_the_main_store(tmp_path: Path) -> None:
    """`dvc exp run --queue -S ...` + `dvc queue start`: runs in DVC's temporary copies, tracked in the repo's store."""
    import json
    import shutil
    import time

    from napkit.config import write_params

    repo = tmp_path / "repo"
    for name in ("conf", "pipelines", "src", ".dvc"):
        shutil.copytree(ROOT / name, repo / name, ignore=shutil.ignore_patterns("tmp", "cache", "__pycache__"))
    for name in ("dvc.yaml", ".dvcignore", ".gitignore"):
        shutil.copy(ROOT / name, repo / name)
    write_params(repo)
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t", "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    for key in ("MLFLOW_RUN_ID", "NAPKIT_PARENT_RUN_ID", "MLFLOW_TRACKING_URI"):  # the default: <repo>/mlflow.db
        env.pop(key, None)

    def sh(*cmd: str) -> str:
        proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"{' '.join(cmd)}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        return proc.stdout

    sh("git", "init", "-q")
    sh("git", "add", "-A")
    sh("git", "commit", "-qm", "init")
    fast = [arg for o in TINY if not o.startswith("model=") for arg in ("-S", o)]
    for method in ("nap", "magnitude"):
        sh(sys.executable, "-m", "dvc", "exp", "run", "--queue", "-S", "model=alexnet_small", "-S", f"prune={method}",
           *fast)
    sh(sys.executable, "-m", "dvc", "queue", "start")
    deadline = time.time() + 540
    while time.time() < deadline:
        status = sh(sys.executable, "-m", "dvc", "queue", "status")
        if not re.search(r"\b(Queued|Running)\b", status):
            break
        time.sleep(3)
    assert status.count("Success") == 2, status
    shown = json.loads(sh(sys.executable, "-m", "dvc", "exp", "show", "--json"))
    assert len([e for rev in shown for e in (rev.get("experiments") or [])]) == 2, json.dumps(shown)[:2000]
    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("napkit").experiment_id])
    done = [r for r in runs if "evaluate/top1" in r.data.metrics]
    assert sorted(r.data.params["prune.method"] for r in done) == ["magnitude", "nap"]


def test_run_folders_change_with_the_code_and_the_data(compose_cfg, tmp_path, monkeypatch) -> None:
    """The chain's content-addressed folders are keyed by config, code version and data fingerprint: a code
    edit or a replaced data file never hits an old folder, an unchanged setup always does."""
    from napkit.data import data_fingerprint
    from napkit.stages.common import stage_dir
    from napkit.sweep import chain

    root = tmp_path / "data"
    (root / "train" / "a").mkdir(parents=True)
    image = root / "train" / "a" / "0.jpg"
    image.write_bytes(b"x" * 10)
    cfg = compose_cfg(f"paths.artifacts={tmp_path / 'artifacts'}", f"data.root={root}", "data=cifar10")
    monkeypatch.setattr(chain, "code_version", lambda: "code-a")
    first = stage_dir(chain.prepare(cfg), "pretrain")
    assert stage_dir(chain.prepare(cfg), "pretrain") == first
    before = data_fingerprint(cfg.data)
    image.write_bytes(b"y" * 11)  # a replaced image
    assert data_fingerprint(cfg.data) != before
    assert stage_dir(chain.prepare(cfg), "pretrain") != first
    changed_data = stage_dir(chain.prepare(cfg), "pretrain")
    monkeypatch.setattr(chain, "code_version", lambda: "code-b")  # an edit under src/, pipelines/ or conf/
    assert stage_dir(chain.prepare(cfg), "pretrain") not in (first, changed_data)
