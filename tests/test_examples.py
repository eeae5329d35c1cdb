"""The README's "Prune your own model" example runs as written (a torchvision ResNet-18, 2x fewer FLOPs)."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_prune_your_model_example_reaches_its_flops_target() -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    done = subprocess.run([sys.executable, "examples/prune_your_model.py"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    reason, measures = done.stdout.splitlines()[0].split(" ", 1)
    values = ast.literal_eval(measures)
    assert reason == "target" and values["flops_reduction"] >= 2.0 * 0.995 and values["params_reduction"] > 1
    assert values["val_top1"] > 80  # a trained, pruned and fine-tuned model, not a broken one
