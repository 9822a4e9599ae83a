"""Live writers: the monitor hands each recording step's statistics to them while training runs.

A writer has ``write(record)``, ``flush()`` and ``close()``; any callable taking a
:class:`~normlab.diagnostics.collect.StepRecord` is one too (:func:`as_writer`), which is the user callback hook::

    Monitor(model, optimizer, writers=[TensorBoardWriter("runs/tb"), print_record])

The monitor calls ``flush`` after each batch of summarised steps (at most ``flush_seconds`` after a recording
step when it has writers) and ``close`` when it closes. :class:`TensorBoardWriter` uses the tags of
:func:`~normlab.diagnostics.tensorboard.export_tensorboard`, so a live run and a later export look alike;
:class:`WandbWriter` logs to Weights & Biases (optional extra ``normlab[wandb]``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from normlab.diagnostics.collect import StepRecord


@runtime_checkable
class Writer(Protocol):
    """Receives the statistics of each recording step."""

    def write(self, record: StepRecord) -> None:
        """Take one step's scalars and histograms."""

    def flush(self) -> None:
        """Make what was written visible (e.g. to a TensorBoard reading the files)."""

    def close(self) -> None:
        """Flush and release any resource."""


class CallbackWriter:
    """A writer that calls ``callback(record)`` for every recording step."""

    def __init__(self, callback: Callable[[StepRecord], Any]) -> None:
        self.callback = callback

    def write(self, record: StepRecord) -> None:
        """Call the callback."""
        self.callback(record)

    def flush(self) -> None:
        """Nothing to flush."""

    def close(self) -> None:
        """Nothing to close."""


def as_writer(writer: Writer | Callable[[StepRecord], Any]) -> Writer:
    """``writer`` itself, or a :class:`CallbackWriter` around a plain callable."""
    if isinstance(writer, Writer):
        return writer
    if callable(writer):
        return CallbackWriter(writer)
    raise TypeError(
        f"a writer must have write/flush/close methods or be a callable taking a StepRecord, got "
        f"{type(writer).__name__}"
    )


class TensorBoardWriter:
    """Streams each recording step to TensorBoard event files in ``logdir`` (optional extra
    ``normlab[tensorboard]``): ``tensorboard --logdir DIR`` shows the curves while training runs."""

    def __init__(self, logdir: str | os.PathLike, *, histograms: bool = True) -> None:
        from normlab.diagnostics.tensorboard import summary_writer

        self.logdir = logdir
        self.histograms = histograms
        self._writer = summary_writer()(log_dir=str(logdir))

    def write(self, record: StepRecord) -> None:
        """Add the step's scalars (finite ones) and histograms."""
        from normlab.diagnostics.tensorboard import add_histogram, scalar_tag

        for layer, metric, value in record.scalars:
            if math.isfinite(value):
                self._writer.add_scalar(scalar_tag(layer, metric), value, record.step)
        if self.histograms:
            for layer, metric, histogram in record.histograms:
                add_histogram(self._writer, layer, metric, histogram, record.step)

    def log_metrics(self, row: dict) -> None:
        """Add one ``metrics.jsonl`` row of the training loop (``step`` with ``train_loss``, ``val_loss``, ``lr``,
        ``elapsed_s``; or the ``"final"`` event) under the tags :func:`export_tensorboard` uses, and flush."""
        from normlab.diagnostics.tensorboard import export_metrics

        export_metrics(self._writer, [row])
        self._writer.flush()

    def flush(self) -> None:
        """Write the pending events to disk."""
        self._writer.flush()

    def close(self) -> None:
        """Flush and close the event file."""
        self._writer.close()


class WandbWriter:
    """Logs each recording step to Weights & Biases (optional extra ``normlab[wandb]``).

    ``run`` is a ``wandb`` run (default: the active one, or a new ``wandb.init(**init)``). Scalars go under
    ``diagnostics/<metric>/<layer>``, histograms under ``diagnostics/hist_<metric>/<layer>``, all against the
    custom step ``diagnostics/step`` (the training step), so they never disturb the run's own ``log`` steps.
    A run this writer started is finished by :meth:`close`.
    """

    PREFIX = "diagnostics/"

    def __init__(self, run: Any = None, *, histograms: bool = True, **init: Any) -> None:
        try:
            import wandb
        except ImportError as error:
            raise ImportError("WandbWriter needs the wandb package: pip install 'normlab[wandb]'") from error
        self._wandb = wandb
        self._owned = run is None and wandb.run is None
        self.run = run if run is not None else (wandb.run or wandb.init(**init))
        self.histograms = histograms
        self.run.define_metric(f"{self.PREFIX}step")
        self.run.define_metric(f"{self.PREFIX}*", step_metric=f"{self.PREFIX}step")

    def write(self, record: StepRecord) -> None:
        """Log the step's finite scalars and, as ``wandb.Histogram``, its histograms."""
        from normlab.diagnostics.tensorboard import histogram_tag, scalar_tag

        row: dict[str, Any] = {f"{self.PREFIX}step": record.step}
        for layer, metric, value in record.scalars:
            if math.isfinite(value):
                row[self.PREFIX + scalar_tag(layer, metric)] = value
        if self.histograms:
            for layer, metric, histogram in record.histograms:
                if histogram.counts.sum():
                    row[self.PREFIX + histogram_tag(layer, metric)] = self._wandb.Histogram(
                        np_histogram=(histogram.counts.tolist(), histogram.edges.tolist())
                    )
        self.run.log(row)

    def flush(self) -> None:
        """wandb sends in the background: nothing to do."""

    def close(self) -> None:
        """Finish the run if this writer started it."""
        if self._owned:
            self.run.finish()
