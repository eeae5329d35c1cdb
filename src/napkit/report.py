"""Comparison report from the MLflow store: one self-contained HTML (or Markdown) file.

    python -m napkit.report --experiment napkit --sweep <PARENT_RUN_ID> --out reports/sweep.html
    python -m napkit.report --experiment napkit --filter "params.\\`data.name\\` = 'digits'" --out reports/digits.md

Contents, per model: test top-1 against parameter compression and against FLOPs reduction, one line
per method (a method is the ``prune`` config chosen; one point per run, joined in compression order,
with each run's validation path along the pruning iterations dashed), the per-layer density each
method chose, and a table of every run: model, method, target, dense and pruned top-1, params and
FLOPs reduction, latency speed-up and the wall time of each stage (``<stage>/seconds``, else
estimated from the metrics' timestamps, marked ~). Plots are embedded as base64 PNG.
"""

from __future__ import annotations

import argparse
import ast
import base64
import csv
import html
import io
import logging
import os
import sys
import tempfile
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FuncFormatter, NullFormatter  # noqa: E402
from mlflow.entities import Run  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402
from tqdm import tqdm  # noqa: E402

from napkit.figures import Figure, SeriesRun, compute  # noqa: E402
from napkit.io import write_text  # noqa: E402
from napkit.stages import STAGES  # noqa: E402

log = logging.getLogger("napkit.report")

# The last metric each stage logs (its summary), whose timestamp marks the stage's end.
_STAGE_END_METRIC = {"pretrain": "pretrain/params", "curvature": "curvature/layers", "prune": "prune/iterations",
                     "finetune": "finetune/epochs", "evaluate": "evaluate/top1"}


@dataclass
class RunRow:
    """What the report needs from one MLflow run."""

    run_id: str
    name: str
    status: str
    model: str
    data: str
    method: str
    target: str
    metrics: dict[str, float]
    seconds: dict[str, float | None] = field(default_factory=dict)
    estimated: set[str] = field(default_factory=set)
    cached: set[str] = field(default_factory=set)
    path: list[tuple[float, float]] = field(default_factory=list)
    path_x: str = "compression"
    density: dict[str, float] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)
    series: SeriesRun | None = None
    error: str = ""

    def m(self, key: str) -> float | None:
        """A stage metric; the CHEX flow's ``chex_evaluate/...`` answers for ``evaluate/...``."""
        value = self.metrics.get(key)
        return self.metrics.get(f"chex_{key}") if value is None and key.startswith("evaluate/") else value


def _target(params: dict[str, str]) -> str:
    if params.get("pipeline") == "chex":
        return f"FLOPs {params.get('chex.target_flops_reduction')}x" if params.get(
            "chex.target_flops_reduction") not in (None, "None", "null") else f"S {params.get('chex.S')}"
    if params.get("prune.grid") not in (None, "None", "null", "[]"):  # the grid overrides any target
        unit = "FLOPs " if params.get("prune.mode") == "structured" else ""
        return f"grid {unit}{params['prune.grid']}x"
    if params.get("prune.mode") == "structured":
        for key, label in (("prune.structured.target_flops_reduction", "FLOPs"),
                           ("prune.structured.target_params_reduction", "params")):
            if params.get(key) not in (None, "None", "null"):
                return f"{label} {params[key]}x"
        return "tolerance"
    if params.get("prune.target_compression") not in (None, "None", "null"):
        return f"{params['prune.target_compression']}x"
    if params.get("prune.target_sparsity") not in (None, "None", "null"):
        return f"sparsity {params['prune.target_sparsity']}"
    return "tolerance"


def _history(client: MlflowClient, run_id: str, key: str) -> list[Any]:
    try:
        return sorted(client.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp))
    except Exception:  # noqa: BLE001 - a missing metric is no history
        return []


def _stage_seconds(client: MlflowClient, run: Run) -> tuple[dict[str, float | None], set[str]]:
    """``<stage>/seconds`` where logged; else the gap between the stages' summary timestamps."""
    metrics = run.data.metrics
    seconds: dict[str, float | None] = {s: metrics.get(f"{s}/seconds") for s in STAGES}
    estimated: set[str] = set()
    if all(v is not None for v in seconds.values()):
        return seconds, estimated
    ends: dict[str, float] = {}
    for stage, key in _STAGE_END_METRIC.items():
        hist = _history(client, run.info.run_id, key) if key in metrics else []
        if hist:
            ends[stage] = max(m.timestamp for m in hist) / 1000.0
    previous = run.info.start_time / 1000.0
    for stage in STAGES:
        if stage in ends:
            if seconds[stage] is None:
                seconds[stage] = max(ends[stage] - previous, 0.0)
                estimated.add(stage)
            previous = ends[stage]
    return seconds, estimated


