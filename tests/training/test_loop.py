"""The one training loop: against a plain PyTorch loop written out here, and its policies (evaluation,
checkpoints, Ctrl-C, divergence, multi-step calls) on a scripted engine whose losses the test chooses."""

from __future__ import annotations

import dataclasses
import os
import signal

import pytest
import torch
import torch.nn.functional as F

from normlab.config import TrainConfig, get_preset
from normlab.model import build_model, dropout_seed
from normlab.training import Interrupted, LoopEvents, create_engine, train_loop
from normlab.training.engines import Engine
from normlab.training.loop import SYNC_EVERY
from normlab.training.schedule import batch_table

from .helpers import TRAIN_XY, VAL_XY, VOCAB, with_torch_dropout


def test_the_loop_on_the_reference_engine_equals_a_plain_pytorch_loop():
    """Batches, schedule and update, replayed by an independent plain loop on a copy of the model."""
    model_config = get_preset("lesson-batchnorm").model
    config = TrainConfig(steps=50, batch_size=16, lr=0.1, lr_decay_step=25, eval_every=1000, checkpoint_every=1000,
                         seed=4, engine="reference")
    engine = create_engine([model_config], [config], VOCAB, TRAIN_XY)
    train_loop(engine, [config], TRAIN_XY, VAL_XY, progress=False)
    reference = build_model(model_config, VOCAB, seed=4)
    x, y = TRAIN_XY
    indices = batch_table(config.seed, 0, len(x), config.batch_size)
    for step in range(config.steps):
        _plain_sgd_step(reference, x[indices[step]], y[indices[step]], 0.1 if step < 25 else 0.01)
    for (name, a), b in zip(engine.model_state(0).items(), reference.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)


def test_dropout_on_the_reference_engine_equals_a_plain_loop_with_torchs_dropout():
    """The engine's masks, replayed by a plain loop on a copy whose Dropout layers are torch's dropout with torch's
    global generator seeded `dropout_seed(seed, step, 0, layer)` at each step."""
    model_config = dataclasses.replace(get_preset("lesson-batchnorm").model, n_layers=3, dropout=0.25)
    config = TrainConfig(steps=30, batch_size=16, lr=0.1, schedule="constant", eval_every=1000, checkpoint_every=1000,
                         seed=4)
    engine = create_engine([model_config], [config], VOCAB, TRAIN_XY)
    train_loop(engine, [config], TRAIN_XY, VAL_XY, progress=False)
    reference = build_model(model_config, VOCAB, seed=4)
    dropouts = with_torch_dropout(reference)
    assert len(dropouts) == 2
    x, y = TRAIN_XY
    indices = batch_table(config.seed, 0, len(x), config.batch_size)
    for step in range(config.steps):
        for layer, dropout in enumerate(dropouts):
            dropout.seed = dropout_seed(config.seed, step, 0, layer)
        _plain_sgd_step(reference, x[indices[step]], y[indices[step]], 0.1)
    for (name, a), b in zip(engine.model_state(0).items(), reference.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)


def _plain_sgd_step(model, x, y, lr):
    """The lesson's update, written out: cross-entropy, backward, p -= lr * grad."""
    loss = F.cross_entropy(model(x), y)
    for p in model.parameters():
        p.grad = None
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= lr * p.grad


class ScriptedEngine(Engine):
    """M "models" whose batch loss at step s is `losses(s, i)`; records every call it gets."""

    def __init__(self, count: int = 1, steps_per_call: int = 1, losses=lambda step, model: 1.0, every=None):
        self.num_models, self.steps_per_call, self.losses = count, steps_per_call, losses
        self.device = torch.device("cpu")
        self.step, self.calls, self.recorded, self.every = 0, [], [], every

    def run_steps(self, indices, rates):
        assert indices.shape[:2] == rates.shape == (len(indices), self.num_models)
        self.calls.append((self.step, len(indices)))
        out = torch.tensor([[self.losses(self.step + k, i) for i in range(self.num_models)]
                            for k in range(len(indices))])
        self.step += len(indices)
        return out

    def evaluate(self, splits):
        return [float(self.step)] * self.num_models

    def model_state(self, index):
        return {}

    def optimizer_state(self, index):
        return {}

    def modules(self):
        return []

    def records(self, step):
        return self.every is not None and step % self.every == 0

    def record_step(self, step, indices, rates):
        self.recorded.append(step)
        return None


