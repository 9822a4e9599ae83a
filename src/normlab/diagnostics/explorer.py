"""The report's histogram explorer: every recorded histogram, browsable step by step with a slider.

The histograms travel inside the page as JSON (``<script type="application/json">``) and a few lines of
embedded JavaScript draw the selected step as small SVG charts, one per layer: no network, no other file.
Runs with more than :data:`MAX_STEPS` histogram steps are thinned evenly (the first and last kept).
"""

from __future__ import annotations

import json

import numpy as np

from normlab.diagnostics import metrics as m
from normlab.diagnostics.storage import Diagnostics

MAX_STEPS = 200
KINDS = {
    m.HIST_ACT: ("module outputs", m.ACT_MEAN, m.ACT_STD),
    m.HIST_GRAD: ("gradients reaching the outputs", m.GRAD_MEAN, m.GRAD_STD),
    m.HIST_PARAM: ("parameters", m.PARAM_MEAN, m.PARAM_STD),
    m.HIST_PARAM_GRAD: ("parameter gradients", m.PARAM_GRAD_MEAN, m.PARAM_GRAD_STD),
}

_SCRIPT = """
(() => {
  const data = JSON.parse(document.getElementById("histogram-data").textContent);
  const slider = document.getElementById("explorer-slider"), kind = document.getElementById("explorer-kind");
  const label = document.getElementById("explorer-step"), grid = document.getElementById("explorer-grid");
  const fmt = (x) => (x === null ? "n/a"
    : Math.abs(x) >= 1e-2 && Math.abs(x) < 1e3 ? x.toFixed(3) : x.toExponential(2));
  const esc = (text) => text.replace(/[&<>"]/g, (c) => `&#${c.charCodeAt(0)};`);
  function chart(series, index) {
    const h = series.histograms[index];
    if (!h) return `<div class="chart"><b>${esc(series.label)}</b><br><i>not recorded at this step</i></div>`;
    const [lo, hi, counts] = h, top = Math.max(...counts, 1), n = counts.length;
    const points = counts.map((c, i) => `${(i + 0.5) * 300 / n},${100 - 95 * c / top}`).join(" ");
    const stats = series.stats[index] || [null, null];
    return `<div class="chart"><b>${esc(series.label)}</b><br>mean ${fmt(stats[0])}, std ${fmt(stats[1])}` +
      `<svg viewBox="0 0 300 100" width="300" height="100"><polyline fill="none" stroke="#1f77b4" ` +
      `stroke-width="1.5" points="${points}"/></svg><br><small>${fmt(lo)} … ${fmt(hi)}</small></div>`;
  }
  function draw() {
    const index = Number(slider.value);
    label.textContent = `step ${data.steps[index]}`;
    grid.innerHTML = data.series.filter((s) => s.kind === kind.value).map((s) => chart(s, index)).join("");
  }
  slider.addEventListener("input", draw);
  kind.addEventListener("change", draw);
  draw();
})();
"""

STYLE = """
#explorer-grid { display: flex; flex-wrap: wrap; gap: .6em; }
.chart { border: 1px solid #ddd; padding: .3em; font-size: .85em; }
.chart svg { display: block; background: #fafafa; }
#explorer-slider { width: 60%; }
"""


def explorer_steps(diagnostics: Diagnostics) -> list[int]:
    """The histogram steps the explorer shows: all of them, or :data:`MAX_STEPS` spread evenly."""
    steps = diagnostics.histogram_steps_all()
    if len(steps) <= MAX_STEPS:
        return steps
    picks = np.unique(np.linspace(0, len(steps) - 1, MAX_STEPS).round().astype(int))
    return [steps[i] for i in picks]


def explorer_data(diagnostics: Diagnostics) -> dict:
    """What the explorer draws: the steps, and per ``(layer, kind)`` series its histograms and mean/std there."""
    steps = explorer_steps(diagnostics)
    series = []
    for kind, (_, mean_metric, std_metric) in KINDS.items():
        for layer in diagnostics.layers(kind):
            by_step = diagnostics.histograms.get((layer, kind), {})
            if not by_step:
                continue
            label = _label(diagnostics, layer)
            histograms = [
                [by_step[s].lo, by_step[s].hi, np.asarray(by_step[s].counts).tolist()] if s in by_step else None
                for s in steps
            ]
            stats = [
                [_number(diagnostics.value(layer, mean_metric, s)), _number(diagnostics.value(layer, std_metric, s))]
                for s in steps
            ]
            series.append({"layer": layer, "kind": kind, "label": label, "histograms": histograms, "stats": stats})
    return {"steps": steps, "series": series}


def _label(diagnostics: Diagnostics, layer: str) -> str:
    if layer in diagnostics.modules:
        return f"{layer} ({diagnostics.modules[layer].type})"
    if layer in diagnostics.parameters:
        return f"{layer} {tuple(diagnostics.parameters[layer].shape)}"
    return layer


def _number(value: float | None) -> float | None:
    return None if value is None or not np.isfinite(value) else float(value)


def explorer_html(diagnostics: Diagnostics) -> str:
    """The explorer's HTML: a kind selector, the step slider, the charts, the data and the script."""
    data = explorer_data(diagnostics)
    if not data["steps"] or not data["series"]:
        return '<p class="note">No histograms were recorded.</p>'
    present = [kind for kind in KINDS if any(s["kind"] == kind for s in data["series"])]
    options = "".join(f'<option value="{kind}">{KINDS[kind][0]}</option>' for kind in present)
    payload = json.dumps(data, separators=(",", ":"), allow_nan=False).replace("</", "<\\/")
    last = len(data["steps"]) - 1
    return (
        f'<p>Histograms at {len(data["steps"])} recorded steps; drag the slider to browse them. '
        f'<select id="explorer-kind">{options}</select></p>'
        f'<p><input type="range" id="explorer-slider" min="0" max="{last}" value="0" step="1"> '
        f'<b id="explorer-step"></b></p><div id="explorer-grid"></div>'
        f'<script type="application/json" id="histogram-data">{payload}</script><script>{_SCRIPT}</script>'
    )
