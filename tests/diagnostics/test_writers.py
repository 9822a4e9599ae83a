"""Live writers: a user callback, TensorBoard while training runs, Weights & Biases in offline mode."""

import pytest
import torch

from normlab.diagnostics import Monitor, StepRecord, TensorBoardWriter
from normlab.diagnostics import metrics as m
from normlab.diagnostics.tensorboard import scalar_tag

from .models import batch, lesson_mlp, train_step


def _train(writers, steps=6, every=2, **options):
    model = lesson_mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = Monitor(model, optimizer, every=every, writers=writers, flush_seconds=0, **options)
    for step in range(steps):
        train_step(model, optimizer, monitor, step, *batch(step))
        yield step, monitor
    monitor.close()


def test_a_callback_receives_each_recording_step_as_it_is_recorded():
    received: list[StepRecord] = []
    seen_during_training = []
    for step, current in _train([received.append]):
        seen_during_training.append((step, [record.step for record in received]))
        monitor = current
    assert seen_during_training[2] == (2, [0, 2])  # flush_seconds=0: at once, not at the end
    assert [record.step for record in received] == [0, 2, 4]
    first = received[0]
    scalars = {(layer, metric): value for layer, metric, value in first.scalars}
    assert scalars[("4", m.ACT_STD)] == monitor.diagnostics.value("4", m.ACT_STD, 0)
    assert {(layer, kind) for layer, kind, _ in first.histograms} == set(monitor.diagnostics.histograms)


def test_tensorboard_shows_scalars_before_training_ends(tmp_path):
    accumulator_module = pytest.importorskip(
        "tensorboard.backend.event_processing.event_accumulator", reason="the tensorboard extra is not installed"
    )
    logdir = tmp_path / "tb"
    live = None
    for step, monitor in _train([TensorBoardWriter(logdir)], steps=8):
        if step == 4:  # training still running: read what TensorBoard would show now
            live = accumulator_module.EventAccumulator(str(logdir)).Reload()
            expected = monitor.diagnostics.series("4", m.ACT_STD)
    assert "act_std/4" in live.Tags()["scalars"] and "loss" in live.Tags()["scalars"]
    events = live.Scalars(scalar_tag("4", m.ACT_STD))
    assert [event.step for event in events] == expected[0].tolist() == [0, 2, 4]
    assert [event.value for event in events] == pytest.approx(expected[1].tolist(), rel=1e-6)
    assert "hist_act/4" in live.Tags()["histograms"]


def test_weights_and_biases_logs_every_recording_step_offline(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb", reason="the wandb extra is not installed")
    from normlab.diagnostics import WandbWriter

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    writer = WandbWriter(project="normlab-test")
    logged = []
    original_log = writer.run.log
    monkeypatch.setattr(writer.run, "log", lambda row, *a, **k: (logged.append(row), original_log(row, *a, **k)))
    for step, current in _train([writer], steps=5, histogram_every=4):
        monitor = current
        if step == 4:  # before the run finishes (the writer started it, so closing the monitor finishes it)
            summary = dict(writer.run.summary)
    diagnostics = monitor.diagnostics
    assert [row["diagnostics/step"] for row in logged] == [0, 2, 4]
    assert summary["diagnostics/step"] == 4
    assert summary["diagnostics/act_std/4"] == pytest.approx(diagnostics.value("4", m.ACT_STD, 4))
    assert isinstance(logged[0]["diagnostics/hist_act/4"], wandb.Histogram)
    assert "diagnostics/hist_act/4" not in logged[1]  # histograms only on histogram steps
    assert list(tmp_path.glob("wandb/offline-run-*/run-*.wandb"))  # the offline run file, ready to sync


def test_the_training_loops_metric_rows_stream_to_tensorboard_too(tmp_path):
    accumulator_module = pytest.importorskip(
        "tensorboard.backend.event_processing.event_accumulator", reason="the tensorboard extra is not installed"
    )
    writer = TensorBoardWriter(tmp_path)
    for step in range(3):
        writer.log_metrics({"step": step, "train_loss": 3.0 - step, "lr": 0.1})
    events = accumulator_module.EventAccumulator(str(tmp_path)).Reload()  # before the writer is closed
    assert [(e.step, e.value) for e in events.Scalars("metrics/train_loss")] == [(0, 3.0), (1, 2.0), (2, 1.0)]
    writer.close()
