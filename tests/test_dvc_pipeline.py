"""Through DVC: `dvc repro` runs all five stages, is cached, and reruns only what changed; every
dependency a stage reads is declared (`dvc status` checked edit by edit); the layer plots render."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from napkit.config import write_params
from napkit.stages import STAGES
from napkit.stages.common import write_csv

ROOT = Path(__file__).resolve().parents[1]
FAST = ["train.epochs=2", "finetune.epochs=1", "prune.max_iterations=2", "prune.step_fraction=0.6",
        "prune.tolerance=100", "curvature.num_samples=128", "evaluate.latency_repeats=2",
        "data.subset_train=400"]


def _dvc(repo: Path, *args: str, uri: str | None = None, **env_vars: str) -> str:
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri or f"sqlite:///{repo / 'mlflow.db'}",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}", **env_vars}
    env.pop("MLFLOW_RUN_ID", None)
    proc = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=repo, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, f"dvc {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def _scratch_repo(repo: Path, overrides: list[str]) -> Path:
    """A scratch clone of the project's pipeline files in a fresh git repo, with ``overrides`` as params."""
    for name in ("conf", "pipelines", "src", ".dvc"):
        shutil.copytree(ROOT / name, repo / name, ignore=shutil.ignore_patterns("tmp", "cache", "__pycache__"))
    for name in ("dvc.yaml", ".dvcignore", ".gitignore"):
        shutil.copy(ROOT / name, repo / name)
    write_params(repo, overrides=overrides)
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    return repo


def _git_commit(repo: Path) -> None:
    """Commit the scratch repo (`dvc exp` needs a baseline commit)."""
    subprocess.run(["git", "add", "-A"], cwd=repo, check=True, capture_output=True)
    subprocess.run(["git", "-c", "user.name=napkit", "-c", "user.email=napkit@localhost", "commit", "-qm", "baseline"],
                   cwd=repo, check=True, capture_output=True)


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """A scratch clone of the project's pipeline files in a fresh git repo, with fast params."""
    return _scratch_repo(tmp_path_factory.mktemp("napkit_repo"), FAST)


@pytest.mark.slow
def test_dvc_repro_end_to_end(repo: Path) -> None:
    out = _dvc(repo, "repro")
    for stage in ("pretrain", "curvature", "prune", "finetune", "evaluate"):
        assert f"Running stage '{stage}'" in out
    metrics = json.loads((repo / "artifacts/evaluate/metrics.json").read_text())
    assert {"top1", "params", "params_nonzero", "flops", "flops_effective"} <= set(metrics)
    assert metrics["sparsity"] > 0.5

    _assert_bars_drawn(_layer_bars(repo))  # the real layer tables draw their bars
    assert not list((repo / "artifacts" / "checkpoints").glob("*.pt"))  # completed stages leave no resume state

    # nothing changed: nothing runs
    again = _dvc(repo, "repro")
    assert "Running stage" not in again

    # dvc metrics show lists top-1, parameters and FLOPs
    shown = json.loads(_dvc(repo, "metrics", "show", "--json"))
    flat = json.dumps(shown)
    for key in ("top1", "params_nonzero", "flops_effective"):
        assert key in flat

    # one MLflow run holds all five stages
    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("napkit").experiment_id])
    assert len(runs) == 1
    assert {f"napkit.stage.{s}" for s in ("pretrain", "curvature", "prune", "finetune", "evaluate")} <= set(
        runs[0].data.tags)

    # an experiment changing a prune parameter (Hydra composes conf/ with -S) reruns prune, finetune
    # and evaluate only, and its MLflow run still carries all five stages' results
    _git_commit(repo)
    out = _dvc(repo, "exp", "run", "-n", "stepfrac", *(f"-S{o}" for o in FAST), "-Sprune.step_fraction=0.5")
    assert "Running stage 'pretrain'" not in out and "Running stage 'curvature'" not in out
    for stage in ("prune", "finetune", "evaluate"):
        assert f"Running stage '{stage}'" in out
    runs = client.search_runs([client.get_experiment_by_name("napkit").experiment_id],
                              order_by=["attributes.start_time DESC"])
    assert len(runs) == 2  # a new pipeline execution is a new run
    exp, first = runs[0].data, runs[1].data
    assert exp.params["prune.step_fraction"] == "0.5"
    for stage in ("pretrain", "curvature", "prune", "finetune", "evaluate"):
        assert stage in ("pretrain", "curvature") or exp.tags[f"napkit.stage.{stage}"] == "done"
        saved = json.loads((repo / f"artifacts/{stage}/metrics.json").read_text())
        assert {k: exp.metrics[f"{stage}/{k}"] for k in saved} == pytest.approx(saved), stage
    assert exp.metrics["pretrain/val_top1"] == first.metrics["pretrain/val_top1"]
    assert exp.tags["napkit.stage.pretrain"] == exp.tags["napkit.stage.curvature"] == "cached"
    assert exp.tags["napkit.dvc.experiment"] == "stepfrac" and exp.tags["mlflow.source.name"] == "dvc.yaml"
    assert exp.tags["napkit.dvc.stage"] == "prune,finetune,evaluate"
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, check=True)
    assert exp.tags["mlflow.source.git.commit"] == head.stdout.strip()
    assert first.tags["napkit.dvc.stage"] == "pretrain,curvature,prune,finetune,evaluate"


