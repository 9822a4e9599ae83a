"""Diagnostics for any PyTorch model: record, store, plot, judge and report per-layer training statistics.

``Monitor`` records through hooks (and streams to live writers: ``TensorBoardWriter``, ``WandbWriter``, any
callable); ``save_diagnostics`` / ``load_diagnostics`` keep the records in the run directory; ``Diagnostics``
holds them (``to_pandas``, ``to_parquet``, a notebook display); ``plot_all``, ``find_issues``, ``write_report``
and ``export_tensorboard`` turn them into plots, plain-sentence findings, a self-contained HTML report and
TensorBoard events; ``inspect_model`` and ``format_layer_table`` look at a model at initialisation.
matplotlib, TensorBoard, wandb and pandas are imported only when used.
"""

from normlab.diagnostics.collect import StepRecord
from normlab.diagnostics.findings import RULES, Finding, find_issues
from normlab.diagnostics.inspect import format_layer_table, inspect_model
from normlab.diagnostics.monitor import Monitor
from normlab.diagnostics.plots import plot_all
from normlab.diagnostics.report import write_report
from normlab.diagnostics.storage import Diagnostics, Histogram, load_diagnostics, save_diagnostics
from normlab.diagnostics.tensorboard import export_tensorboard
from normlab.diagnostics.writers import CallbackWriter, TensorBoardWriter, WandbWriter, Writer

__all__ = [
    "RULES",
    "CallbackWriter",
    "Diagnostics",
    "Finding",
    "Histogram",
    "Monitor",
    "StepRecord",
    "TensorBoardWriter",
    "WandbWriter",
    "Writer",
    "export_tensorboard",
    "find_issues",
    "format_layer_table",
    "inspect_model",
    "load_diagnostics",
    "plot_all",
    "save_diagnostics",
    "write_report",
]