def _density(client: MlflowClient, run: Run, workdir: Path) -> dict[str, float]:
    """Per-layer density of the final model: evaluate/layers.csv, else the kept ``prune/density/*``
    summary, else the ``iter/prune/density/*`` series at the kept iteration."""
    try:
        local = client.download_artifacts(run.info.run_id, "evaluate/layers.csv", str(workdir))
        with open(local) as fh:
            return {row["layer"]: float(row["density"]) for row in csv.DictReader(fh)}
    except Exception:  # noqa: BLE001 - fall back to the metrics
        pass
    summary = {k.removeprefix("prune/density/"): v for k, v in run.data.metrics.items()
               if k.startswith("prune/density/")}
    if summary:
        return summary
    kept = int(run.data.metrics.get("prune/kept_iteration", -1))
    out = {}
    for key in run.data.metrics:
        if key.startswith("iter/prune/density/"):
            hist = _history(client, run.info.run_id, key)
            at = [m.value for m in hist if m.step == kept] or [run.data.metrics[key]]
            out[key.removeprefix("iter/prune/density/")] = at[-1]
    return out


def _series(client: MlflowClient, run: Run, row: RunRow, workdir: Path) -> SeriesRun:
    """The run's grid series from its ``prune/iterations.csv`` (test top-1 per iteration, with
    ``prune.eval_test``) and its final test top-1."""
    grid, loss = [], []
    try:
        local = client.download_artifacts(run.info.run_id, "prune/iterations.csv", str(workdir))
        with open(local) as fh:
            for rec in csv.DictReader(fh):
                x = rec.get("compression") or rec.get("flops_reduction")
                if x and rec.get("test_top1"):
                    grid.append((float(x), float(rec.get("test_top1_pre_ft") or rec["test_top1"]),
                                 float(rec["test_top1"])))
                if rec.get("predicted_loss_increase") and rec.get("measured_loss_increase"):
                    loss.append((float(rec["predicted_loss_increase"]), float(rec["measured_loss_increase"])))
    except Exception:  # noqa: BLE001 - a run without the table (CHEX, a failed run) has no grid series
        grid, loss = [], []
    points = ast.literal_eval(row.params.get("prune.grid") or "[]") or []
    return SeriesRun(model=row.model, method=row.method, seed=int(row.params.get("seed", 0) or 0), grid=grid,
                     final_top1=row.m("evaluate/top1"), loss_increase=loss, points=tuple(float(x) for x in points))


def plot_loss_prediction(model: str, rows: list[RunRow]) -> bytes | None:
    """Each step's predicted loss increase (the criterion's K-FAC quadratic model) against the measured
    one (validation loss before the step's fine-tune minus after the previous one), per method."""
    runs = [r for r in rows if r.series is not None and r.series.loss_increase]
    if not runs:
        return None
    methods = sorted({r.method for r in runs})
    colors = _colors(methods)
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    for method in methods:
        pts = [p for r in runs if r.method == method for p in r.series.loss_increase]
        ax.scatter(*zip(*pts, strict=True), s=14, color=colors[method], label=method)
    values = [v for r in runs for p in r.series.loss_increase for v in p]
    lo, hi = min(values), max(values)
    ax.plot([lo, hi], [lo, hi], color="grey", lw=0.8, ls="--", label="predicted = measured")
    ax.set_xlabel("predicted loss increase (K-FAC)")
    ax.set_ylabel("measured loss increase (validation)")
    ax.set_title(f"{model}: does the criterion predict what a step costs?")
    ax.legend(fontsize=8)
    return _png(fig)


def figure_of(rows: list[RunRow]) -> Figure | None:
    """The figure the runs' experiment preset names (``experiment.figure``), if any."""
    params = next((r.params for r in rows if r.params.get("experiment.figure")), None)
    if params is None:
        return None
    compare = ast.literal_eval(params.get("experiment.compare", "[]"))
    return compute(params["experiment.figure"], [r.series for r in rows if r.series is not None and
                                                 r.status == "FINISHED"],
                   compare=compare, band=float(params.get("experiment.band", 0.5)),
                   name=params.get("experiment.figure_name", params["experiment.figure"]))


