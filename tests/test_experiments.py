"""The experiment presets (conf/experiment/) compose, and a quick one runs end to end into the report's figure.

The published figures come from these presets through the ordinary commands: ``pipelines/run.py -m
+experiment=<name>`` then ``python -m napkit.report``. Here the real presets run with small overrides
(the embedded digits data, two grid points) so the path is exercised on any machine.
"""

from __future__ import annotations

import csv
import itertools
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from napkit.figures import FIGURES

ROOT = Path(__file__).resolve().parents[1]
PRESETS = sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml"))


def _jobs(cfg) -> list[list[str]]:
    """The overrides of every job the preset's sweep launches (the basic sweeper's cartesian product)."""
    params = OmegaConf.to_container(cfg.hydra.sweeper.params)
    keys = list(params)
    return [[f"{k}={v}" for k, v in zip(keys, combo, strict=True)]
            for combo in itertools.product(*(str(params[k]).split(",") for k in keys))]


def _compose(*overrides: str):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=True)


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_composes_every_job(preset: str) -> None:
    full = _compose(f"+experiment={preset}")
    assert full.experiment.name == preset and full.experiment.figure in FIGURES
    assert len(full.experiment.compare) == 2
    jobs = _jobs(full)
    assert len(jobs) >= 2
    methods = set()
    for job in jobs:
        cfg = _compose(f"+experiment={preset}", *job)
        methods.add("chex" if cfg.pipeline == "chex" else cfg.hydra.runtime.choices.prune)
        if cfg.pipeline == "nap" and cfg.prune.get("grid"):
            assert cfg.prune.eval_test, "a grid figure reads the test top-1 at every point"
    assert set(full.experiment.compare) <= methods  # the figure compares methods the sweep runs


def _sweep(tmp_path: Path, *overrides: str) -> tuple[Path, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "2", "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    env.pop("MLFLOW_RUN_ID", None)
    args = [sys.executable, "pipelines/run.py", "-m", *overrides, f"paths.artifacts={tmp_path / 'artifacts'}",
            f"hydra.sweep.dir={tmp_path / 'multirun'}"]
    done = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    report = subprocess.run([sys.executable, "-m", "napkit.report", "--latest", "--out", str(tmp_path / "r.md")],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert report.returncode == 0, report.stderr[-3000:]
    return tmp_path / "artifacts", report.stdout


@pytest.mark.slow
def test_one_shot_preset_runs_the_grid_and_the_report_prints_its_figure(tmp_path: Path) -> None:
    artifacts, out = _sweep(tmp_path, "+experiment=one_shot_mnist", "data=digits", "train.epochs=3",
                            "prune.grid=[2,4]")
    tables = sorted((artifacts / "prune").glob("*/iterations.csv"))
    assert len(tables) == 4  # nap, magnitude x seeds 0, 1 (two dense models, shared by the methods)
    assert len(list((artifacts / "pretrain").glob("*/metrics.json"))) == 2
    for table in tables:
        rows = list(csv.DictReader(table.open()))
        assert [round(float(r["compression"])) for r in rows] == [1, 2, 4]  # the grid, nothing rolled back
        assert all(r["test_top1"] and r["test_top1_pre_ft"] for r in rows[1:])
        # one-shot: no fine-tuning, so the top-1 after the (skipped) fine-tune is the one before it
        assert all(r["test_top1"] == r["test_top1_pre_ft"] for r in rows[1:])
    for metrics in (artifacts / "finetune").glob("*/metrics.json"):
        assert json.loads(metrics.read_text())["epochs"] == 0
    figure = re.search(r"^one_shot_nap_vs_magnitude=([0-9.]+)$", out, flags=re.M)
    assert figure and float(figure.group(1)) > 0
    assert "| lenet5 | nap | 2 |" in (tmp_path / "r.md").read_text()
    # trade-off, per-layer density, and NAP's predicted against measured loss increase per step
    assert sorted(p.name for p in (tmp_path / "r_files").glob("plot0_*.png")) == [f"plot0_{i}.png" for i in range(3)]


@pytest.mark.slow
def test_chex_preset_puts_both_flows_in_one_sweep_and_one_report(tmp_path: Path) -> None:
    artifacts, out = _sweep(tmp_path, "+experiment=chex_digits", "train.epochs=2", "chex.epochs=4",
                            "finetune.epochs=1", "model.width=0.125", "hydra.sweeper.params.seed=0")
    chex = json.loads(next((artifacts / "chex" / "evaluate").glob("*/metrics.json")).read_text())
    nap = json.loads(next((artifacts / "evaluate").glob("*/metrics.json")).read_text())
    assert chex["flops_reduction"] >= 2.0 * 0.98 and nap["flops_reduction"] >= 2.0 * 0.98  # equal FLOPs budgets
    assert re.search(r"^chex_minus_nap=-?[0-9.]+$", out, flags=re.M)
    report = (tmp_path / "r.md").read_text()
    assert "| vgg16_small | chex | 1 |" in report and "| vgg16_small | nap_structured | 1 |" in report
