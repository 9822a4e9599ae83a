"""`normlab report SWEEP_DIR`: one self-contained page comparing the runs of a sweep (`SWEEP_DIR/report.html`).

The final val loss of each configuration (mean ± std over its seeds, every seed as a dot), a table of the
configurations and of the runs, and the val-loss curves of every run overlaid, one colour per configuration.
Figures are PNGs embedded as base64, the style is inline: no scripts, no network, no other file.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from normlab.errors import CheckpointError
from normlab.files import atomic_write
from normlab.runs.metrics import read_metrics
from normlab.sweeps.summary import SPLITS, SweepRow, configurations, read_summary

REPORT = "report.html"
_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; padding: 0 1em; color: #222; }
h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 1.6em; }
table { border-collapse: collapse; margin: .5em 0; } td, th { border: 1px solid #ddd; padding: .25em .6em; }
th { background: #f4f4f4; text-align: left; } td.number { text-align: right; font-variant-numeric: tabular-nums; }
img { max-width: 100%; border: 1px solid #eee; margin: .5em 0; } .note { color: #555; font-style: italic; }
"""


def write_sweep_report(folder: str | Path) -> Path:
    """Write the comparison page of the sweep in `folder` from its `summary.json` and its runs' metrics."""
    folder = Path(folder)
    preset, varied, rows = read_summary(folder)
    groups = configurations(rows)
    curves, missing = {}, []
    for row in rows:
        try:
            points = [(r["step"], r["val_loss"]) for r in read_metrics(folder / row.name) if "val_loss" in r]
            curves[row.name] = [(s, v) for s, v in points if isinstance(v, (int, float))]
        except CheckpointError as error:
            missing.append(f"{row.name}: {error}")
    varied_text = ", ".join(f"{key} = {', '.join(values)}" for key, values in varied.items())
    page = (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>sweep {html.escape(folder.name)}'
            f"</title><style>{_STYLE}</style></head><body><h1>normlab sweep: {html.escape(folder.resolve().name)}"
            f"</h1><p>{len(rows)} runs of preset {html.escape(preset)}, varying {html.escape(varied_text)}; "
            f"{len(groups)} configuration(s) over seeds. Final losses on the whole splits.</p>"
            f"<h2>Val loss per configuration</h2>{_image(_loss_figure(groups, rows))}{_groups_table(groups)}"
            f"<h2>Val loss during training</h2>{_image(_curves_figure(groups, curves))}"
            + "".join(f'<p class="note">{html.escape(line)}</p>' for line in missing)
            + f"<h2>Runs</h2>{_runs_table(rows, list(varied))}</body></html>\n")
    path = folder / REPORT
    atomic_write(path, page)
    return path


def _number(value: float | None, std: float | None = None) -> str:
    if value is None or not math.isfinite(value):
        return "—"
    return f"{value:.4f}" + (f" ± {std:.4f}" if std is not None else "")


def _groups_table(groups: Sequence[dict[str, Any]]) -> str:
    head = "<tr><th>configuration</th><th>runs</th>" + "".join(f"<th>{s} (mean ± std)</th>" for s in SPLITS)
    body = "".join(
        f"<tr><td>{html.escape(g['label'])}</td><td class=number>{len(g['runs'])}"
        + (f" ({g['diverged']} diverged)" if g["diverged"] else "") + "</td>"
        + "".join(f"<td class=number>{_number(g[f'{s}_mean'], g[f'{s}_std'])}</td>" for s in SPLITS) + "</tr>"
        for g in sorted(groups, key=lambda g: math.inf if g["val_mean"] is None else g["val_mean"]))
    return f"<table>{head}</tr>{body}</table>"


def _runs_table(rows: Sequence[SweepRow], keys: list[str]) -> str:
    head = "".join(f"<th>{html.escape(key)}</th>" for key in ["run", *keys, *SPLITS, "diverged at"])
    body = "".join(
        f'<tr><td><a href="{html.escape(row.name)}/">{html.escape(row.name)}</a></td>'
        + "".join(f"<td>{html.escape(row.values.get(key, ''))}</td>" for key in keys)
        + "".join(f"<td class=number>{_number(row.final.get(s))}</td>" for s in SPLITS)
        + f"<td>{'' if row.diverged_at is None else row.diverged_at}</td></tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _figure(width: float, height: float) -> tuple[Any, Any]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    return figure, figure.subplots()


def _loss_figure(groups: Sequence[dict[str, Any]], rows: Sequence[SweepRow]) -> Any:
    figure, axes = _figure(10, 0.5 + 0.45 * max(2, len(groups)))
    by_name = {row.name: row for row in rows}
    for index, group in enumerate(groups):
        seeds = [by_name[name].final["val"] for name in group["runs"] if by_name[name].diverged_at is None]
        seeds = [x for x in seeds if math.isfinite(x)]
        axes.plot(seeds, [index] * len(seeds), "o", color="0.6", markersize=4)
        if group["val_mean"] is not None:
            axes.errorbar(group["val_mean"], index, xerr=group["val_std"] or 0, fmt="D", color="C0", capsize=4)
    axes.set_yticks(range(len(groups)), [group["label"] for group in groups])
    axes.invert_yaxis()
    axes.set_xlabel("final val loss (diamond: mean ± std over seeds; dots: each seed)")
    axes.grid(axis="x", alpha=0.3)
    return figure


def _curves_figure(groups: Sequence[dict[str, Any]], curves: dict[str, list[tuple[int, float]]]) -> Any:
    figure, axes = _figure(10, 4.5)
    drawn = False
    for index, group in enumerate(groups):
        for number, name in enumerate(group["runs"]):
            points = [(s, v) for s, v in curves.get(name, []) if math.isfinite(v)]
            if points:
                drawn = True
                axes.plot(*zip(*points), color=f"C{index % 10}", alpha=0.8, marker="." if len(points) < 30 else None,
                          label=group["label"] if number == 0 else None)
    axes.set_xlabel("step")
    axes.set_ylabel("val loss (fixed subset)")
    axes.grid(alpha=0.3)
    if drawn:
        axes.legend(fontsize="small", ncols=2)
    return figure


def _image(figure: Any) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f'<img alt="figure" src="data:image/png;base64,{data}">'
