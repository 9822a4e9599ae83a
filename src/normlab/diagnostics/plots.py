"""The lesson's four diagnostic plots, and :func:`plot_all`, which draws every plot of a run as PNG files."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from normlab.diagnostics import metrics as m
from normlab.diagnostics.figures import distribution_layers, new_figure, save_figure, weight_parameters
from normlab.diagnostics.storage import Diagnostics
from normlab.diagnostics.timeplots import (
    plot_activation_heatmaps,
    plot_gradient_norms,
    plot_loss,
    plot_saturation,
)

UPDATE_TO_DATA_GUIDE = -3.0
"""log10 of the lesson's rule-of-thumb update:data ratio, drawn as a guide."""


def _default_step(diagnostics: Diagnostics, layers: Sequence[str], metric: str) -> int | None:
    steps = sorted({step for layer in layers for step in diagnostics.histogram_steps(layer, metric)})
    return steps[0] if steps else None


def _number(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def _plot_distributions(
    diagnostics: Diagnostics,
    path: str | os.PathLike,
    layers: Sequence[str],
    metric: str,
    step: int | None,
    title: str,
    label: Callable[[str, int], str],
) -> Path | None:
    step = _default_step(diagnostics, layers, metric) if step is None else step
    drawn = (
        [(layer, diagnostics.histogram(layer, metric, step)) for layer in layers] if step is not None else []
    )
    drawn = [(layer, histogram) for layer, histogram in drawn if histogram is not None]
    if not drawn:
        return None
    figure, axes = new_figure()
    for layer, histogram in drawn:
        axes.plot(histogram.centers, histogram.density(), label=label(layer, step))
    axes.legend(fontsize="small")
    axes.set_title(f"{title} (step {step})")
    axes.set_ylabel("density")
    return save_figure(figure, path)


def plot_activation_distributions(
    diagnostics: Diagnostics, path: str | os.PathLike, step: int | None = None
) -> Path | None:
    """Output distribution of each nonlinearity at ``step`` (default: the first recorded), as in the lesson.

    The legend gives each layer's mean, std and saturated (or dead) share. Returns None when nothing to draw.
    """

    def label(layer: str, at: int) -> str:
        info = diagnostics.modules[layer]
        text = (
            f"{layer} ({info.type}): mean {_number(diagnostics.value(layer, m.ACT_MEAN, at), '+.2f')}, "
            f"std {_number(diagnostics.value(layer, m.ACT_STD, at), '.2f')}"
        )
        saturated = diagnostics.value(layer, m.ACT_SATURATED, at)
        dead = diagnostics.value(layer, m.ACT_DEAD, at)
        if saturated is not None:
            text += f", saturated {saturated:.2%}"
        if dead is not None:
            text += f", dead {dead:.2%}"
        return text

    layers = distribution_layers(diagnostics)
    return _plot_distributions(diagnostics, path, layers, m.HIST_ACT, step, "activation distribution", label)


def plot_gradient_distributions(
    diagnostics: Diagnostics, path: str | os.PathLike, step: int | None = None
) -> Path | None:
    """Distribution of the gradient reaching each nonlinearity's output at ``step``, as in the lesson."""

    def label(layer: str, at: int) -> str:
        return (
            f"{layer} ({diagnostics.modules[layer].type}): "
            f"mean {_number(diagnostics.value(layer, m.GRAD_MEAN, at), '+.2e')}, "
            f"std {_number(diagnostics.value(layer, m.GRAD_STD, at), '.2e')}"
        )

    layers = distribution_layers(diagnostics)
    return _plot_distributions(diagnostics, path, layers, m.HIST_GRAD, step, "gradient distribution", label)


def plot_weight_gradient_distributions(
    diagnostics: Diagnostics, path: str | os.PathLike, step: int | None = None
) -> Path | None:
    """Distribution of each weight matrix's gradient at ``step``, with its grad:data ratio (lesson plot 3)."""

    def label(name: str, at: int) -> str:
        shape = tuple(diagnostics.parameters[name].shape)
        return (
            f"{name} {shape}: mean {_number(diagnostics.value(name, m.PARAM_GRAD_MEAN, at), '+.2e')}, "
            f"std {_number(diagnostics.value(name, m.PARAM_GRAD_STD, at), '.2e')}, "
            f"grad:data {_number(diagnostics.value(name, m.GRAD_TO_DATA, at), '.2e')}"
        )

    layers = weight_parameters(diagnostics)
    return _plot_distributions(
        diagnostics, path, layers, m.HIST_PARAM_GRAD, step, "weight gradient distribution", label
    )


def plot_update_to_data(diagnostics: Diagnostics, path: str | os.PathLike) -> Path | None:
    """log10 of each weight matrix's update:data ratio over the steps, with the lesson's guide at -3."""
    names = [
        name for name in weight_parameters(diagnostics) if diagnostics.series(name, m.UPDATE_TO_DATA)[0].size
    ]
    if not names:
        return None
    figure, axes = new_figure()
    for name in names:
        steps, values = diagnostics.series(name, m.UPDATE_TO_DATA)
        with np.errstate(divide="ignore", invalid="ignore"):
            axes.plot(
                steps,
                np.log10(values),
                marker="." if steps.size < 50 else None,
                label=f"{name} {tuple(diagnostics.parameters[name].shape)}",
            )
    axes.axhline(UPDATE_TO_DATA_GUIDE, color="black", linestyle="--", linewidth=1, label="guide: 1e-3")
    axes.set_xlabel("step")
    axes.set_ylabel("log10 update:data")
    axes.set_title("update:data ratio (std of the update / std of the weights)")
    axes.legend(fontsize="small")
    return save_figure(figure, path)


def plot_all(
    diagnostics: Diagnostics, out_dir: str | os.PathLike, metrics_rows: Sequence[dict] | None = None
) -> list[Path]:
    """Draw every plot the data allows into ``out_dir`` as PNGs; returns their paths in reading order.

    The lesson's four (activation, gradient and weight-gradient distributions at the first recorded step and,
    when different, the last; update:data over time), then loss curves (from ``metrics_rows``, the run's
    ``metrics.jsonl`` rows, and the monitor's own losses), gradient norms, saturated/dead shares over time and
    per-layer histogram heat maps.
    """
    out_dir = Path(out_dir)
    steps = sorted({step for values in diagnostics.histograms.values() for step in values})
    snapshots = sorted({steps[0], steps[-1]}) if steps else []
    paths: list[Path | None] = []
    for name, plot in (
        ("activations", plot_activation_distributions),
        ("gradients", plot_gradient_distributions),
        ("weight_gradients", plot_weight_gradient_distributions),
    ):
        paths += [plot(diagnostics, out_dir / f"{name}_step{step}.png", step) for step in snapshots]
    paths.append(plot_update_to_data(diagnostics, out_dir / "update_to_data.png"))
    paths.append(plot_loss(diagnostics, out_dir / "loss.png", metrics_rows))
    paths.append(plot_gradient_norms(diagnostics, out_dir / "gradient_norms.png"))
    paths.append(plot_saturation(diagnostics, out_dir / "saturation.png"))
    paths += plot_activation_heatmaps(diagnostics, out_dir)
    return [path for path in paths if path is not None]