@pytest.mark.slow
def test_dvc_repro_completes_when_the_tracking_server_is_unreachable(tmp_path: Path) -> None:
    """MLFLOW_TRACKING_URI names a server nobody listens on: every stage still runs and writes its
    metrics, says that tracking failed, and leaves what MLflow missed for `napkit.tracking.upload`."""
    repo = _scratch_repo(tmp_path / "repo", [*FAST, "model=lenet5", "train.epochs=1", "prune.max_iterations=1",
                                             "curvature.num_samples=64", "data.subset_train=256"])
    stages = ("pretrain", "curvature", "prune", "finetune", "evaluate")
    out = _dvc(repo, "repro", uri="http://127.0.0.1:9", MLFLOW_HTTP_REQUEST_MAX_RETRIES="0")
    for stage in stages:
        assert f"Running stage '{stage}'" in out
        assert f"{stage}: MLflow tracking failed" in out and f"{stage}: finished UNTRACKED" in out
        assert json.loads((repo / f"artifacts/{stage}/metrics.json").read_text())
        assert (repo / f"artifacts/{stage}/tracking_pending.json").is_file()
    assert {"top1", "params_nonzero", "flops_effective"} <= set(
        json.loads((repo / "artifacts/evaluate/metrics.json").read_text()))
    assert not (repo / "mlflow.db").exists()

    # the store is back: one command records the whole pipeline in one run
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": store}
    env.pop("MLFLOW_RUN_ID", None)
    proc = subprocess.run([sys.executable, "-m", "napkit.tracking.upload", "artifacts"], cwd=repo, env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not list(repo.glob("artifacts/*/tracking_pending.json"))
    client = MlflowClient(store)
    (run,) = client.search_runs([client.get_experiment_by_name("napkit").experiment_id])
    assert {f"napkit.stage.{s}" for s in stages} <= set(run.data.tags)
    for key in ("pretrain/val_top1", "prune/sparsity", "finetune/val_top1", "evaluate/top1"):
        assert key in run.data.metrics, key


def _fake_outputs(repo: Path) -> Path:
    """Every output dvc.yaml declares, as placeholder bytes (layer tables as real tables), recorded by
    `dvc commit` so that all stages are up to date without running one."""
    for stage in yaml.safe_load((repo / "dvc.yaml").read_text())["stages"].values():
        for entry in (*stage.get("outs", []), *stage.get("metrics", []), *stage.get("plots", [])):
            path = repo / (entry if isinstance(entry, str) else next(iter(entry)))
            path.parent.mkdir(parents=True, exist_ok=True)
            if path.name == "layers.csv":  # the columns prune's and evaluate's write_outputs write
                write_csv(path, [{"layer": name, "density": d, "sparsity": 1 - d}
                                 for name, d in (("features.0", 0.9), ("features.3", 0.4), ("classifier.1", 0.1))])
            elif path.suffix == ".csv":
                write_csv(path, [{"epoch": 1, "val_top1": 50.0, "compression": 2.0}])
            elif path.name == "metrics.json":  # some of the keys the stages write
                keys = {"prune": ("sparsity", "compression", "kept_iteration"),
                        "evaluate": ("sparsity", "top1", "top1_dense", "compression_params", "flops_reduction",
                                     "latency_ms", "latency_ms_dense")}.get(path.parent.name, ())
                path.write_text(json.dumps({"seconds": 1.0, **{k: 0.5 for k in keys}}))
            else:
                path.write_bytes(os.urandom(64))
    _dvc(repo, "commit", "--force")
    _git_commit(repo)
    return repo


@pytest.fixture(scope="module")
def committed(tmp_path_factory) -> Path:
    return _fake_outputs(_scratch_repo(tmp_path_factory.mktemp("napkit_deps"), []))


def _changed(repo: Path) -> set[str]:
    """The pipeline stages `dvc status` marks (changed deps or outs)."""
    from dvc.repo import Repo

    with Repo(str(repo)) as dvc_repo:
        return {address.rsplit(":", 1)[-1] for address in dvc_repo.status()} & set(STAGES)  # "<dvc.yaml>:<stage>"


ALL = set(STAGES)
# What each stage reads, written down independently of dvc.yaml: the code (every stage imports
# nearly all of src/napkit), its entrypoint, the params.yaml sections and the upstream outputs.
PARAM_READERS = {"seed": ALL, "data.eval_batch_size": ALL, "data.subset_train": ALL, "model.width": {"pretrain"},
                 "train.epochs": {"pretrain"}, "curvature.num_samples": {"curvature", "prune"},
                 "prune.step_fraction": {"prune", "finetune"}, "finetune.epochs": {"prune", "finetune"},
                 "evaluate.latency_repeats": {"evaluate"},
                 # run settings, not results
                 "tracking.experiment": set(), "paths.cache": set(), "device": set()}
FILE_READERS = {
    **{f"pipelines/{s}.py": {s} for s in STAGES},
    "src/napkit/structured/surgery.py": ALL, "src/napkit/curvature/kfac.py": ALL,
    "src/napkit/training/trainer.py": ALL, "src/napkit/data/loaders.py": ALL, "src/napkit/stages/prune.py": ALL,
    "src/napkit/a_new_module.py": ALL,
    "src/napkit/__pycache__/io.cpython-311.pyc": set(), "conf/config.yaml": set(),  # byte code; not read
    "artifacts/pretrain/model.safetensors": {"pretrain", "curvature", "prune", "evaluate"},
    "artifacts/pretrain/model.json": {"pretrain", "curvature", "prune", "evaluate"},
    "artifacts/curvature/factors.safetensors": {"curvature", "prune"},
    "artifacts/prune/model.safetensors": {"prune", "finetune"},
    "artifacts/prune/model.json": {"prune", "finetune"},
    "artifacts/prune/masks.safetensors": {"prune", "finetune"},
    "artifacts/finetune/model.safetensors": {"finetune", "evaluate"},
    "artifacts/finetune/model.json": {"finetune", "evaluate"},
    "artifacts/finetune/masks.safetensors": {"finetune", "evaluate"},
}


def _set_param(params: dict, dotted: str) -> None:
    *parents, key = dotted.split(".")
    node = params
    for name in parents:
        node = node[name]
    value = node[key]
    node[key] = (not value) if isinstance(value, bool) else (
        value + 1 if isinstance(value, int | float) else 7 if value is None else f"{value}-edited")


def test_dvc_status_marks_exactly_the_stages_that_read_each_dependency(committed: Path) -> None:
    """Edit one dependency at a time: `dvc status` must mark exactly the stages that read it (a
    stage downstream of those reruns on `dvc repro` once their outputs change)."""
    repo = committed
    assert _changed(repo) == set()
    wrong = {}
    for rel, expected in FILE_READERS.items():
        path = repo / rel
        before = path.read_bytes() if path.exists() else None
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes((before or b"") + b"\n# edited\n")
        if (got := _changed(repo)) != expected:
            wrong[rel] = got
        if before is None:
            path.unlink()
        else:
            path.write_bytes(before)
    params_file = repo / "params.yaml"
    original = params_file.read_text()
    for dotted, expected in PARAM_READERS.items():
        params = yaml.safe_load(original)
        _set_param(params, dotted)
        params_file.write_text(yaml.safe_dump(params, sort_keys=False))
        if (got := _changed(repo)) != expected:
            wrong[dotted] = got
        params_file.write_text(original)
    assert not wrong, f"dvc status marked other stages than those that read the edit: {wrong}"
    assert _changed(repo) == set()


_SPEC = re.compile(r'<div id = "(?P<id>[^"]+)">\s*<script type = "text/javascript">\s*var spec = (?P<spec>.*);\n')


def _layer_bars(repo: Path) -> dict[str, dict]:
    """Render `dvc plots show` to HTML and return the Vega-Lite spec of each layer bar plot, by id."""
    out = repo.parent / f"{repo.name}_plots"  # outside the repo: it is not the project's to commit
    _dvc(repo, "plots", "show", "--out", str(out))
    page = (out / "index.html").read_text()
    specs = {m["id"]: json.loads(m["spec"]) for m in _SPEC.finditer(page)}
    return {k: v for k, v in specs.items() if k.endswith("layers_csv")}


def _assert_bars_drawn(bars: dict[str, dict]) -> None:
    """Each plot draws one bar per layer: a numeric value on x, the layer's name on y."""
    assert set(bars) == {"artifacts_prune_layers_csv", "artifacts_evaluate_layers_csv"}
    for name, spec in bars.items():
        x, y = spec["encoding"]["x"], spec["encoding"]["y"]
        assert x["type"] == "quantitative" and x["field"] in ("density", "sparsity"), name
        assert y["field"] == "layer", name
        rows = spec["data"]["values"]
        assert rows, f"{name}: no data"
        for row in rows:
            value = float(row[x["field"]])  # a layer name here (x and y swapped) draws nothing
            assert 0.0 <= value <= 1.0 and row[y["field"]], (name, row)
        assert len({row["layer"] for row in rows}) == len(rows), name


def test_layer_ratio_bars_render_with_data(committed: Path) -> None:
    _assert_bars_drawn(_layer_bars(committed))


def test_documented_exp_show_view_is_narrow(committed: Path) -> None:
    """docs/tracking.md's `dvc exp show` view runs and keeps the comparison columns only."""
    doc = (ROOT / "docs" / "tracking.md").read_text()
    (line,) = [ln for ln in doc.splitlines() if ln.startswith("dvc exp show --drop")]
    args = shlex.split(line)[1:]
    wide = _dvc(committed, "exp", "show", "--csv", "--no-pager").splitlines()[0].split(",")
    narrow = _dvc(committed, *args, "--csv", "--no-pager").splitlines()[0].split(",")
    assert len(wide) > 100 and len(narrow) <= 20
    assert {"Experiment", "top1", "top1_dense", "compression_params", "kept_iteration", "prune.method",
            "artifacts/evaluate/metrics.json:sparsity", "model.name", "data.name"} <= set(narrow)
