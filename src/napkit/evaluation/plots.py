"""Plots people look at: per-layer ratios a method chose, and the pruning path."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from napkit.io import write_with  # noqa: E402


def _save(fig: plt.Figure, path: Path) -> Path:
    write_with(path, lambda tmp: fig.savefig(tmp, format=path.suffix.lstrip(".") or "png", dpi=120,
                                             bbox_inches="tight"))
    plt.close(fig)
    return path


def plot_layer_ratios(density: dict[str, float], path: Path, title: str = "kept weights per layer") -> Path:
    """Bar chart of each layer's kept fraction (1 - its automatic pruning ratio)."""
    names = list(density)
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(names)), 4))
    ax.bar(range(len(names)), [100 * density[n] for n in names], color="tab:blue")
    ax.set_xticks(range(len(names)), names, rotation=75, ha="right", fontsize=7)
    ax.set_ylabel("kept weights (%)")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def plot_prune_path(compression: Sequence[float], top1: Sequence[float], acc0: float, tolerance: float,
                    path: Path, kept: int | None = None, xlabel: str = "compression") -> Path:
    """Validation top-1 against compression (or FLOPs reduction) over the loop's iterations."""
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(compression, top1, "o-", label="validation top-1")
    ax.axhline(acc0 - tolerance, color="tab:red", ls="--", label=f"dense - {tolerance:g} pt")
    if kept is not None:
        ax.plot([compression[kept]], [top1[kept]], "*", ms=14, color="tab:green", label="kept (rollback point)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel(f"{xlabel} (x)")
    ax.set_ylabel("top-1 (%)")
    ax.legend()
    ax.grid(alpha=0.3)
    return _save(fig, path)