def collect(client: MlflowClient, runs: list[Run], workdir: Path) -> list[RunRow]:
    rows = []
    for run in tqdm(runs, desc="report: runs", unit="run", file=sys.stderr):
        params, tags, metrics = run.data.params, run.data.tags, run.data.metrics
        method = tags.get("napkit.choice.prune") or params.get("prune.method", "?")
        if "napkit.choice.prune" not in tags and params.get("prune.mode") == "structured":
            method += " (structured)"
        row = RunRow(run_id=run.info.run_id, name=run.info.run_name or run.info.run_id[:8], status=run.info.status,
                     model=tags.get("napkit.choice.model") or params.get("model.name", "?"),
                     data=tags.get("napkit.choice.data") or params.get("data.name", "?"), method=method,
                     target=_target(params), metrics=dict(metrics),
                     cached={s for s in STAGES if tags.get(f"napkit.stage.{s}") == "cached"}, params=dict(params),
                     error=tags.get("napkit.error", ""))
        row.seconds, row.estimated = _stage_seconds(client, run)
        y = _history(client, run.info.run_id, "iter/prune/val_top1")  # the pruning path, per iteration
        for x_key in ("iter/prune/compression", "iter/prune/flops_reduction"):
            x = _history(client, run.info.run_id, x_key) if x_key in metrics else []
            if x and y:
                by_step = {m.step: m.value for m in y}
                row.path = [(m.value, by_step[m.step]) for m in x if m.step in by_step]
                row.path_x = x_key.rsplit("/", 1)[1]
                break
        if "evaluate/top1" in metrics or "prune/kept_iteration" in metrics:
            row.density = _density(client, run, workdir / run.info.run_id)
        row.series = _series(client, run, row, workdir / run.info.run_id / "series")
        rows.append(row)
    return rows


