"""Training pieces against closed forms and independent computations: schedules, batches, evaluation,
calibration, divergence, and the loop against a plain PyTorch loop written out here."""

from __future__ import annotations

import math
import os
import signal

import pytest
import torch
import torch.nn.functional as F

from normlab.errors import TrainingDiverged
from normlab.model import ModelConfig, build_model, get_preset
from normlab.train import (
    Interrupted,
    TrainConfig,
    TrainEvents,
    batch_block,
    batch_block_length,
    calibrate_batchnorm,
    evaluate,
    learning_rate,
    train,
)

VOCAB = 27


def _data(n: int = 600, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (n, 3), generator=generator), torch.randint(0, VOCAB, (n,), generator=generator)


def test_step_schedule_is_the_lessons():
    config = TrainConfig(steps=200_000)
    assert learning_rate(config, 0) == learning_rate(config, 99_999) == 0.1
    assert learning_rate(config, 100_000) == pytest.approx(0.01)
    assert learning_rate(TrainConfig(lr_decay_step=150_000), 149_999) == 0.1


def test_cosine_schedule_with_warmup_matches_its_formula():
    config = TrainConfig(steps=1100, lr=1.0, schedule="cosine", warmup_steps=100, min_lr_factor=0.1)
    assert learning_rate(config, 0) == pytest.approx(0.01)
    assert learning_rate(config, 99) == pytest.approx(1.0)
    assert learning_rate(config, 600) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert learning_rate(config, 1100) == pytest.approx(0.1)


def test_batch_blocks_are_a_pure_function_of_seed_and_block():
    a, b = batch_block(5, 3, 1000, 32), batch_block(5, 3, 1000, 32)
    assert torch.equal(a, b) and a.shape == (batch_block_length(32), 32)
    assert not torch.equal(a, batch_block(5, 4, 1000, 32))
    assert a.min() >= 0 and a.max() < 1000


def test_evaluate_is_the_mean_cross_entropy_in_eval_mode():
    model = build_model(get_preset("lesson-batchnorm").model, VOCAB)
    x, y = _data()
    model.eval()
    expected = F.cross_entropy(model(x), y).item()
    model.train()
    assert evaluate(model, x, y, batch_size=64) == pytest.approx(expected, rel=1e-6)
    assert model.training


def test_calibration_sets_the_population_statistics_of_the_hidden_layer():
    model = build_model(get_preset("lesson-batchnorm").model, VOCAB)
    x, _ = _data(2000)
    embedding, _, linear, norm, _, _ = model.layers
    hpreact = embedding.weight[x].view(len(x), -1) @ linear.weight.T  # independent: the lesson's formula
    momentum_before = norm.momentum
    assert calibrate_batchnorm(model, x) == 1
    torch.testing.assert_close(norm.running_mean, hpreact.mean(0))
    torch.testing.assert_close(norm.running_var, hpreact.var(0))  # unbiased, as torch tracks it
    assert norm.momentum == momentum_before


def test_training_loop_equals_a_plain_pytorch_loop():
    """The loop's batches, schedule and update, replayed by an independent plain loop on a copy of the model."""
    config = TrainConfig(steps=50, batch_size=16, lr=0.1, lr_decay_step=25, eval_every=1000, checkpoint_every=1000)
    model = build_model(get_preset("lesson-batchnorm").model, VOCAB, seed=4)
    reference = build_model(get_preset("lesson-batchnorm").model, VOCAB, seed=4)
    x, y = _data()
    train(model, (x, y), _data(100, 1), config, progress=False)
    indices = batch_block(config.seed, 0, len(x), config.batch_size)
    for step in range(config.steps):
        lr = 0.1 if step < 25 else 0.01
        loss = F.cross_entropy(reference(x[indices[step]]), y[indices[step]])
        for p in reference.parameters():
            p.grad = None
        loss.backward()
        with torch.no_grad():
            for p in reference.parameters():
                p -= lr * p.grad
    for (name, a), b in zip(model.state_dict().items(), reference.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)


def test_a_nan_loss_stops_training_naming_the_step():
    config = TrainConfig(steps=300, batch_size=8, lr=1e30, eval_every=1000, checkpoint_every=1000)
    model = build_model(ModelConfig(n_hidden=8, n_embd=2), VOCAB)
    saved = []
    with pytest.raises(TrainingDiverged, match=r"became (NaN|Inf) at step \d+ .*lower train.lr"):
        train(model, _data(), _data(50, 1), config, progress=False,
              events=TrainEvents(checkpoint=saved.append))
    assert saved == []  # no checkpoint of the diverged state


def test_adamw_and_clipping_train_down():
    config = TrainConfig(steps=200, batch_size=32, optimizer="adamw", lr=3e-3, schedule="cosine",
                         warmup_steps=20, grad_clip=1.0, eval_every=1000, checkpoint_every=1000)
    model = build_model(ModelConfig(n_hidden=32, n_embd=4, init="kaiming", norm="layer"), VOCAB)
    x, y = _data()
    before = evaluate(model, x, y)
    train(model, (x, y), _data(50, 1), config, progress=False)
    assert evaluate(model, x, y) < before - 0.2


def test_ctrl_c_mid_run_saves_at_the_next_step_boundary_and_stops():
    config = TrainConfig(steps=100, batch_size=8, eval_every=1000, checkpoint_every=1000)
    model = build_model(ModelConfig(n_hidden=8, n_embd=2), VOCAB)
    saved = []

    def press_ctrl_c(step: int) -> None:
        if step == 17:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(Interrupted) as stop:
        train(model, _data(), _data(50, 1), config, progress=False,
              events=TrainEvents(checkpoint=saved.append, begin_step=press_ctrl_c))
    assert stop.value.step == 18 and saved == [18]  # step 17 finished, then saved, then stopped
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
