"""The recorded diagnostics of a run: in memory (:class:`Diagnostics`) and on disk (``RUN/diagnostics/``).

On disk, three files, all written atomically (temporary file, then ``os.replace``) and none pickled:

- ``scalars.csv``: tidy rows ``step,layer,metric,value`` (values written with ``repr``, so they round-trip
  exactly; ``nan``/``inf`` allowed). Global metrics (loss, learning rate, total gradient norm) have an empty
  layer.
- ``histograms.safetensors``: ``step`` (N,), ``series`` (N,) indexing the ``(layer, metric)`` list kept in the
  file's metadata, ``range`` (N, 2) with each histogram's ``(lo, hi)``, ``counts`` (N, bins) int32.
- ``layers.json``: the monitor's settings and what each recorded module and parameter is.

Out of Python: :meth:`Diagnostics.to_pandas` (long format: step, layer, metric, value),
:meth:`Diagnostics.to_parquet` (optional extra ``normlab[pandas]``), and in a notebook the diagnostics display
themselves (findings and the main plots).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from normlab.diagnostics.metrics import HISTOGRAM_METRICS
from normlab.diagnostics.storage_io import (
    SCALAR_COLUMNS,
    atomic_write_text,
    read_histograms,
    read_scalars,
    write_histograms,
    write_scalars,
)

if TYPE_CHECKING:
    from normlab.diagnostics.collect import StepRecord

DIAGNOSTICS_DIR = "diagnostics"
LAYERS_FILE = "layers.json"
FORMAT_VERSION = 2
READABLE_FORMATS = (1, 2)  # format 1 lacks the modules' gate and unit axis
HISTOGRAM_COLUMNS = ("step", "layer", "metric", "bin", "lo", "hi", "count")


@dataclass(frozen=True)
class Histogram:
    """Counts of values in ``len(counts)`` equal-width bins over ``[lo, hi]``."""

    counts: np.ndarray
    lo: float
    hi: float

    @property
    def edges(self) -> np.ndarray:
        """Bin edges, shape ``(bins + 1,)``."""
        return np.linspace(self.lo, self.hi, len(self.counts) + 1)

    @property
    def centers(self) -> np.ndarray:
        """Bin centres, shape ``(bins,)``."""
        edges = self.edges
        return (edges[:-1] + edges[1:]) / 2

    def density(self) -> np.ndarray:
        """Counts normalised so the histogram integrates to 1 (all zeros for an empty histogram)."""
        total = self.counts.sum()
        width = (self.hi - self.lo) / len(self.counts)
        return self.counts / (total * width) if total > 0 else np.zeros(len(self.counts))


@dataclass(frozen=True)
class ModuleInfo:
    """A recorded module: qualified name (``name#k`` for its k-th extra call in a step), class name, kind.

    ``order`` is the position of its first call in the forward pass (None if it never ran while recording);
    ``gate`` is ``"hard"`` (ReLU: dead units) or ``"soft"`` (GELU, SiLU...: never-positive units) for ReLU-like
    activations; ``unit_axis`` the axis of its output that indexes units (None: taken from its input).
    """

    name: str
    type: str
    family: str
    bound: str | None = None
    relu_like: bool = False
    order: int | None = None
    gate: str | None = None
    unit_axis: int | None = -1


@dataclass(frozen=True)
class ParameterInfo:
    """A recorded parameter: qualified name, owning module and its class, shape, position in the model."""

    name: str
    module: str
    module_type: str
    shape: tuple[int, ...]
    order: int


@dataclass
class Diagnostics:
    """Everything a monitor recorded: scalar series and histograms per layer, plus what each layer is.

    Scalars are keyed by ``(layer, metric)`` and step; histograms likewise. Use :meth:`series`,
    :meth:`histogram` and :meth:`rows` to read them; :func:`save_diagnostics` and :func:`load_diagnostics` to
    store them.
    """

    settings: dict = field(default_factory=dict)
    modules: dict[str, ModuleInfo] = field(default_factory=dict)
    parameters: dict[str, ParameterInfo] = field(default_factory=dict)
    scalars: dict[tuple[str, str], dict[int, float]] = field(default_factory=dict)
    histograms: dict[tuple[str, str], dict[int, Histogram]] = field(default_factory=dict)

    @property
    def is_empty(self) -> bool:
        """True when nothing was recorded."""
        return not self.scalars and not self.histograms

    def add_scalar(self, step: int, layer: str, metric: str, value: float) -> None:
        """Record one value (replacing any earlier value of the same step, layer and metric)."""
        self.scalars.setdefault((layer, metric), {})[int(step)] = float(value)

    def add_scalars(self, step: int, values: Iterable[tuple[str, str, float]]) -> None:
        """Record several ``(layer, metric, value)`` of one step, as :meth:`add_scalar` does each."""
        step, scalars = int(step), self.scalars
        for layer, metric, value in values:
            scalars.setdefault((layer, metric), {})[step] = float(value)

    def add_record(self, record: StepRecord) -> None:
        """Record every scalar and histogram of one recording step."""
        self.add_scalars(record.step, record.scalars)
        for layer, metric, histogram in record.histograms:
            self.add_histogram(record.step, layer, metric, histogram)

    def add_histogram(self, step: int, layer: str, metric: str, histogram: Histogram) -> None:
        """Record one histogram (replacing any earlier one of the same step, layer and metric)."""
        if metric not in HISTOGRAM_METRICS:
            raise ValueError(f"histogram metric must be one of {sorted(HISTOGRAM_METRICS)}, got {metric!r}")
        self.histograms.setdefault((layer, metric), {})[int(step)] = histogram

    def steps(self) -> list[int]:
        """Every recorded step, ascending."""
        found = {step for values in self.scalars.values() for step in values}
        found.update(step for values in self.histograms.values() for step in values)
        return sorted(found)

    def rows(self) -> list[tuple[int, str, str, float]]:
        """All scalars as tidy ``(step, layer, metric, value)`` rows, sorted by step, then layer order."""
        rows = [
            (step, layer, metric, value)
            for (layer, metric), values in self.scalars.items()
            for step, value in values.items()
        ]
        return sorted(rows, key=lambda row: (row[0], self.layer_rank(row[1]), row[2]))

    def layer_rank(self, layer: str) -> tuple[int, int, str]:
        """Sort key putting global metrics first, then modules in forward order, then parameters."""
        if layer == "":
            return (0, 0, layer)
        if layer in self.modules:
            order = self.modules[layer].order
            return (1, order if order is not None else 1 << 30, layer)
        if layer in self.parameters:
            return (2, self.parameters[layer].order, layer)
        return (3, 0, layer)

    def layers(self, metric: str) -> list[str]:
        """Layers that have a scalar (or, failing that, a histogram) ``metric``, in model order."""
        names = {layer for layer, name in self.scalars if name == metric}
        names.update(layer for layer, name in self.histograms if name == metric)
        return sorted(names, key=self.layer_rank)

    def series(self, layer: str, metric: str) -> tuple[np.ndarray, np.ndarray]:
        """``(steps, values)`` of one scalar metric of one layer, by step; empty arrays when absent."""
        values = self.scalars.get((layer, metric), {})
        steps = np.array(sorted(values), dtype=np.int64)
        return steps, np.array([values[int(step)] for step in steps], dtype=np.float64)

    def value(self, layer: str, metric: str, step: int) -> float | None:
        """One recorded value, or None."""
        return self.scalars.get((layer, metric), {}).get(int(step))

    def histogram_steps_all(self) -> list[int]:
        """Every step with at least one histogram, ascending."""
        return sorted({step for values in self.histograms.values() for step in values})

    def histogram_steps(self, layer: str, metric: str) -> list[int]:
        """Steps at which a histogram of ``(layer, metric)`` was recorded, ascending."""
        return sorted(self.histograms.get((layer, metric), {}))

    def histogram(self, layer: str, metric: str, step: int | None = None) -> Histogram | None:
        """The histogram of ``(layer, metric)`` at ``step`` (default: the latest), or None."""
        by_step = self.histograms.get((layer, metric), {})
        if not by_step:
            return None
        return by_step.get(int(step)) if step is not None else by_step[max(by_step)]

    def to_pandas(self) -> Any:
        """Every scalar as a ``pandas.DataFrame`` in long format: columns step, layer, metric, value.

        Global metrics (loss, learning rate, total gradient norm) have an empty layer. Pivot it for a wide view,
        e.g. ``df[df.metric == "act_std"].pivot(index="step", columns="layer", values="value")``.
        """
        pandas = _pandas()
        rows = self.rows()
        return pandas.DataFrame(
            {
                "step": np.array([row[0] for row in rows], dtype=np.int64),
                "layer": [row[1] for row in rows],
                "metric": [row[2] for row in rows],
                "value": np.array([row[3] for row in rows], dtype=np.float64),
            },
            columns=list(SCALAR_COLUMNS),
        )

    def histograms_to_pandas(self) -> Any:
        """Every histogram bin as a ``pandas.DataFrame``: step, layer, metric, bin, lo, hi (its edges), count."""
        pandas = _pandas()
        columns: dict[str, list] = {name: [] for name in HISTOGRAM_COLUMNS}
        for (layer, metric), by_step in sorted(self.histograms.items(), key=lambda item: self.layer_rank(item[0][0])):
            for step, histogram in sorted(by_step.items()):
                edges = histogram.edges
                bins = len(histogram.counts)
                columns["step"] += [step] * bins
                columns["layer"] += [layer] * bins
                columns["metric"] += [metric] * bins
                columns["bin"] += range(bins)
                columns["lo"] += edges[:-1].tolist()
                columns["hi"] += edges[1:].tolist()
                columns["count"] += np.asarray(histogram.counts).tolist()
        return pandas.DataFrame(columns, columns=list(HISTOGRAM_COLUMNS))

    def to_parquet(self, path: str | os.PathLike, histograms_path: str | os.PathLike | None = None) -> Path:
        """Write :meth:`to_pandas` to a Parquet file at ``path`` (and :meth:`histograms_to_pandas` to
        ``histograms_path``, if given); needs pandas and pyarrow (``pip install 'normlab[pandas]'``)."""
        path = Path(path)
        self.to_pandas().to_parquet(path, index=False)
        if histograms_path is not None:
            self.histograms_to_pandas().to_parquet(Path(histograms_path), index=False)
        return path

    def _repr_html_(self) -> str:
        from normlab.diagnostics.notebook import diagnostics_html

        return diagnostics_html(self)

    def merge(self, newer: Diagnostics) -> None:
        """Add ``newer``'s records in place; on the same step, layer and metric, ``newer`` wins."""
        bins = {len(h.counts) for values in self.histograms.values() for h in values.values()}
        new_bins = {len(h.counts) for values in newer.histograms.values() for h in values.values()}
        if len(bins | new_bins) > 1:
            raise ValueError(
                f"cannot merge histograms with {sorted(bins)} bins and {sorted(new_bins)} bins; "
                "record with the same bins, or save to a new run directory"
            )
        self.settings.update(newer.settings)
        self.modules.update(newer.modules)
        self.parameters.update(newer.parameters)
        for key, values in newer.scalars.items():
            self.scalars.setdefault(key, {}).update(values)
        for key, histograms in newer.histograms.items():
            self.histograms.setdefault(key, {}).update(histograms)


def _pandas() -> Any:
    try:
        import pandas
    except ImportError as error:
        raise ImportError("DataFrames of diagnostics need pandas: pip install 'normlab[pandas]'") from error
    return pandas


def diagnostics_dir(run_dir: str | os.PathLike) -> Path:
    """Where a run directory keeps its diagnostics."""
    return Path(run_dir) / DIAGNOSTICS_DIR


def has_diagnostics(run_dir: str | os.PathLike) -> bool:
    """True when ``run_dir`` holds saved diagnostics."""
    return (diagnostics_dir(run_dir) / LAYERS_FILE).is_file()


def save_diagnostics(diagnostics: Diagnostics, run_dir: str | os.PathLike) -> Path:
    """Write ``diagnostics`` into ``run_dir/diagnostics/``, merged with what is already there.

    Safe to call repeatedly (at every checkpoint): records already on disk are kept, and a record of the same
    step, layer and metric is replaced by the new one (a run resumed from a checkpoint re-records its steps).
    Returns the diagnostics directory.
    """
    directory = diagnostics_dir(run_dir)
    directory.mkdir(parents=True, exist_ok=True)
    merged = load_diagnostics(run_dir) if has_diagnostics(run_dir) else Diagnostics()
    merged.merge(diagnostics)
    write_scalars(directory, merged.rows())
    write_histograms(directory, merged.histograms)
    layers = {
        "format": FORMAT_VERSION,
        "settings": merged.settings,
        "modules": [asdict(info) for info in merged.modules.values()],
        "parameters": [asdict(info) for info in merged.parameters.values()],
    }
    atomic_write_text(directory / LAYERS_FILE, json.dumps(layers, indent=1) + "\n")
    return directory


def load_diagnostics(run_dir: str | os.PathLike) -> Diagnostics:
    """Read back what :func:`save_diagnostics` wrote in ``run_dir`` (no re-training, no pickle)."""
    directory = diagnostics_dir(run_dir)
    layers_path = directory / LAYERS_FILE
    if not layers_path.is_file():
        raise FileNotFoundError(
            f"no diagnostics in {Path(run_dir)} (missing {layers_path}); train with a Monitor and call "
            "monitor.save(run_dir), or `normlab train ... --diagnose`"
        )
    layers = json.loads(layers_path.read_text())
    if layers.get("format") not in READABLE_FORMATS:
        raise ValueError(
            f"{layers_path} has format {layers.get('format')!r}, this normlab reads formats "
            f"{', '.join(map(str, READABLE_FORMATS))}; use the normlab version that wrote it"
        )
    diagnostics = Diagnostics(settings=dict(layers["settings"]))
    for info in layers["modules"]:
        diagnostics.modules[info["name"]] = ModuleInfo(**info)
    for info in layers["parameters"]:
        diagnostics.parameters[info["name"]] = ParameterInfo(**{**info, "shape": tuple(info["shape"])})
    for step, layer, metric, value in read_scalars(directory):
        diagnostics.add_scalar(step, layer, metric, value)
    for step, layer, metric, counts, lo, hi in read_histograms(directory):
        diagnostics.add_histogram(step, layer, metric, Histogram(counts, lo, hi))
    return diagnostics