def _png(fig: plt.Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _colors(methods: list[str]) -> dict[str, Any]:
    cmap = plt.get_cmap("tab10")
    return {m: cmap(i % 10) for i, m in enumerate(methods)}


def plot_tradeoff(model: str, rows: list[RunRow]) -> bytes:
    """Test top-1 vs params compression and vs FLOPs reduction, one line per method."""
    done = [r for r in rows if r.m("evaluate/top1") is not None]
    methods = sorted({r.method for r in done})
    colors = _colors(methods)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, label in ((axes[0], "evaluate/compression_params", "parameter compression (dense / non-zero)"),
                           (axes[1], "evaluate/flops_reduction", "FLOPs reduction (dense / effective)")):
        for method in methods:
            pts = sorted((r.m(key), r.m("evaluate/top1")) for r in done if r.method == method and r.m(key))
            if pts:
                ax.plot(*zip(*pts), marker="o", color=colors[method], label=method)
            path_key = "compression" if key.endswith("compression_params") else "flops_reduction"
            for r in done:
                if r.method == method and r.path and r.path_x == path_key:
                    ax.plot(*zip(*r.path), ls="--", lw=0.9, alpha=0.6, color=colors[method], marker=".")
        dense = [r.m("evaluate/top1_dense") for r in done if r.m("evaluate/top1_dense") is not None]
        if dense:
            ax.axhline(max(dense), color="gray", ls=":", lw=1, label="dense")
        lo, hi = ax.get_xlim()
        if lo > 0 and hi / lo > 8:
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
        ax.set_xlabel(label)
        ax.set_ylabel("top-1 (%)")
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{model}: test top-1 (markers; dashed: validation top-1 along the pruning path)")
    return _png(fig)


def plot_layers(model: str, rows: list[RunRow]) -> bytes | None:
    """Kept-weight fraction per layer that each method chose (last finished run per method)."""
    chosen: dict[str, RunRow] = {}
    for r in rows:
        if r.density and r.status == "FINISHED":
            chosen[r.method] = r
    if not chosen:
        return None
    layers = list(dict.fromkeys(n for r in chosen.values() for n in r.density))
    methods = sorted(chosen)
    colors = _colors(methods)
    height = 0.8 / len(methods)
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(layers) * max(1, len(methods) / 2) + 1.5))
    for i, method in enumerate(methods):
        ys = [j + i * height for j in range(len(layers))]
        ax.barh(ys, [chosen[method].density.get(n, float("nan")) for n in layers], height=height,
                color=colors[method], label=method)
    ax.set_yticks([j + 0.4 - height / 2 for j in range(len(layers))], layers, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("kept weights (density)")
    ax.set_xlim(0, 1)
    ax.legend(fontsize=8)
    ax.set_title(f"{model}: per-layer density chosen by each method")
    ax.grid(axis="x", alpha=0.3)
    return _png(fig)


def _fmt(v: float | None, spec: str = ".2f", suffix: str = "") -> str:
    return "–" if v is None else f"{v:{spec}}{suffix}"


COLUMNS = ["model", "method", "target", "status", "top-1 dense", "top-1 pruned", "params red.", "FLOPs red.",
           "latency speed-up", *[f"{s} s" for s in STAGES], "run"]


def table_rows(rows: list[RunRow]) -> list[list[str]]:
    out = []
    for r in sorted(rows, key=lambda r: (r.model, r.method, r.target, r.name)):
        lat, lat_d = r.m("evaluate/latency_ms"), r.m("evaluate/latency_ms_dense")
        times = []
        for s in STAGES:
            v = r.seconds.get(s)
            text = _fmt(v, ".1f")
            if v is not None and s in r.estimated:
                text = "~" + text
            if s in r.cached:
                text += " (cached)"
            times.append(text)
        status = r.status if not r.error else f"{r.status}: {r.error[:120]}"
        out.append([r.model, r.method, r.target, status, _fmt(r.m("evaluate/top1_dense")),
                    _fmt(r.m("evaluate/top1")), _fmt(r.m("evaluate/compression_params"), ".2f", "x"),
                    _fmt(r.m("evaluate/flops_reduction"), ".2f", "x"),
                    _fmt(lat_d / lat if lat and lat_d else None, ".2f", "x"), *times, r.name])
    return out


_CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1400px}table{border-collapse:collapse;
font-size:13px}th,td{border:1px solid #ccc;padding:3px 7px;text-align:right}th{background:#f3f3f3}
td:nth-child(-n+4){text-align:left}img{max-width:100%}.fail{color:#b00}"""


def _cells(tag: str, values: list[str]) -> str:
    return "<tr>" + "".join(f"<{tag}>{html.escape(v)}</{tag}>" for v in values) + "</tr>"


def render_html(title: str, subtitle: str, sections: list[tuple[str, list[bytes]]], rows: list[list[str]],
                figure: Figure | None = None) -> str:
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1><p>{html.escape(subtitle)}</p>"]
    if figure is not None:
        parts.append(f"<h2>Figure: <code>{html.escape(figure.line)}</code></h2><table>"
                     + _cells("th", figure.headers) + "".join(_cells("td", r) for r in figure.rows) + "</table>")
        parts += [f"<p>{html.escape(n)}</p>" for n in figure.notes]
    for heading, images in sections:
        parts.append(f"<h2>{html.escape(heading)}</h2>")
        for png in images:
            parts.append(f"<img alt='{html.escape(heading)}' src='data:image/png;base64,"
                         f"{base64.b64encode(png).decode()}'>")
    parts.append("<h2>All runs</h2><table><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in COLUMNS) + "</tr>")
    for row in rows:
        cls = " class='fail'" if not row[3].startswith("FINISHED") else ""
        parts.append(f"<tr{cls}>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>")
    parts.append("</table><p>Stage times in seconds: ~ estimated from metric timestamps; (cached) reused "
                 "from an earlier run with the same config (time of the original computation).</p></body></html>")
    return "\n".join(parts)


def render_markdown(title: str, subtitle: str, sections: list[tuple[str, list[bytes]]],
                    rows: list[list[str]], out: Path, figure: Figure | None = None) -> str:
    """Markdown with the PNGs written beside it (``<name>_files/``)."""
    folder = out.parent / f"{out.stem}_files"
    folder.mkdir(parents=True, exist_ok=True)
    lines = [f"# {title}", "", subtitle, ""]
    if figure is not None:
        lines += [f"## Figure: `{figure.line}`", "", "| " + " | ".join(figure.headers) + " |",
                  "|" + "---|" * len(figure.headers)]
        lines += ["| " + " | ".join(r) + " |" for r in figure.rows] + [""] + figure.notes + [""]
    for i, (heading, images) in enumerate(sections):
        lines += [f"## {heading}", ""]
        for j, png in enumerate(images):
            (folder / f"plot{i}_{j}.png").write_bytes(png)
            lines += [f"![{heading}]({folder.name}/plot{i}_{j}.png)", ""]
    lines += ["## All runs", "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(c.replace("|", "/") for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def find_runs(client: MlflowClient, experiment: str, sweep: str | None, filter_string: str | None) -> list[Run]:
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise SystemExit(f"napkit report: error: no MLflow experiment {experiment!r} in {client.tracking_uri}")
    clauses = [f"tags.`mlflow.parentRunId` = '{sweep}'"] if sweep else []
    if filter_string:
        clauses.append(filter_string)
    runs, token = [], None
    while True:
        page = client.search_runs([exp.experiment_id], filter_string=" and ".join(clauses),
                                  order_by=["attributes.start_time ASC"], max_results=1000, page_token=token)
        runs += page
        token = page.token
        if not token:
            break
    # pipeline runs only: not sweep parents, and at least one stage done
    return [r for r in runs if r.data.tags.get("napkit.role") != "sweep"
            and (any(k.startswith("napkit.stage.") for k in r.data.tags) or r.info.status == "FAILED")]


def latest_sweep(client: MlflowClient, experiment: str) -> str:
    """The parent run id of the newest sweep in ``experiment``."""
    exp = client.get_experiment_by_name(experiment)
    runs = [] if exp is None else client.search_runs([exp.experiment_id], "tags.`napkit.role` = 'sweep'",
                                                     order_by=["attributes.start_time DESC"], max_results=1)
    if not runs:
        raise SystemExit(f"napkit report: error: no sweep in MLflow experiment {experiment!r}")
    return runs[0].info.run_id


def build(client: MlflowClient, experiment: str, out: Path, sweep: str | None = None,
          filter_string: str | None = None) -> Path:
    runs = find_runs(client, experiment, sweep, filter_string)
    if not runs:
        raise SystemExit("napkit report: error: no runs match (check --experiment, --sweep, --filter)")
    with tempfile.TemporaryDirectory() as tmp:
        rows = collect(client, runs, Path(tmp))
    by_model: dict[str, list[RunRow]] = defaultdict(list)
    for r in rows:
        by_model[r.model].append(r)
    sections = []
    for model in sorted(by_model):
        images = [plot_tradeoff(model, by_model[model])]
        images += [png for png in (plot_layers(model, by_model[model]),
                                   plot_loss_prediction(model, by_model[model])) if png]
        sections.append((model, images))
    finished = sum(r.status == "FINISHED" for r in rows)
    title = f"napkit comparison: {experiment}" + (f", sweep {sweep}" if sweep else "")
    subtitle = (f"{len(rows)} runs ({finished} finished, {len(rows) - finished} not) from {client.tracking_uri}"
                + (f"; filter: {filter_string}" if filter_string else ""))
    table = table_rows(rows)
    figure = figure_of(rows)
    text = (render_markdown(title, subtitle, sections, table, out, figure) if out.suffix.lower() == ".md"
            else render_html(title, subtitle, sections, table, figure))
    write_text(out, text)
    if figure is not None:
        print(figure.line)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m napkit.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("--experiment", default="napkit")
    parser.add_argument("--sweep", help="parent run id of a sweep: its child runs only")
    parser.add_argument("--latest", action="store_true", help="the newest sweep (its parent run) in the experiment")
    parser.add_argument("--filter", dest="filter_string", help="MLflow search filter, e.g. \"params.`data.name` = 'digits'\"")
    parser.add_argument("--tracking-uri", help="default: $MLFLOW_TRACKING_URI, else sqlite:///<repo>/mlflow.db")
    parser.add_argument("--out", type=Path, default=Path("reports/report.html"), help=".html (self-contained) or .md")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    from omegaconf import OmegaConf

    from napkit.tracking.mlflow_run import tracking_uri

    uri = tracking_uri(OmegaConf.create({"tracking": {"uri": args.tracking_uri}}))
    client = MlflowClient(uri)
    sweep = latest_sweep(client, args.experiment) if args.latest else args.sweep
    out = build(client, args.experiment, args.out, sweep, args.filter_string)
    print(f"napkit report: wrote {out}")


if __name__ == "__main__":
    main()
