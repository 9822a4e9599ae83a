"""A sweep's summary: `OUT/summary.csv` (one row per run) and `OUT/summary.json` (the runs, and the
configurations they form over seeds, with the mean and standard deviation of their final losses).

    summary.json  {"format": "normlab-sweep-1", "preset": ..., "varied": {key: [values]},
                   "runs": [{"name", "values": {key: value}, "train", "val", "test", "diverged_at"}],
                   "configurations": [{"label", "values", "runs": [names], "val_mean", "val_std", ...}]}

Runs that differ only in their seed (`--vary seed=...`) form one configuration; its val_std is the sample
standard deviation over the seeds that did not diverge (null for fewer than two). Non-finite losses are null.
A folder with `summary.json` and no `config.json` is a sweep directory: `normlab report` writes its page.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from normlab.errors import CheckpointError
from normlab.files import atomic_write

SUMMARY_JSON, SUMMARY_CSV, SWEEP_FORMAT = "summary.json", "summary.csv", "normlab-sweep-1"
SEED_KEYS = ("seed", "train.seed")
SPLITS = ("train", "val", "test")
RUN_NAME = re.compile(r"(?!\.\.?$)[A-Za-z0-9_.+-]+")  # a folder of the sweep (as `grid` names them)


@dataclass
class SweepRow:
    """One run of a sweep: its name (= its folder), the values it was given, its final losses."""

    name: str
    values: dict[str, str]
    final: dict[str, float]
    diverged_at: int | None


def _finite(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def configurations(rows: Sequence[SweepRow]) -> list[dict[str, Any]]:
    """The runs grouped by their values other than the seed, in first-seen order, with loss statistics."""
    groups: dict[tuple, list[SweepRow]] = {}
    for row in rows:
        key = tuple((k, v) for k, v in row.values.items() if k not in SEED_KEYS)
        groups.setdefault(key, []).append(row)
    result = []
    for key, members in groups.items():
        entry: dict[str, Any] = {"label": " ".join(f"{k.split('.')[-1]}={v}" for k, v in key) or "all runs",
                                 "values": dict(key), "runs": [m.name for m in members],
                                 "diverged": sum(m.diverged_at is not None for m in members)}
        for split in SPLITS:
            losses = [x for m in members if m.diverged_at is None and (x := _finite(m.final.get(split))) is not None]
            entry[f"{split}_mean"] = statistics.fmean(losses) if losses else None
            entry[f"{split}_std"] = statistics.stdev(losses) if len(losses) > 1 else None
            entry[f"{split}_count"] = len(losses)
        result.append(entry)
    return result


def write_summary(out: Path, preset: str, varied: dict[str, list[str]], rows: Sequence[SweepRow]) -> None:
    """Write `out/summary.json` and `out/summary.csv`."""
    summary = {"format": SWEEP_FORMAT, "preset": preset, "varied": varied,
               "runs": [{"name": row.name, "values": row.values, "diverged_at": row.diverged_at,
                         **{split: _finite(row.final.get(split)) for split in SPLITS}} for row in rows],
               "configurations": configurations(rows)}
    atomic_write(out / SUMMARY_JSON, json.dumps(summary, indent=1, allow_nan=False) + "\n")
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["run", *varied, *SPLITS, "diverged_at"])
    for row in rows:
        losses = [_finite(row.final.get(split)) for split in SPLITS]
        writer.writerow([row.name, *(row.values[key] for key in varied),
                         *("" if x is None else repr(x) for x in losses),
                         "" if row.diverged_at is None else row.diverged_at])
    atomic_write(out / SUMMARY_CSV, buffer.getvalue())


def is_sweep_directory(path: str | Path) -> bool:
    """Whether `path` is the folder of a `normlab sweep` (a summary, and no run of its own)."""
    path = Path(path)
    return (path / SUMMARY_JSON).is_file() and not (path / "config.json").exists()


def read_summary(folder: str | Path) -> tuple[str, dict[str, list[str]], list[SweepRow]]:
    """The preset, the varied values and the runs of a sweep's `summary.json`; `CheckpointError` if damaged."""
    path = Path(folder) / SUMMARY_JSON
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        rows = [SweepRow(str(run["name"]), {str(k): str(v) for k, v in run["values"].items()},
                         {split: math.nan if run[split] is None else float(run[split]) for split in SPLITS},
                         None if run["diverged_at"] is None else int(run["diverged_at"])) for run in raw["runs"]]
        varied = {str(key): [str(v) for v in values] for key, values in raw["varied"].items()}
        preset = str(raw.get("preset", ""))
        valid = raw.get("format") == SWEEP_FORMAT and all(RUN_NAME.fullmatch(row.name) for row in rows)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError):
        valid = False
    if not valid:
        raise CheckpointError(f"{path} is damaged: run the sweep again")
    return preset, varied, rows
