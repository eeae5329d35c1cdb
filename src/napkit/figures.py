"""The published figures, computed from a sweep's runs (the report renders them; nothing reruns).

An experiment preset (``conf/experiment/``) names its figure under ``experiment.figure``:

- ``band``: per method, the highest grid point whose mean test top-1 over seeds (after the step's
  fine-tune) stays within ``experiment.band`` points of the dense model; the figure is the ratio of
  the first method's to the second's (``experiment.compare``), the smaller over models. This is
  ``nap_vs_magnitude`` (band 0.5, fine-tuned) and its one-shot twin (band 1.0, no fine-tuning).
- ``grid``: per grid point, the first method's mean test top-1 minus the second's (points), the smaller
  over models: ``nap_minus_l1_uniform`` at 2x / 4x fewer FLOPs.
- ``final``: the final test top-1 of every method (one run per method and seed), e.g. CHEX against NAP
  structured at equal FLOPs; the figure is the first method's mean minus the second's.

Every run carries a ``grid`` series: (x, test top-1 before fine-tuning, test top-1 after) per pruning
iteration, iteration 0 being the dense model (``prune.eval_test=true``).
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

FIGURES = ("band", "grid", "final")
_MATCH = 0.02  # a run that stops within 2% of a grid point reached it (step sizes round to whole units)


@dataclass
class SeriesRun:
    """What a figure needs from one run."""

    model: str
    method: str
    seed: int
    grid: list[tuple[float, float, float]] = field(default_factory=list)  # (x, pre-ft top-1, top-1)
    final_top1: float | None = None
    # per pruning step: the criterion's predicted loss increase and the measured one (validation loss)
    loss_increase: list[tuple[float, float]] = field(default_factory=list)
    points: tuple[float, ...] = ()  # the configured grid (prune.grid); empty: every step is a point


@dataclass
class Figure:
    """A computed figure: its line (``name=value``), a table and the notes that qualify it."""

    name: str
    value: float | None
    headers: list[str]
    rows: list[list[str]]
    notes: list[str] = field(default_factory=list)

    @property
    def line(self) -> str:
        return f"{self.name}={'n/a' if self.value is None else f'{self.value:.4g}'}"


def _mean_sd(values: Sequence[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _at(run: SeriesRun, x: float) -> tuple[float, float] | None:
    for px, pre, post in run.grid[1:]:
        if abs(px - x) <= _MATCH * x:
            return pre, post
    return None


def grid_means(runs: Sequence[SeriesRun], points: Sequence[float]) -> dict[float, dict[str, tuple[float, float]]]:
    """Per grid point every run reached: mean and sd over runs of top-1 before and after fine-tuning."""
    out: dict[float, dict[str, tuple[float, float]]] = {}
    for x in points:
        hits = [h for h in (_at(r, x) for r in runs) if h is not None]
        if runs and len(hits) == len(runs):
            out[x] = {"pre": _mean_sd([h[0] for h in hits]), "post": _mean_sd([h[1] for h in hits])}
    return out


def dense_top1(runs: Sequence[SeriesRun]) -> float:
    """Mean test top-1 of the dense models (iteration 0) of these runs."""
    return statistics.mean(r.grid[0][2] for r in runs if r.grid)


def _by(runs: Sequence[SeriesRun]) -> dict[str, dict[str, list[SeriesRun]]]:
    out: dict[str, dict[str, list[SeriesRun]]] = defaultdict(lambda: defaultdict(list))
    for r in runs:
        out[r.model][r.method].append(r)
    return out


def _points(runs: Sequence[SeriesRun]) -> list[float]:
    """The configured grid points of the runs; without a grid, every step any run measured."""
    configured = {float(x) for r in runs for x in r.points}
    return sorted(configured or {round(x, 6) for r in runs for x, _, _ in r.grid[1:]})


def band_figure(runs: Sequence[SeriesRun], compare: Sequence[str], band: float, name: str) -> Figure:
    """Highest grid point within ``band`` points of dense per method; ``compare[0] / compare[1]``."""
    rows, ratios, notes = [], [], []
    for model, methods in sorted(_by(runs).items()):
        best: dict[str, float] = {}
        for method, group in sorted(methods.items()):
            if not any(r.grid for r in group):
                continue
            dense = dense_top1(group)
            means = grid_means(group, _points(group))
            ok = [x for x, m in means.items() if m["post"][0] >= dense - band]
            best[method] = max(ok) if ok else 1.0
            top = max(means) if means else None
            rows.append([model, method, str(len(group)), f"{dense:.2f}", f"{best[method]:.3g}x",
                         f"{means[top]['post'][0]:.2f} ± {means[top]['post'][1]:.2f} at {top:.3g}x" if top else "-",
                         f"{means[top]['pre'][0]:.2f}" if top else "-"])
        if all(m in best for m in compare[:2]):
            ratios.append(best[compare[0]] / best[compare[1]])
        else:
            notes.append(f"{model}: no finished runs of {', '.join(m for m in compare[:2] if m not in best)}")
    headers = ["model", "method", "seeds", "dense top-1", f"highest within {band:g} pt", "top-1 at the last point",
               "before fine-tune"]
    return Figure(name, min(ratios) if ratios else None, headers, rows, notes)


def grid_figure(runs: Sequence[SeriesRun], compare: Sequence[str], name: str) -> Figure:
    """Mean top-1 per grid point and method; the figure is the smallest ``compare[0] - compare[1]``."""
    rows, diffs = [], []
    for model, methods in sorted(_by(runs).items()):
        points = _points([r for g in methods.values() for r in g])
        means = {m: grid_means(g, points) for m, g in methods.items()}
        for x in points:
            for method in sorted(means):
                if x in means[method]:
                    post, pre = means[method][x]["post"], means[method][x]["pre"]
                    rows.append([model, f"{x:.3g}x", method, str(len(methods[method])), f"{post[0]:.2f} ± {post[1]:.2f}",
                                 f"{pre[0]:.2f}"])
            if all(x in means.get(m, {}) for m in compare[:2]):
                diffs.append(means[compare[0]][x]["post"][0] - means[compare[1]][x]["post"][0])
    return Figure(name, min(diffs) if diffs else None,
                  ["model", "grid point", "method", "seeds", "test top-1", "before fine-tune"], rows)


def final_figure(runs: Sequence[SeriesRun], compare: Sequence[str], name: str) -> Figure:
    """Final test top-1 per method (mean over seeds); the figure is ``compare[0] - compare[1]``."""
    rows, diffs = [], []
    for model, methods in sorted(_by(runs).items()):
        means = {}
        for method, group in sorted(methods.items()):
            values = [r.final_top1 for r in group if r.final_top1 is not None and math.isfinite(r.final_top1)]
            if values:
                means[method] = _mean_sd(values)
                rows.append([model, method, str(len(values)), f"{means[method][0]:.2f} ± {means[method][1]:.2f}"])
        if all(m in means for m in compare[:2]):
            diffs.append(means[compare[0]][0] - means[compare[1]][0])
    return Figure(name, min(diffs) if diffs else None, ["model", "method", "seeds", "test top-1"], rows)


def compute(kind: str, runs: Sequence[SeriesRun], *, compare: Sequence[str], name: str, band: float = 0.5) -> Figure:
    """The figure ``kind`` (one of :data:`FIGURES`) over ``runs``."""
    if kind == "band":
        return band_figure(runs, compare, band, name)
    if kind == "grid":
        return grid_figure(runs, compare, name)
    if kind == "final":
        return final_figure(runs, compare, name)
    raise ValueError(f"unknown figure {kind!r}; valid: {', '.join(FIGURES)}")
