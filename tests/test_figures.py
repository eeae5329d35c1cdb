"""The published figures from a sweep's runs (napkit.figures), on hand-made runs with known answers."""

from __future__ import annotations

import pytest

from napkit.figures import SeriesRun, compute


def _run(method: str, seed: int, dense: float, points: dict[float, float], model: str = "m") -> SeriesRun:
    """A run whose pre-fine-tune top-1 is 10 points below its post-fine-tune one at every grid point."""
    grid = [(1.0, dense, dense)] + [(x * 1.001, top1 - 10, top1) for x, top1 in points.items()]
    return SeriesRun(model=model, method=method, seed=seed, grid=grid, final_top1=list(points.values())[-1])


def test_band_is_the_highest_point_within_the_band_of_the_seed_mean() -> None:
    runs = [_run("nap", 0, 99.0, {2: 99.0, 4: 98.8, 8: 98.6, 16: 97.0}),
            _run("nap", 1, 99.0, {2: 99.0, 4: 98.6, 8: 98.2, 16: 97.0}),  # mean at 8x: 98.4 < 98.5
            _run("magnitude", 0, 99.0, {2: 98.9, 4: 98.0, 8: 97.0, 16: 90.0}),
            _run("magnitude", 1, 99.0, {2: 98.7, 4: 98.6, 8: 97.0, 16: 90.0})]
    fig = compute("band", runs, compare=["nap", "magnitude"], band=0.5, name="nap_vs_magnitude")
    # nap: 4x (mean 98.7); magnitude: 2x (mean 98.8; 4x mean 98.3 is out)
    assert fig.value == pytest.approx(2.0)
    assert fig.line == "nap_vs_magnitude=2"
    assert [r[4] for r in fig.rows] == ["2x", "4x"]  # magnitude, nap (sorted by method)


def test_band_needs_every_seed_at_a_point_and_takes_the_worst_model() -> None:
    runs = [_run("nap", 0, 99.0, {2: 99.0, 4: 99.0}, "a"), _run("nap", 1, 99.0, {2: 99.0}, "a"),
            _run("magnitude", 0, 99.0, {2: 99.0, 4: 99.0}, "a"),
            _run("nap", 0, 90.0, {2: 90.0, 4: 90.0}, "b"), _run("magnitude", 0, 90.0, {2: 90.0, 4: 80.0}, "b")]
    fig = compute("band", runs, compare=["nap", "magnitude"], band=0.5, name="x")
    # model a: nap's seed 1 never reached 4x, so nap counts 2x against magnitude's 4x (0.5); model b: 4x / 2x = 2
    assert fig.value == pytest.approx(0.5)


def test_grid_difference_and_final_difference() -> None:
    runs = [_run("nap_structured", 0, 60.0, {2: 61.0, 4: 59.0}), _run("l1_uniform", 0, 60.0, {2: 60.0, 4: 57.5})]
    grid = compute("grid", runs, compare=["nap_structured", "l1_uniform"], name="nap_minus_l1_uniform")
    assert grid.value == pytest.approx(1.0)  # min(+1.0 at 2x, +1.5 at 4x)
    final = compute("final", runs, compare=["nap_structured", "l1_uniform"], name="d")
    assert final.value == pytest.approx(1.5)


def test_missing_method_gives_no_value_and_says_why() -> None:
    fig = compute("band", [_run("nap", 0, 99.0, {2: 99.0})], compare=["nap", "magnitude"], band=0.5, name="r")
    assert fig.value is None and fig.line == "r=n/a" and "magnitude" in fig.notes[0]
    with pytest.raises(ValueError, match="valid: band, grid, final"):
        compute("nope", [], compare=[], name="r")
