"""Export recorded diagnostics to TensorBoard event files (optional extra: ``normlab[tensorboard]``).

Scalars go under ``<metric>/<layer>`` (global ones under their own name), histograms under
``hist_<metric>/<layer>``, and the run's ``metrics.jsonl`` rows under ``metrics/<key>`` and ``final/<split>``,
so ``tensorboard --logdir RUN`` shows them grouped by metric. To watch a run while it trains, give the monitor a
:class:`~normlab.diagnostics.writers.TensorBoardWriter`, which writes the same tags.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from normlab.diagnostics.storage import Diagnostics, Histogram

TENSORBOARD_DIR = "tensorboard"
_METRIC_KEYS = ("train_loss", "val_loss", "lr", "elapsed_s")


def summary_writer() -> type:
    """torch's ``SummaryWriter`` class, or an ImportError naming the extra to install."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as error:  # torch raises this when the tensorboard package is absent
        raise ImportError(
            "TensorBoard export needs the tensorboard package: pip install 'normlab[tensorboard]'"
        ) from error
    return SummaryWriter


def scalar_tag(layer: str, metric: str) -> str:
    """The TensorBoard tag of a scalar series."""
    return f"{metric}/{layer}" if layer else metric


def histogram_tag(layer: str, metric: str) -> str:
    """The TensorBoard tag of a histogram series."""
    return f"hist_{metric}/{layer}"


def export_tensorboard(
    diagnostics: Diagnostics, logdir: str | os.PathLike, metrics_rows: Sequence[dict] | None = None
) -> Path:
    """Write ``diagnostics`` (and the run's ``metrics_rows``, if given) as TensorBoard events in ``logdir``.

    Histograms are written from the stored bin counts (``add_histogram_raw``; bucket limits are the right
    edges of the bins); their sum and sum of squares are estimated from the bin centres. Non-finite scalars
    are skipped. Returns ``logdir``.
    """
    writer_class = summary_writer()
    logdir = Path(logdir)
    with writer_class(log_dir=str(logdir)) as writer:
        for (layer, metric), values in sorted(diagnostics.scalars.items()):
            for step, value in sorted(values.items()):
                if math.isfinite(value):
                    writer.add_scalar(scalar_tag(layer, metric), value, step)
        for (layer, metric), histograms in sorted(diagnostics.histograms.items()):
            for step, histogram in sorted(histograms.items()):
                add_histogram(writer, layer, metric, histogram, step)
        export_metrics(writer, metrics_rows or [])
    return logdir


def add_histogram(writer: Any, layer: str, metric: str, histogram: Histogram, step: int) -> None:
    """Add one stored histogram to a ``SummaryWriter`` from its bin counts (nothing for an empty one).

    Bucket limits are the right edges of the bins; the sum and sum of squares are estimated from the bin
    centres.
    """
    total = int(histogram.counts.sum())
    if total == 0:
        return
    centers = histogram.centers
    writer.add_histogram_raw(
        histogram_tag(layer, metric),
        min=histogram.lo,
        max=histogram.hi,
        num=total,
        sum=float(np.dot(histogram.counts, centers)),
        sum_squares=float(np.dot(histogram.counts, centers**2)),
        bucket_limits=histogram.edges[1:].tolist(),
        bucket_counts=histogram.counts.tolist(),
        global_step=step,
    )


def export_metrics(writer: object, rows: Sequence[dict]) -> None:
    """Add ``metrics.jsonl`` rows to a ``SummaryWriter``: ``metrics/<key>`` per step, ``final/<split>``."""
    last_step = 0
    for row in rows:
        step = row.get("step")
        if row.get("event") == "final":
            final_step = int(step) if isinstance(step, (int, float)) else last_step
            for split in ("train", "val", "test"):
                if isinstance(row.get(split), (int, float)):
                    writer.add_scalar(f"final/{split}", row[split], final_step)
            continue
        if not isinstance(step, (int, float)):
            continue
        last_step = int(step)
        for key in _METRIC_KEYS:
            value = row.get(key)
            if isinstance(value, (int, float)) and math.isfinite(value):
                writer.add_scalar(f"metrics/{key}", value, last_step)
