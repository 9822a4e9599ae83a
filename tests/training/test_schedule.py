"""The schedule and the batches against closed forms: pure functions of the configuration and the step."""

from __future__ import annotations

import math

import pytest
import torch

from normlab.config import TrainConfig
from normlab.training.schedule import batch_indices, batch_table, learning_rate, learning_rates, table_steps


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


def test_learning_rates_tabulate_each_config_by_step():
    configs = [TrainConfig(steps=10, lr=1.0, lr_decay_step=5), TrainConfig(steps=10, lr=0.5, schedule="constant")]
    table = learning_rates(configs, 3, 4)
    assert table.shape == (4, 2) and table.dtype == torch.float64
    assert table[:, 0].tolist() == pytest.approx([1.0, 1.0, 0.1, 0.1]) and table[:, 1].tolist() == [0.5] * 4


def test_batch_tables_are_a_pure_function_of_seed_and_table():
    a, b = batch_table(5, 3, 1000, 32), batch_table(5, 3, 1000, 32)
    assert torch.equal(a, b) and a.shape == (table_steps(32), 32) == (2048, 32)
    assert not torch.equal(a, batch_table(5, 4, 1000, 32))
    assert not torch.equal(a, batch_table(6, 3, 1000, 32))
    assert a.min() >= 0 and a.max() < 1000


def test_a_steps_batch_is_its_row_of_its_table():
    steps = table_steps(100)
    assert torch.equal(batch_indices(9, 2 * steps + 7, 500, 100), batch_table(9, 2, 500, 100)[7])
