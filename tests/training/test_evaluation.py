"""Evaluation and BatchNorm calibration against computations written out here."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from normlab.config import get_preset
from normlab.model import build_model
from normlab.training import calibrate_batchnorm, evaluate

from .helpers import VOCAB, random_examples


def test_evaluate_is_the_mean_cross_entropy_in_eval_mode():
    model = build_model(get_preset("lesson-batchnorm").model, VOCAB)
    x, y = random_examples(600, 0)
    model.eval()
    expected = F.cross_entropy(model(x), y).item()
    model.train()
    assert evaluate(model, x, y, batch_size=64) == pytest.approx(expected, rel=1e-6)
    assert model.training


def test_calibration_sets_the_population_statistics_of_the_hidden_layer():
    model = build_model(get_preset("lesson-batchnorm").model, VOCAB)
    x, _ = random_examples(2000, 0)
    embedding, _, linear, norm, _, _ = model.layers
    hpreact = embedding.weight[x].view(len(x), -1) @ linear.weight.T  # independent: the lesson's formula
    momentum_before = norm.momentum
    assert calibrate_batchnorm(model, x) == 1
    torch.testing.assert_close(norm.running_mean, hpreact.mean(0))
    torch.testing.assert_close(norm.running_var, hpreact.var(0))  # unbiased, as torch tracks it
    assert norm.momentum == momentum_before
