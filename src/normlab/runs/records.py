"""The formats of a run directory's small records, and how each is checked: metrics rows, the checkpoint pointer,
and weights against the shapes the config gives. (`rundir` knows which file holds what.)"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from normlab.errors import CheckpointError

POINTER_FORMAT = "normlab-checkpoint-1"
CHECKPOINT_FOLDER = re.compile(r"checkpoint-[0-9]+(\.1)?")  # the folders a pointer may name
NUMBERS = {"train_loss", "val_loss", "lr", "elapsed_s", "train", "val", "test", "val_before", "val_after"}


def whole(value: Any) -> bool:
    """Whether `value` is an int >= 0 (not a bool)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def metrics_rows(text: str, path: Path) -> list[dict[str, Any]]:
    """The rows of a metrics file's text: JSON objects, one a line (blank lines skipped), whose step is a whole
    number and whose losses are numbers; `CheckpointError` naming the first line that is not."""
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, RecursionError):
            raise CheckpointError(f"{path} line {number} is not valid JSON") from None
        if not isinstance(row, dict):
            raise CheckpointError(f"{path} line {number} is not a JSON object")
        if not whole(row.get("step", 0)):
            raise CheckpointError(f"{path} line {number}: step {row['step']!r} is not a whole number")
        for key in NUMBERS.intersection(row):
            if row[key] is not None and (not isinstance(row[key], (int, float)) or isinstance(row[key], bool)):
                raise CheckpointError(f"{path} line {number}: {key!r} is {row[key]!r}, not a number")
        rows.append(row)
    return rows


@dataclass(frozen=True)
class Pointer:
    """What `checkpoint.json` says: the current checkpoint's folder (a name in the run directory), its step, the
    length of the metrics file when it was written, and whether `calibrate` wrote it."""

    folder: str
    step: int
    metrics_bytes: int | None
    calibrated: bool

    def to_json(self) -> str:
        """The text of `checkpoint.json`."""
        return json.dumps({"format": POINTER_FORMAT, "directory": self.folder, "step": self.step,
                           "metrics_bytes": self.metrics_bytes, "calibrated": self.calibrated}, indent=1) + "\n"

    @classmethod
    def from_json(cls, text: str, path: Path) -> Pointer:
        """Inverse of `to_json`; `CheckpointError` for anything else (e.g. a folder outside the run directory)."""
        try:
            raw = json.loads(text)
            pointer = cls(raw["directory"], raw["step"], raw["metrics_bytes"], raw.get("calibrated", False))
            valid = (raw.get("format") == POINTER_FORMAT and isinstance(pointer.folder, str)
                     and CHECKPOINT_FOLDER.fullmatch(pointer.folder) and whole(pointer.step)
                     and (pointer.metrics_bytes is None or whole(pointer.metrics_bytes))
                     and isinstance(pointer.calibrated, bool))
        except (ValueError, KeyError, TypeError, RecursionError):
            valid = False
        if not valid:
            raise CheckpointError(f"{path} is damaged: restore it, or train the run again")
        return pointer


def check_weights(tensors: dict[str, torch.Tensor], expected: dict[str, tuple[tuple[int, ...], torch.dtype]],
                  path: Path, config_path: Path) -> None:
    """`CheckpointError` unless `tensors` has exactly the keys, shapes and dtypes of `expected` (the model the
    config at `config_path` describes), finite values and no negative variance."""
    problems = [f"missing {key}" for key in expected if key not in tensors]
    problems += [f"unexpected {key}" for key in tensors if key not in expected]
    problems += [f"{key} is {tuple(tensors[key].shape)} {tensors[key].dtype}, expected {shape} {dtype}"
                 for key, (shape, dtype) in expected.items()
                 if key in tensors and (tuple(tensors[key].shape), tensors[key].dtype) != (shape, dtype)]
    if problems:
        shown = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
        raise CheckpointError(f"{path} does not match {config_path} ({shown}): the config or the weights were "
                              "changed after training; restore the pair")
    bad = [key for key, value in tensors.items() if value.is_floating_point() and not torch.isfinite(value).all()]
    bad += [key for key, value in tensors.items() if key.endswith("running_var") and (value < 0).any()]
    if bad:
        raise CheckpointError(f"{path} is damaged: {bad[0]} holds NaN, Inf or (for a variance) negative values; "
                              "restore it, or train again")


def refuse_outside_link(path: Path, root: Path) -> None:
    """`CheckpointError` if `path` is a symbolic link to somewhere outside the folder `root`."""
    if path.is_symlink():
        target = path.resolve()
        if not target.is_relative_to(root.resolve()):
            raise CheckpointError(f"{path} is a symbolic link to {target}, outside the run directory: normlab does "
                                  "not follow links out of a run directory; replace it with the file itself")
