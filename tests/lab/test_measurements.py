"""Measurements that experiments rest on, against independent computations: the landscape probe against the
closed-form gradient of softmax regression; recipe-differences' half-steps level against a run of half the steps;
the pooled seed std against per-group sample variances."""

from __future__ import annotations

import math
import statistics

import torch

from normlab.lab import LabData, landscape, recipe_differences
from normlab.lab.common import pooled_std
from normlab.model import build_model
from normlab.sweeps.runner import run_sweep


def _softmax_regression(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor
                        ) -> tuple[float, torch.Tensor]:
    """Mean cross-entropy of logits x·Wᵀ + b and its gradient [∂W, ∂b] flattened, written out by hand."""
    probabilities = torch.softmax(x @ weight.T + bias, dim=1)  # (B, C)
    loss = -probabilities[torch.arange(len(y)), y].log().mean()
    error = (probabilities - torch.nn.functional.one_hot(y, weight.shape[0])) / len(y)  # (B, C)
    return float(loss), torch.cat([(error.T @ x).reshape(-1), error.sum(0)])


def test_the_probe_matches_the_closed_form_gradient_of_softmax_regression():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(16, 5, generator=generator, dtype=torch.float64)
    y = torch.randint(0, 4, (16,), generator=generator)
    model = torch.nn.Linear(5, 4).double()
    weight, bias = model.weight.detach().clone(), model.bias.detach().clone()
    loss, gradient = _softmax_regression(x, y, weight, bias)
    losses, changes = [loss], []
    for eta in landscape.STEP_SIZES:
        moved = gradient * eta
        moved_loss, moved_gradient = _softmax_regression(x, y, weight - moved[:20].view(4, 5), bias - moved[20:])
        losses.append(moved_loss)
        changes.append(float((moved_gradient - gradient).norm()))

    measured = landscape.probe(model, x, y)

    torch.testing.assert_close(torch.tensor(measured["losses"]), torch.tensor(losses), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.tensor(measured["gradient_changes"]), torch.tensor(changes), rtol=1e-10,
                               atol=1e-12)
    assert abs(measured["loss_variation"] - (max(losses) - min(losses))) < 1e-12
    betas = [change / (eta * float(gradient.norm())) for eta, change in zip(landscape.STEP_SIZES, changes)]
    assert abs(measured["beta_smoothness"] - max(betas)) < 1e-10
    torch.testing.assert_close(model.weight.detach(), weight, rtol=0, atol=0)  # the model itself is left alone


def test_the_probe_leaves_batchnorm_running_statistics_alone(lab_data: LabData):
    model = build_model(landscape.model_configs()["deep"]["batch"], len(lab_data.vocab))
    before = {key: value.clone() for key, value in model.state_dict().items()}
    x, y = lab_data.splits.train[0][:32], lab_data.splits.train[1][:32]
    landscape.probe(model, x, y)
    assert all(torch.equal(before[key], value) for key, value in model.state_dict().items())


def test_the_half_steps_level_is_a_run_of_half_the_steps(lab_data: LabData):
    levels = {level.label: level for level in recipe_differences.LEVELS}
    half = recipe_differences.sweep_run(levels["half the steps"], seed=3, steps=200)
    short = recipe_differences.sweep_run(levels["lesson-kaiming"], seed=3, steps=100)
    results = run_sweep([half, short], lab_data.splits, len(lab_data.vocab), progress=False, keep_models=True,
                        snapshot_steps=[100], final_examples=100)
    snapshot, trained = results[0].snapshot(100).state_dict(), results[1].model.state_dict()
    assert half.train.steps == 200 and short.train.steps == 100
    for key, value in trained.items():
        torch.testing.assert_close(snapshot[key], value, rtol=1e-6, atol=1e-7)


def test_the_pooled_std_weighs_each_group_by_its_degrees_of_freedom():
    groups = [[2.0, 2.5, 3.5], [1.0, 4.0], [float("nan"), 5.0, 7.0, None], [9.0]]  # NaN/None: diverged, left out
    variances = [statistics.variance(groups[0]), statistics.variance(groups[1]), statistics.variance([5.0, 7.0])]
    expected = math.sqrt((2 * variances[0] + variances[1] + variances[2]) / 4)
    assert abs(pooled_std(groups) - expected) < 1e-12
    assert math.isnan(pooled_std([[1.0], [2.0]]))