def _run(engine, config, **kwargs):
    rows, checkpoints = [], []
    diverged = train_loop(engine, [config] * engine.num_models, TRAIN_XY, VAL_XY, progress=False,
                          events=LoopEvents(log=lambda i, row: rows.append((i, row)), checkpoint=checkpoints.append),
                          **kwargs)
    return diverged, rows, checkpoints


def test_evaluations_and_checkpoints_fall_on_their_intervals_and_at_the_end():
    config = TrainConfig(steps=250, batch_size=4, eval_every=60, checkpoint_every=100)
    _, rows, checkpoints = _run(ScriptedEngine(), config)
    assert [row["step"] for _, row in rows] == [60, 120, 180, 240, 250]
    assert [row["val_loss"] for _, row in rows] == [60, 120, 180, 240, 250]  # evaluated after exactly that step
    assert checkpoints == [100, 200, 250]


def test_multi_step_calls_never_straddle_an_event():
    config = TrainConfig(steps=1000, batch_size=4, eval_every=250, checkpoint_every=330)
    engine = ScriptedEngine(steps_per_call=10, every=45)
    _run(engine, config)
    events = set(range(0, 1001, SYNC_EVERY)) | set(range(0, 1001, 250)) | set(range(0, 1001, 330)) | {1000}
    for start, size in engine.calls:
        assert size in (1, 10)
        assert not any(start < done < start + size for done in events), (start, size)
        assert not any(start < recording < start + size for recording in range(0, 1000, 45)), (start, size)
    assert sum(size for _, size in engine.calls) == 1000
    assert engine.recorded == list(range(0, 1000, 45))
    assert sum(size == 10 for _, size in engine.calls) > 50  # most steps still run ten at a time


def test_a_divergence_is_reported_at_its_step_and_stops_before_any_checkpoint():
    config = TrainConfig(steps=1000, batch_size=4, eval_every=1000, checkpoint_every=500)
    engine = ScriptedEngine(losses=lambda step, model: float("nan") if step >= 137 else 2.0)
    diverged, rows, checkpoints = _run(engine, config)
    assert diverged[0].step == 137 and engine.step == 200  # noticed at the next sync
    assert checkpoints == [] and rows == []
    assert "became NaN at step 137 (learning rate 0.1)" in diverged[0].message(config)


def test_one_diverging_model_does_not_stop_the_others():
    config = TrainConfig(steps=300, batch_size=4, eval_every=300, checkpoint_every=300)
    engine = ScriptedEngine(count=2, losses=lambda step, model: float("inf") if model == 0 and step >= 42 else 1.0)
    diverged, rows, checkpoints = _run(engine, config)
    assert list(diverged) == [0] and diverged[0].step == 42 and "became Inf" in diverged[0].message(config)
    assert engine.step == 300 and checkpoints == [300] and len(rows) == 2


def test_a_real_divergence_on_both_engines():
    config = TrainConfig(steps=300, batch_size=8, eval_every=1000, checkpoint_every=1000)
    model_config = get_preset("lesson-kaiming").model
    state = build_model(model_config, VOCAB).state_dict()
    state["layers.4.bias"] = torch.full_like(state["layers.4.bias"], float("nan"))  # the output layer's bias
    for engine_name in ("reference", "stacked"):
        settings = dataclasses.replace(config, engine=engine_name)
        engine = create_engine([model_config], [settings], VOCAB, TRAIN_XY, states=[state])
        diverged, _, checkpoints = _run(engine, settings)
        assert diverged[0].step == 0 and checkpoints == [], engine_name


