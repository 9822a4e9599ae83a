"""`RUN/metrics.jsonl`: one JSON object a line (periodic losses, then {"event": "final", ...}), read, appended
and cut back to a checkpoint for a resume. (`rundir` holds the rest of the run directory.)"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from normlab.errors import CheckpointError
from normlab.files import append_line, atomic_write
from normlab.runs import records
from normlab.runs.records import refuse_outside_link

METRICS = "metrics.jsonl"


def read_metrics(run_path: str | Path) -> list[dict[str, Any]]:
    """Every row of `RUN/metrics.jsonl` (empty if there is none); `CheckpointError` names a line that is not a
    JSON object, whose step is not a whole number or whose losses are not numbers."""
    path = Path(run_path) / METRICS
    if not path.is_file():
        return []
    refuse_outside_link(path, Path(run_path))
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{path} cannot be read ({error})") from None
    return records.metrics_rows(text, path)


class MetricsFile:
    """The metrics file of a run directory at `path` whose current checkpoint is `checkpoint()` (see `RunDir`)."""

    path: Path

    def checkpoint(self) -> Any:
        raise NotImplementedError

    def append_metrics(self, row: dict[str, Any]) -> None:
        """Append one row to `metrics.jsonl` (never through a symbolic link)."""
        try:
            append_line(self.path / METRICS, json.dumps(row))
        except OSError as error:
            raise CheckpointError(f"cannot append to {self.path / METRICS} ({error.strerror or error}); it must "
                                  "be a plain file, not a link") from None

    def read_metrics(self) -> list[dict[str, Any]]:
        """Every row of `metrics.jsonl` (empty if there is none); unreadable lines raise `CheckpointError`."""
        return read_metrics(self.path)

    def metrics_size(self) -> int:
        """The length of `metrics.jsonl` in bytes (0 if there is none)."""
        path = self.path / METRICS
        return path.stat().st_size if path.is_file() and not path.is_symlink() else 0

    def keep_metrics_until(self, step: int) -> None:
        """Drop metrics rows after `step` (and any final row), so a resumed run does not repeat them; a torn
        last line (a process killed while appending) is dropped too."""
        path = self.path / METRICS
        if not path.is_file():
            return
        text = path.read_bytes().decode("utf-8", errors="replace")
        if not text.endswith("\n"):
            text = text[: text.rfind("\n") + 1]
        rows = records.metrics_rows(text, path)
        kept = [row for row in rows if row.get("step", 0) <= step and row.get("event") != "final"]
        atomic_write(path, "".join(json.dumps(row) + "\n" for row in kept))

    def rewind_metrics(self) -> None:
        """Cut `metrics.jsonl` back to what it held when the current checkpoint was written (before the first
        checkpoint: to nothing), for a resume."""
        current = self.checkpoint()
        step, length = (current.step, current.metrics_bytes) if current is not None else (0, 0)
        path = self.path / METRICS
        size = self.metrics_size()
        if length is None or size < length:
            self.keep_metrics_until(step)
            return
        if size == length:
            return
        with open(path, "rb") as file:
            kept = file.read(length)
        atomic_write(path, kept)
        self.read_metrics()  # `CheckpointError` now, rather than later, if what is kept is damaged
