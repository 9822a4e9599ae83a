"""Saving diagnostics into the run directory and loading them back."""

import csv

import numpy as np
import pytest
import torch

from normlab.diagnostics import Diagnostics, Histogram, Monitor, load_diagnostics, save_diagnostics
from normlab.diagnostics import metrics as m

from .models import batch, lesson_mlp, train_step


def _record(steps, every=1, seed=0):
    model = lesson_mlp(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = Monitor(model, optimizer, every=every, histogram_every=every, bins=16)
    for step in steps:
        train_step(model, optimizer, monitor, step, *batch(step))
    monitor.close()
    return monitor


def _assert_equal(loaded: Diagnostics, original: Diagnostics):
    # repr, so that NaN equals NaN and -0.0 differs from 0.0
    assert [(*row[:3], repr(row[3])) for row in loaded.rows()] == [
        (*row[:3], repr(row[3])) for row in original.rows()
    ]
    assert loaded.settings == original.settings
    assert loaded.modules == original.modules
    assert loaded.parameters == original.parameters
    assert loaded.histograms.keys() == original.histograms.keys()
    for key, by_step in original.histograms.items():
        for step, histogram in by_step.items():
            other = loaded.histograms[key][step]
            np.testing.assert_array_equal(other.counts, histogram.counts)
            assert (other.lo, other.hi) == (histogram.lo, histogram.hi)


def test_round_trip_keeps_every_row_and_histogram(tmp_path):
    monitor = _record([0, 1])
    directory = monitor.save(tmp_path)
    assert directory == tmp_path / "diagnostics"
    _assert_equal(load_diagnostics(tmp_path), monitor.diagnostics)
    assert sorted(path.name for path in directory.iterdir()) == [
        "histograms.safetensors",
        "layers.json",
        "scalars.csv",
    ]  # and no temporary file left behind


def test_scalars_are_tidy_csv_rows(tmp_path):
    monitor = _record([0])
    monitor.save(tmp_path)
    with (tmp_path / "diagnostics" / "scalars.csv").open() as file:
        rows = list(csv.DictReader(file))
    assert list(rows[0]) == ["step", "layer", "metric", "value"]
    loss = [row for row in rows if row["metric"] == m.LOSS]
    assert len(loss) == 1 and loss[0]["layer"] == "" and loss[0]["step"] == "0"
    assert float(loss[0]["value"]) == monitor.diagnostics.value("", m.LOSS, 0)


def test_saving_repeatedly_appends_and_a_resumed_run_replaces_its_steps(tmp_path):
    first = _record([0, 1, 2])
    first.save(tmp_path)
    first.save(tmp_path)  # a second checkpoint with nothing new changes nothing
    resumed = _record([2, 3], seed=1)  # resumed from step 2, with different numbers
    resumed.save(tmp_path)
    loaded = load_diagnostics(tmp_path)
    assert loaded.steps() == [0, 1, 2, 3]
    assert loaded.value("4", m.ACT_MEAN, 1) == first.diagnostics.value("4", m.ACT_MEAN, 1)
    assert loaded.value("4", m.ACT_MEAN, 2) == resumed.diagnostics.value("4", m.ACT_MEAN, 2)
    np.testing.assert_array_equal(
        loaded.histogram("4", m.HIST_ACT, 2).counts, resumed.diagnostics.histogram("4", m.HIST_ACT, 2).counts
    )


def test_non_finite_values_round_trip(tmp_path):
    diagnostics = Diagnostics(settings={"every": 1})
    for metric, value in (("a", float("nan")), ("b", float("inf")), ("c", -0.0)):
        diagnostics.add_scalar(5, "layer.with,comma", metric, value)
    diagnostics.add_histogram(5, "layer", m.HIST_ACT, Histogram(np.array([1, 2, 0]), -1.0, 2.0))
    save_diagnostics(diagnostics, tmp_path)
    _assert_equal(load_diagnostics(tmp_path), diagnostics)


def test_series_and_histogram_lookups():
    diagnostics = Diagnostics()
    for step, value in ((20, 2.0), (10, 1.0)):
        diagnostics.add_scalar(step, "x", "metric", value)
    steps, values = diagnostics.series("x", "metric")
    assert steps.tolist() == [10, 20] and values.tolist() == [1.0, 2.0]
    assert diagnostics.series("x", "missing")[0].size == 0
    assert diagnostics.histogram("x", m.HIST_ACT) is None
    histogram = Histogram(np.array([1, 3]), 0.0, 2.0)
    assert histogram.density().tolist() == [0.25, 0.75]  # integrates to 1 over bins of width 1
    assert histogram.centers.tolist() == [0.5, 1.5]


def test_loading_a_directory_without_diagnostics_says_how_to_get_them(tmp_path):
    with pytest.raises(FileNotFoundError, match="monitor.save"):
        load_diagnostics(tmp_path)


def test_histograms_with_different_bins_do_not_merge(tmp_path):
    _record([0]).save(tmp_path)
    other = Diagnostics()
    other.add_histogram(1, "4", m.HIST_ACT, Histogram(np.zeros(3, dtype=np.int64), 0.0, 1.0))
    with pytest.raises(ValueError, match="bins"):
        save_diagnostics(other, tmp_path)
