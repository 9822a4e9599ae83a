"""``report.html``: one self-contained page per run: the loss curve and findings first, then every histogram
browsable step by step, the plots, and the configuration as key/value rows.

Images are embedded as base64 PNG data URIs, the histograms as JSON drawn by a few lines of inline JavaScript
(:mod:`normlab.diagnostics.explorer`), the style sheet is inline: no network, no other file needed, so the report
can be mailed or archived as it is. What the report reads from the run directory is read in one place,
:func:`read_run_files`.
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from normlab.diagnostics.explorer import STYLE as EXPLORER_STYLE
from normlab.diagnostics.explorer import explorer_html
from normlab.diagnostics.findings import RULES, Finding, find_issues
from normlab.diagnostics.plots import plot_all
from normlab.diagnostics.storage import Diagnostics, has_diagnostics, load_diagnostics
from normlab.diagnostics.storage_io import atomic_write_text
from normlab.runs.rundir import CONFIG, REPORT

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; padding: 0 1em; color: #222; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 1.6em; }
table { border-collapse: collapse; margin: .5em 0; } td, th { border: 1px solid #ddd; padding: .25em .6em; }
th { background: #f4f4f4; text-align: left; }
td.number { text-align: right; font-variant-numeric: tabular-nums; }
figure { margin: 1em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { color: #555; font-size: .9em; }
.finding { border-left: 4px solid #e0a800; padding: .3em .8em; margin: .6em 0; background: #fffbea; }
.finding.error { border-color: #c62828; background: #fdecea; }
.finding.info { border-color: #1f77b4; background: #eef5fb; }
.note { color: #555; font-style: italic; }
"""

_CAPTIONS = {
    "activations": "Output distribution per layer, with mean, std and saturated/dead share in the legend.",
    "gradients": "Distribution of the gradient reaching each layer's output.",
    "weight_gradients": "Distribution of each weight matrix's gradient, with its grad:data ratio.",
    "update_to_data": "log10 of std(update) / std(weights) per step; the dashed guide is the lesson's 1e-3.",
    "loss": "Training and validation loss.",
    "gradient_norms": "Gradient L2 norm per weight matrix and over all recorded parameters.",
    "saturation": "Share of saturated outputs (tanh/sigmoid-like) and dead units (ReLU-like) over time.",
    "activation_heatmaps": "Each layer's output histogram over time (columns are recorded steps).",
}


@dataclass
class RunFiles:
    """What the report reads from a run directory: its configuration, metric rows and vocabulary size."""

    config: dict | None = None
    metrics: list[dict] = field(default_factory=list)
    vocab_size: int | None = None


def read_run_files(run_dir: Path) -> RunFiles:
    """Read ``config.json``, ``metrics.jsonl`` and ``vocab.json`` of ``run_dir`` (each may be missing).

    The one place the report reads the run directory's own files, through `normlab.runs.rundir`, the module that
    knows them (its ``diagnostics/`` are read by :func:`~normlab.diagnostics.storage.load_diagnostics`).
    """
    from normlab.runs.metrics import read_metrics
    from normlab.runs.rundir import read_config_json, read_vocab_size

    vocab_size = read_vocab_size(run_dir)
    return RunFiles(read_config_json(run_dir), read_metrics(run_dir), vocab_size if vocab_size and vocab_size >= 2
                    else None)


def flatten_config(config: dict, prefix: str = "") -> list[tuple[str, object]]:
    """Nested configuration as ``(dotted.key, value)`` rows, in order (lists of scalars stay one value)."""
    rows: list[tuple[str, object]] = []
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            rows += flatten_config(value, f"{name}.")
        else:
            rows.append((name, value))
    return rows


def _format_value(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, list) and all(not isinstance(item, (dict, list)) for item in value):
        return ", ".join(_format_value(item) for item in value) or "[]"
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    if value is None:
        return "none"
    return str(value)


def _table(rows: Sequence[tuple[str, object]], header: tuple[str, str]) -> str:
    body = "".join(
        f'<tr><td>{html.escape(str(key))}</td><td class="number">{html.escape(_format_value(value))}</td>'
        "</tr>"
        for key, value in rows
    )
    return f"<table><tr><th>{header[0]}</th><th>{header[1]}</th></tr>{body}</table>"


def _losses_section(rows: Sequence[dict], diagnostics: Diagnostics | None) -> str:
    final = next((row for row in reversed(rows) if row.get("event") == "final"), None)
    parts = []
    if final is not None:
        splits = [(split, final[split]) for split in ("train", "val", "test") if split in final]
        parts.append(_table(splits, ("split", "final loss")))
    last = next((row for row in reversed(rows) if "train_loss" in row or "val_loss" in row), None)
    if last is not None:
        keys = ("step", "train_loss", "val_loss", "lr", "elapsed_s")
        parts.append("<p>Last logged step:</p>" + _table([(k, last[k]) for k in keys if k in last], ("", "")))
    if not parts and diagnostics is not None and diagnostics.series("", "loss")[0].size:
        steps, losses = diagnostics.series("", "loss")
        parts.append(
            _table(
                [(f"step {int(s)}", float(v)) for s, v in zip(steps, losses, strict=True)][-10:],
                ("recorded step", "loss"),
            )
        )
    return "".join(parts) or '<p class="note">No losses were recorded for this run.</p>'


