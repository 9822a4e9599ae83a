"""File formats of ``RUN/diagnostics/``: tidy CSV for scalars, safetensors for histograms, atomic writes."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save

from normlab.files import atomic_write

SCALARS_FILE = "scalars.csv"
HISTOGRAMS_FILE = "histograms.safetensors"
SCALAR_COLUMNS = ["step", "layer", "metric", "value"]


def atomic_write_text(path: Path, text: str) -> None:
    """Write UTF-8 ``text`` to ``path`` atomically (a temporary file, then ``os.replace``)."""
    atomic_write(path, text)


def write_scalars(directory: Path, rows: list[tuple[int, str, str, float]]) -> None:
    """Write tidy ``(step, layer, metric, value)`` rows to ``directory/scalars.csv``."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(SCALAR_COLUMNS)
    writer.writerows((step, layer, metric, repr(float(value))) for step, layer, metric, value in rows)
    atomic_write_text(directory / SCALARS_FILE, buffer.getvalue())


def read_scalars(directory: Path) -> Iterator[tuple[int, str, str, float]]:
    """Yield the rows of ``directory/scalars.csv`` (nothing when the file is absent)."""
    path = directory / SCALARS_FILE
    if not path.is_file():
        return
    with path.open(newline="", encoding="utf-8") as file:
        reader = csv.reader(file)
        header = next(reader, None)
        if header != SCALAR_COLUMNS:
            raise ValueError(f"{path} must start with the header {','.join(SCALAR_COLUMNS)}, got {header}")
        for line, row in enumerate(reader, start=2):
            if len(row) != 4:
                raise ValueError(
                    f"{path} line {line}: expected 4 columns (step,layer,metric,value), got {row}"
                )
            yield int(row[0]), row[1], row[2], float(row[3])


def write_histograms(directory: Path, histograms: Mapping[tuple[str, str], Mapping[int, object]]) -> None:
    """Write every histogram (with ``counts``, ``lo``, ``hi``) to ``directory/histograms.safetensors``.

    Nothing is written when there are no histograms.
    """
    series = sorted(histograms)
    entries = [
        (step, index, histogram)
        for index, key in enumerate(series)
        for step, histogram in sorted(histograms[key].items())
    ]
    if not entries:
        return
    tensors = {
        "step": np.array([step for step, _, _ in entries], dtype=np.int64),
        "series": np.array([index for _, index, _ in entries], dtype=np.int64),
        "range": np.array([[h.lo, h.hi] for _, _, h in entries], dtype=np.float64),
        "counts": np.stack([np.asarray(h.counts) for _, _, h in entries]).astype(np.int32),
    }
    metadata = {"series": json.dumps([list(key) for key in series])}
    atomic_write(directory / HISTOGRAMS_FILE, save(tensors, metadata=metadata))


def read_histograms(directory: Path) -> Iterator[tuple[int, str, str, np.ndarray, float, float]]:
    """Yield ``(step, layer, metric, counts, lo, hi)`` from ``directory/histograms.safetensors``, if any."""
    path = directory / HISTOGRAMS_FILE
    if not path.is_file():
        return
    with safe_open(str(path), framework="np") as file:
        series = json.loads(file.metadata()["series"])
        tensors = {name: file.get_tensor(name) for name in ("step", "series", "range", "counts")}
    for step, index, (lo, hi), counts in zip(
        tensors["step"], tensors["series"], tensors["range"], tensors["counts"], strict=True
    ):
        layer, metric = series[int(index)]
        yield int(step), layer, metric, counts.astype(np.int64), float(lo), float(hi)