def test_ctrl_c_mid_run_saves_at_the_next_step_boundary_and_stops():
    config = TrainConfig(steps=100, batch_size=8, eval_every=1000, checkpoint_every=1000)

    def press_ctrl_c(step, model):
        if step == 17 and model == 0:
            os.kill(os.getpid(), signal.SIGINT)
        return 1.0

    with pytest.raises(Interrupted) as stop:
        _run(ScriptedEngine(losses=press_ctrl_c), config)
    assert stop.value.step == 18  # step 17 finished, then the checkpoint, then the stop
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


@pytest.mark.parametrize("engine_name, dropout", [("reference", 0.0), ("stacked", 0.0), ("reference", 0.3)])
def test_resuming_from_saved_states_ends_exactly_where_one_run_ends(engine_name, dropout):
    model_config = dataclasses.replace(get_preset("lesson-batchnorm").model, n_layers=2, dropout=dropout)
    config = TrainConfig(steps=60, batch_size=16, optimizer="adamw", lr=3e-3, eval_every=20, checkpoint_every=30,
                         engine=engine_name)
    whole = create_engine([model_config], [config], VOCAB, TRAIN_XY)
    _, rows, _ = _run(whole, config)
    first = create_engine([model_config], [config], VOCAB, TRAIN_XY)
    saved = {}

    def keep(step):
        saved[step] = ({k: v.clone() for k, v in first.model_state(0).items()}, first.optimizer_state(0))
        if step == 30:
            raise KeyboardInterrupt  # the process dies right after the checkpoint

    with pytest.raises(KeyboardInterrupt):
        train_loop(first, [config], TRAIN_XY, VAL_XY, progress=False, events=LoopEvents(checkpoint=keep))
    state, optimizer_state = saved[30]
    second = create_engine([model_config], [config], VOCAB, TRAIN_XY, states=[state],
                           optimizer_states=[optimizer_state], step=30)
    _, resumed_rows, _ = _run(second, config, start_step=30)
    for (name, a), b in zip(whole.model_state(0).items(), second.model_state(0).values()):
        assert torch.equal(a, b), name
    assert [row["val_loss"] for _, row in resumed_rows] == [row["val_loss"] for _, row in rows if row["step"] > 30]


class TwoProcessEngine(ScriptedEngine):
    """A scripted engine that says it computes its steps with another process: `agree` records the steps it is
    called at and adds what the other process reports (a stop from step `other_stops_at` on)."""

    processes = 2

    def __init__(self, other_stops_at: int | None = None, **options):
        super().__init__(**options)
        self.other_stops_at, self.agreed = other_stops_at, []

    def agree(self, losses, stop):
        self.agreed.append((self.step, stop))
        other = self.other_stops_at is not None and self.step >= self.other_stops_at
        return losses, stop or other


def test_several_processes_agree_on_a_ctrl_c_at_the_next_sync():
    config = TrainConfig(steps=500, batch_size=8, eval_every=1000, checkpoint_every=1000)

    def press_ctrl_c(step, model):
        if step == 17:
            os.kill(os.getpid(), signal.SIGINT)
        return 1.0

    engine = TwoProcessEngine(losses=press_ctrl_c)
    with pytest.raises(Interrupted) as stop:
        _run(engine, config)
    assert stop.value.step == SYNC_EVERY and engine.agreed == [(SYNC_EVERY, True)]  # not at step 18: no sync there
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_stop_asked_of_another_process_stops_this_one_at_the_same_sync_with_one_checkpoint():
    config = TrainConfig(steps=500, batch_size=8, eval_every=1000, checkpoint_every=1000)
    engine, checkpoints = TwoProcessEngine(other_stops_at=250), []
    with pytest.raises(Interrupted) as stop:
        train_loop(engine, [config], TRAIN_XY, VAL_XY, progress=False, events=LoopEvents(checkpoint=checkpoints.append))
    assert stop.value.step == 300 and engine.agreed == [(100, False), (200, False), (300, False)]
    assert checkpoints == [300]