def _findings_section(findings: Sequence[Finding], has_data: bool) -> str:
    rules = "".join(
        f"<li><b>{html.escape(name)}</b>: {html.escape(text)}</li>" for name, text in RULES.items()
    )
    checked = f"<details><summary>Rules checked</summary><ul>{rules}</ul></details>"
    if not has_data:
        return '<p class="note">No diagnostics recorded, so no findings.</p>' + checked
    if not findings:
        return "<p>No rule fired: the recorded numbers look healthy.</p>" + checked
    items = "".join(
        f'<div class="finding {html.escape(f.severity)}"><b>{html.escape(f.severity.upper())} '
        f"[{html.escape(f.rule)}]</b> step {f.step}, {html.escape(f.layer or 'model')}: "
        f"{html.escape(f.message)}<br><i>Remedy:</i> {html.escape(f.remedy)}</div>"
        for f in findings
    )
    return items + checked


def embedded_image(path: Path) -> str:
    """An ``<img>`` element carrying the PNG at ``path`` inside the page (a base64 data URI: no file, no network)."""
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(path.stem)}" src="data:image/png;base64,{data}">'


def _figure(path: Path) -> str:
    key = next((k for k in sorted(_CAPTIONS, key=len, reverse=True) if path.stem.startswith(k)), "")
    caption = f"{path.stem}: {_CAPTIONS.get(key, '')}"
    return f"<figure>{embedded_image(path)}<figcaption>{html.escape(caption)}</figcaption></figure>"


def _figure_named(paths: list[Path], stem: str) -> tuple[str, list[Path]]:
    """The figure of ``paths`` called ``stem`` as HTML (or nothing), and the other paths."""
    chosen = [path for path in paths if path.stem == stem]
    return "".join(_figure(path) for path in chosen), [path for path in paths if path.stem != stem]


def _facts(findings: list, diagnostics: Diagnostics | None, vocab_size: int | None) -> list[str]:
    """The report's first sentence: findings by severity, recorded steps, vocabulary."""
    if diagnostics is None:
        facts = ["No diagnostics recorded"]
    else:
        counts = {severity: sum(f.severity == severity for f in findings) for severity in ("error", "warning", "info")}
        facts = [f"{len(findings)} finding(s): {counts['error']} error(s), {counts['warning']} warning(s), "
                 f"{counts['info']} observation(s)",
                 f"{len(diagnostics.steps())} recorded steps, every {diagnostics.settings.get('every', '?')}"]
    if vocab_size:
        facts.append(f"vocabulary of {vocab_size} symbols (uniform-guess loss {math.log(vocab_size):.3f})")
    return facts


def write_report(run_dir: str | os.PathLike) -> Path:
    """Write ``run_dir/report.html`` (atomically) from what the run directory holds; returns its path.

    Reads ``config.json`` (shown as key/value rows), ``metrics.jsonl`` (loss curves and final losses),
    ``vocab.json`` (its ``"itos"`` list gives the vocabulary size for the initial-loss rule) and
    ``diagnostics/``; any of them may be missing, and the report says what is.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(
            f"run directory {run_dir} does not exist; pass the directory a training run wrote"
        )
    files = read_run_files(run_dir)
    diagnostics = load_diagnostics(run_dir) if has_diagnostics(run_dir) else None
    has_data = diagnostics is not None and not diagnostics.is_empty
    findings = find_issues(diagnostics, files.vocab_size) if has_data else []

    with tempfile.TemporaryDirectory() as scratch:
        paths = plot_all(diagnostics or Diagnostics(), scratch, files.metrics)
        loss_figure, paths = _figure_named(paths, "loss")
        figures = "".join(_figure(path) for path in paths)

    config_html = (
        _table(flatten_config(files.config), ("setting", "value"))
        if files.config is not None
        else f'<p class="note">No {CONFIG} in this run directory.</p>'
    )
    if not has_data:
        figures += (
            '<p class="note">No diagnostics were recorded for this run; train with a Monitor '
            "(<code>normlab train ... --diagnose</code>) to get the per-layer plots.</p>"
        )
    explorer = explorer_html(diagnostics) if has_data else '<p class="note">No histograms were recorded.</p>'
    facts = _facts(findings, diagnostics if has_data else None, files.vocab_size)
    title = html.escape(f"normlab report: {run_dir.resolve().name}")
    page = (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
        f"<style>{_STYLE}{EXPLORER_STYLE}</style></head><body><h1>{title}</h1>"
        f"<p>{html.escape('; '.join(facts))}.</p>"
        f"<h2>Loss</h2>{loss_figure}{_losses_section(files.metrics, diagnostics)}"
        f"<h2>Findings</h2>{_findings_section(findings, has_data)}"
        f"<h2>Histograms over training</h2>{explorer}"
        f"<h2>Plots</h2>{figures or '<p class=note>Nothing to plot.</p>'}"
        f"<h2>Configuration</h2>{config_html}"
        "</body></html>\n"
    )
    path = run_dir / REPORT
    atomic_write_text(path, page)
    return path
