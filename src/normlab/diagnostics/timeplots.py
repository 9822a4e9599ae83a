"""Plots over training time: loss curves, gradient norms, saturated/dead shares, histogram heat maps."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from normlab.diagnostics import metrics as m
from normlab.diagnostics.figures import new_figure, new_grid, save_figure, weight_parameters
from normlab.diagnostics.findings import DEAD_LIMIT, SATURATION_GUIDE
from normlab.diagnostics.storage import Diagnostics, Histogram

HEATMAP_LAYERS_PER_FIGURE = 6
HEATMAP_ROWS = 64


def _points(rows: Sequence[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    pairs = [
        (row["step"], row[key])
        for row in rows
        if row.get("event") != "final" and isinstance(row.get(key), (int, float)) and "step" in row
    ]
    if not pairs:
        return np.zeros(0), np.zeros(0)
    steps, values = zip(*pairs, strict=True)
    return np.asarray(steps, dtype=float), np.asarray(values, dtype=float)


def _running_mean(values: np.ndarray, window: int) -> np.ndarray:
    kernel = np.ones(window) / window
    return np.convolve(values, kernel, mode="valid")


def plot_loss(
    diagnostics: Diagnostics, path: str | os.PathLike, metrics_rows: Sequence[dict] | None = None
) -> Path | None:
    """Training and validation loss over the steps (log scale when they span more than a factor 10).

    ``metrics_rows`` are the run's ``metrics.jsonl`` rows (``step`` with ``train_loss``/``val_loss``; the row
    with ``"event": "final"`` gives full-split losses, drawn as dotted lines); the monitor's own recorded
    losses are drawn as dots. Returns None when there is no loss at all.
    """
    rows = list(metrics_rows or [])
    train_steps, train = _points(rows, "train_loss")
    val_steps, val = _points(rows, "val_loss")
    monitor_steps, monitor = diagnostics.series(m.GLOBAL, m.LOSS)
    final = next((row for row in reversed(rows) if row.get("event") == "final"), {})
    finals = {
        split: final[split]
        for split in ("train", "val", "test")
        if isinstance(final.get(split), (int, float))
    }
    if not (train.size or val.size or monitor.size or finals):
        return None
    figure, axes = new_figure(14, 4.5)
    if train.size:
        axes.plot(train_steps, train, color="tab:blue", alpha=0.3 if train.size > 200 else 1.0, label="train")
        if train.size > 200:
            window = max(train.size // 100, 2)
            axes.plot(
                train_steps[window - 1 :],
                _running_mean(train, window),
                color="tab:blue",
                label=f"train (mean of {window})",
            )
    if val.size:
        axes.plot(val_steps, val, color="tab:orange", marker="o" if val.size < 50 else None, label="val")
    if monitor.size:
        axes.plot(monitor_steps, monitor, ".", color="tab:green", label="loss at recorded steps")
    for (split, value), color in zip(finals.items(), ("tab:blue", "tab:orange", "tab:red"), strict=False):
        axes.axhline(value, color=color, linestyle=":", label=f"final {split}: {value:.4f}")
    values = np.concatenate([train, val, monitor, np.asarray(list(finals.values()), dtype=float)])
    values = values[np.isfinite(values)]
    if values.size and values.min() > 0 and values.max() > 10 * values.min():
        from matplotlib.ticker import FuncFormatter

        axes.set_yscale("log")  # an initial loss far above the rest (the lesson's 27 vs 2) stays readable
        plain = FuncFormatter(lambda value, _: f"{value:g}")
        axes.yaxis.set_major_formatter(plain)
        axes.yaxis.set_minor_formatter(plain)
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.set_title("loss")
    axes.legend(fontsize="small")
    return save_figure(figure, path)


def plot_gradient_norms(diagnostics: Diagnostics, path: str | os.PathLike) -> Path | None:
    """L2 norm of each weight matrix's gradient, and of all recorded parameters' gradients, over the steps."""
    names = weight_parameters(diagnostics)
    total_steps, total = diagnostics.series(m.GLOBAL, m.GRAD_NORM)
    if not names and not total.size:
        return None
    figure, axes = new_figure()
    for name in names:
        steps, values = diagnostics.series(name, m.PARAM_GRAD_NORM)
        axes.plot(steps, values, label=f"{name} {tuple(diagnostics.parameters[name].shape)}")
    if total.size:
        axes.plot(total_steps, total, color="black", linewidth=2, label="all recorded parameters")
    axes.set_yscale("log")
    axes.set_xlabel("step")
    axes.set_ylabel("gradient L2 norm")
    axes.set_title("gradient norm per layer")
    axes.legend(fontsize="small")
    return save_figure(figure, path)


def plot_saturation(diagnostics: Diagnostics, path: str | os.PathLike) -> Path | None:
    """Saturated share (tanh/sigmoid-like layers) and dead share (ReLU-like layers) over the steps."""
    saturated = diagnostics.layers(m.ACT_SATURATED)
    dead = diagnostics.layers(m.ACT_DEAD)
    if not saturated and not dead:
        return None
    figure, axes = new_figure()
    for layer in saturated:
        steps, values = diagnostics.series(layer, m.ACT_SATURATED)
        axes.plot(steps, 100 * values, label=f"{layer} ({diagnostics.modules[layer].type}) saturated")
    for layer in dead:
        steps, values = diagnostics.series(layer, m.ACT_DEAD)
        axes.plot(
            steps, 100 * values, linestyle="--", label=f"{layer} ({diagnostics.modules[layer].type}) dead"
        )
    if saturated:
        axes.axhline(
            100 * SATURATION_GUIDE, color="grey", linestyle=":", label=f"{SATURATION_GUIDE:.0%} guide"
        )
    if dead:
        axes.axhline(100 * DEAD_LIMIT, color="grey", linestyle="-.", label=f"{DEAD_LIMIT:.0%} limit")
    axes.set_xlabel("step")
    axes.set_ylabel("% of outputs / units")
    axes.set_title("saturated and dead share over time")
    axes.legend(fontsize="small")
    return save_figure(figure, path)


def rebin(histogram: Histogram, edges: np.ndarray) -> np.ndarray:
    """Share of ``histogram``'s values falling between consecutive ``edges``.

    Values are taken as spread uniformly within each original bin (the cumulative count is interpolated
    linearly), so histograms with different ranges can share one grid.
    """
    total = histogram.counts.sum()
    if total == 0:
        return np.zeros(len(edges) - 1)
    cumulative = np.concatenate([[0.0], np.cumsum(histogram.counts)]) / total
    return np.diff(np.interp(edges, histogram.edges, cumulative, left=0.0, right=1.0))


def _step_edges(steps: np.ndarray) -> np.ndarray:
    if steps.size == 1:
        return np.array([steps[0] - 0.5, steps[0] + 0.5])
    middle = (steps[:-1] + steps[1:]) / 2
    return np.concatenate([[2 * steps[0] - middle[0]], middle, [2 * steps[-1] - middle[-1]]])


def plot_activation_heatmaps(diagnostics: Diagnostics, out_dir: str | os.PathLike) -> list[Path]:
    """For every recorded module, its output histogram over time as a heat map (step × value).

    Each column is one recorded step, normalised to the share of values per row; colour on a square-root
    scale so the tails stay visible. Up to :data:`HEATMAP_LAYERS_PER_FIGURE` layers per PNG,
    ``activation_heatmaps_<k>.png``.
    """
    from matplotlib.colors import PowerNorm

    layers = [
        layer for layer in diagnostics.layers(m.HIST_ACT) if diagnostics.histogram_steps(layer, m.HIST_ACT)
    ]
    paths = []
    for first in range(0, len(layers), HEATMAP_LAYERS_PER_FIGURE):
        chunk = layers[first : first + HEATMAP_LAYERS_PER_FIGURE]
        columns = min(3, len(chunk))
        rows = math.ceil(len(chunk) / columns)
        width, height = 5 * columns, 3.2 * rows
        figure, grid = new_grid(rows, columns, width, height, layout=None)  # fixed margins: a third of the cost
        figure.subplots_adjust(left=0.8 / width, right=1 - 0.3 / width, bottom=0.5 / height, top=1 - 0.35 / height,
                               wspace=0.3, hspace=0.45)
        for index, axes in enumerate(ax for row in grid for ax in row):
            if index >= len(chunk):
                axes.set_visible(False)
                continue
            layer = chunk[index]
            steps = np.asarray(diagnostics.histogram_steps(layer, m.HIST_ACT), dtype=float)
            histograms = [diagnostics.histogram(layer, m.HIST_ACT, int(step)) for step in steps]
            value_edges = np.linspace(
                min(h.lo for h in histograms), max(h.hi for h in histograms), HEATMAP_ROWS + 1
            )
            shares = np.stack([rebin(h, value_edges) for h in histograms], axis=1)  # (rows, steps)
            mesh = axes.pcolormesh(
                _step_edges(steps),
                value_edges,
                shares,
                cmap="magma",
                norm=PowerNorm(0.5, vmin=0, vmax=max(shares.max(), 1e-12)),
            )
            info = diagnostics.modules.get(layer)
            axes.set_title(f"{layer} ({info.type})" if info else layer, fontsize="small")
            axes.set_xlabel("step", fontsize="small")
            axes.set_ylabel("output value", fontsize="small")
            figure.colorbar(mesh, ax=axes, label="share of values")
        number = first // HEATMAP_LAYERS_PER_FIGURE + 1
        paths.append(save_figure(figure, Path(out_dir) / f"activation_heatmaps_{number}.png"))
    return paths
