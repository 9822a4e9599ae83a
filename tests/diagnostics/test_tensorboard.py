"""TensorBoard export, read back with TensorBoard's own event reader."""

import builtins

import numpy as np
import pytest

from normlab.diagnostics import Diagnostics, export_tensorboard, load_diagnostics
from normlab.diagnostics import metrics as m
from normlab.runs.metrics import read_metrics

event_accumulator = pytest.importorskip(
    "tensorboard.backend.event_processing.event_accumulator", reason="the tensorboard extra is not installed"
)


@pytest.fixture(scope="module")
def events(run_dir, tmp_path_factory):
    logdir = export_tensorboard(
        load_diagnostics(run_dir), tmp_path_factory.mktemp("tb"), read_metrics(run_dir)
    )
    accumulator = event_accumulator.EventAccumulator(
        str(logdir), size_guidance={event_accumulator.SCALARS: 0, event_accumulator.HISTOGRAMS: 0}
    )
    return accumulator.Reload()


def test_scalars_are_exported_per_metric_and_layer(events, run_dir):
    diagnostics = load_diagnostics(run_dir)
    tags = events.Tags()["scalars"]
    assert {"loss", "lr", "grad_norm", "act_std/4", "act_saturated/4", "update_to_data/2.weight"} <= set(tags)
    exported = [(event.step, event.value) for event in events.Scalars("act_std/4")]
    steps, values = diagnostics.series("4", m.ACT_STD)
    assert [step for step, _ in exported] == steps.tolist()
    np.testing.assert_allclose([value for _, value in exported], values, rtol=1e-6)


def test_metrics_rows_are_exported(events, run_dir):
    rows = read_metrics(run_dir)
    exported = events.Scalars("metrics/train_loss")
    logged = [row for row in rows if "train_loss" in row]
    assert [event.step for event in exported] == [row["step"] for row in logged]
    assert [event.value for event in exported] == pytest.approx([row["train_loss"] for row in logged])
    assert [event.value for event in events.Scalars("final/test")] == pytest.approx([3.3])


def test_histograms_keep_their_bin_counts_and_range(events, run_dir):
    diagnostics = load_diagnostics(run_dir)
    assert "hist_act/4" in events.Tags()["histograms"]
    for event in events.Histograms("hist_param_grad/2.weight"):
        histogram = diagnostics.histogram("2.weight", m.HIST_PARAM_GRAD, event.step)
        value = event.histogram_value
        np.testing.assert_array_equal(value.bucket, histogram.counts)
        np.testing.assert_allclose(value.bucket_limit, histogram.edges[1:])
        assert (value.min, value.max, value.num) == pytest.approx(
            (histogram.lo, histogram.hi, histogram.counts.sum())
        )


def test_a_missing_tensorboard_names_the_extra(monkeypatch, tmp_path):
    real_import = builtins.__import__

    def without_tensorboard(name, *args, **kwargs):
        if name.startswith("torch.utils.tensorboard"):
            raise ImportError("No module named 'tensorboard'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", without_tensorboard)
    with pytest.raises(ImportError, match=r"normlab\[tensorboard\]"):
        export_tensorboard(Diagnostics(), tmp_path)
