"""`normlab report RUN`: the run's `report.html` (written by `normlab.diagnostics`) from files checked first, so
that a damaged `metrics.jsonl` or `diagnostics/` is one clear error rather than a traceback from deep inside."""

from __future__ import annotations

from pathlib import Path

from safetensors import SafetensorError

from normlab.errors import CheckpointError
from normlab.runs.rundir import DIAGNOSTICS, RunDir

# What reading damaged diagnostics raises (bad CSV, JSON or safetensors; missing keys; wrong types or shapes).
DAMAGE = (ValueError, KeyError, TypeError, IndexError, AttributeError, OSError, SafetensorError, RecursionError)


def write_run_report(run: RunDir, *, tensorboard: bool = False) -> Path:
    """Rebuild `RUN/report.html` (and with `tensorboard`, `RUN/tensorboard/`); returns the report's path."""
    from normlab.diagnostics import export_tensorboard, load_diagnostics, write_report

    rows = run.read_metrics()  # CheckpointError naming a damaged line, before anything reads them
    diagnostics = run.path / DIAGNOSTICS
    if tensorboard and not diagnostics.is_dir():
        raise CheckpointError(f"{run.path} has no diagnostics to export: train it with --diagnose")
    try:
        if tensorboard:
            export_tensorboard(load_diagnostics(run.path), run.path / "tensorboard", metrics_rows=rows)
        return write_report(run.path)
    except DAMAGE as error:
        what = f"{diagnostics}/" if diagnostics.exists() else "its files"
        raise CheckpointError(f"cannot build the report of {run.path}: {what} are damaged ({type(error).__name__}: "
                              f"{str(error)[:160]}); train the run again with --diagnose, or delete {DIAGNOSTICS}/ "
                              "for a report without diagnostics") from None
