"""Shared figure helpers: a matplotlib Figure on the Agg canvas, PNG saving, which layers to draw.

matplotlib is used through its object-oriented API (no pyplot, no display, no global backend change) and is
imported only when a figure is made, so that importing the diagnostics stays cheap.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from normlab.diagnostics import metrics as m
from normlab.diagnostics.layers import ACTIVATION
from normlab.diagnostics.storage import Diagnostics

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure


MARGINS = (0.85, 0.25, 0.6, 0.45)  # inches left, right, bottom, top of a one-Axes figure: ticks, labels, title


def new_figure(width: float = 14.0, height: float = 4.0) -> tuple[Figure, Axes]:
    """A matplotlib Figure with one Axes, on the Agg canvas (no pyplot state), with fixed margins: laying out
    the report's one-Axes figures by constraint cost a third of drawing them."""
    figure, axes = new_grid(1, 1, width, height, layout=None)
    left, right, bottom, top = MARGINS
    figure.subplots_adjust(left=left / width, right=1 - right / width, bottom=bottom / height, top=1 - top / height)
    return figure, axes[0][0]


def new_grid(
    rows: int, columns: int, width: float, height: float, layout: str | None = "constrained"
) -> tuple[Figure, list[list[Axes]]]:
    """A matplotlib Figure with a ``rows`` x ``columns`` grid of Axes, on the Agg canvas."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100, layout=layout)
    FigureCanvasAgg(figure)
    return figure, figure.subplots(rows, columns, squeeze=False).tolist()


def save_figure(figure: Figure, path: str | os.PathLike) -> Path:
    """Write ``figure`` as a PNG to ``path`` (parents created) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png")
    return path


def distribution_layers(diagnostics: Diagnostics) -> list[str]:
    """The layers whose output distributions the lesson plots: its nonlinearities.

    Without any recorded activation module (e.g. a transformer using ``F.relu``), every recorded module
    but the last one, whose output (the logits) would dwarf the rest.
    """
    layers = [layer for layer in diagnostics.layers(m.HIST_ACT) if layer in diagnostics.modules]
    activations = [layer for layer in layers if diagnostics.modules[layer].family == ACTIVATION]
    return activations or layers[:-1] or layers


def weight_parameters(diagnostics: Diagnostics) -> list[str]:
    """Recorded parameters with two or more dimensions (weight matrices), as the lesson plots them."""
    return [
        name
        for name in diagnostics.layers(m.HIST_PARAM_GRAD)
        if name in diagnostics.parameters and len(diagnostics.parameters[name].shape) >= 2
    ]
