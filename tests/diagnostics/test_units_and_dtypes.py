"""Shares of units along the right axis (channels of conv outputs, features of Linear outputs), and statistics
in the model's precision (float64 kept, bfloat16 summarised in float32)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from normlab.diagnostics import Monitor, find_issues
from normlab.diagnostics import metrics as m


def _record(model, inputs, optimizer=None, steps=1, histogram_every=1):
    with Monitor(model, optimizer, every=1, histogram_every=histogram_every) as monitor:
        for step in range(steps):
            monitor.begin_step(step)
            loss = model(inputs).square().mean()
            if optimizer is not None:
                optimizer.zero_grad()
            loss.backward()
            if optimizer is not None:
                optimizer.step()
            monitor.end_step(loss)
    return monitor.diagnostics


def _conv_net_with_dead_channels() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(4, 8, 3), nn.ReLU(), nn.Conv1d(8, 2, 1))
    with torch.no_grad():
        model[0].bias[[1, 4, 6]] = -100.0  # three of eight channels never fire
    return model


@pytest.mark.parametrize("histogram_every", [1, 2], ids=["copies", "taken-at-once"])
def test_three_of_eight_dead_conv_channels_are_found(histogram_every):
    model = _conv_net_with_dead_channels()
    inputs = torch.randn(16, 4, 10)
    diagnostics = _record(model, inputs, steps=2, histogram_every=histogram_every)
    assert diagnostics.modules["0"].unit_axis == 1
    assert diagnostics.value("1", m.ACT_DEAD, 1) == pytest.approx(3 / 8)  # channels, not positions
    outputs = model[1](model[0](inputs)).detach()
    assert (outputs.amax(dim=(0, 2)) <= 0).float().mean().item() == pytest.approx(3 / 8)
    findings = [f for f in find_issues(diagnostics) if f.rule == "dead-units"]
    assert len(findings) == 1 and findings[0].layer == "1" and "37.5%" in findings[0].message


def test_an_activation_after_a_functional_op_keeps_the_channel_axis():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.norm, self.act = nn.Conv2d(2, 6, 1), nn.BatchNorm2d(6), nn.ReLU()

        def forward(self, x):
            return self.act(F.max_pool2d(self.norm(self.conv(x)), 2))  # (N, 6, 2, 2)

    torch.manual_seed(0)
    model = Net()
    with torch.no_grad():
        model.norm.bias[:2] = -50.0  # two of six channels never fire
    diagnostics = _record(model, torch.randn(8, 2, 4, 4))
    assert diagnostics.value("act", m.ACT_DEAD, 0) == pytest.approx(2 / 6)


def test_units_of_a_linear_layer_on_sequences_are_features():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 1))
    with torch.no_grad():
        model[0].bias[0] = -100.0
    inputs = torch.randn(4, 7, 3)  # (N, T, F): units are the last axis
    assert _record(model, inputs).value("1", m.ACT_DEAD, 0) == pytest.approx(1 / 5)


def test_tanh_units_saturated_for_every_example_are_counted():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
    with torch.no_grad():
        model[0].bias[:] = torch.tensor([30.0, -30.0, 0.0, 0.0])
    inputs = torch.randn(32, 3) * 0.1
    diagnostics = _record(model, inputs)
    assert diagnostics.value("1", m.ACT_SATURATED_UNITS, 0) == pytest.approx(0.5)
    assert diagnostics.value("1", m.ACT_SATURATED, 0) == pytest.approx(0.5)


@pytest.mark.parametrize(
    ("make_optimizer", "ratio"),
    [(lambda p: torch.optim.SGD(p, lr=1e-4), 1e-5), (lambda p: torch.optim.Adam(p, lr=1e-6), 1e-5)],
    ids=["sgd-1e-4", "adam-1e-6"],
)
@pytest.mark.parametrize("histogram_every", [1, 2], ids=["copies", "taken-at-once"])
def test_float64_models_are_summarised_in_float64(make_optimizer, ratio, histogram_every):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 30), nn.Tanh(), nn.Linear(30, 1)).double()
    optimizer = make_optimizer(model.parameters())
    inputs = torch.randn(64, 20, dtype=torch.float64)
    snapshots = []
    with Monitor(model, optimizer, every=1, histogram_every=histogram_every) as monitor:
        for step in range(2):
            snapshots.append(model[0].weight.detach().clone())
            monitor.begin_step(step)
            loss = model(inputs).square().mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            monitor.end_step(loss)
    before, after = snapshots[1].numpy(), model[0].weight.detach().numpy()
    expected = np.std(after - before, ddof=1) / np.std(before, ddof=1)
    assert expected < ratio  # the regime where float32 snapshots were off by 2e-4 to 1.4e-3
    assert monitor.diagnostics.value("0.weight", m.UPDATE_TO_DATA, 1) == pytest.approx(expected, rel=1e-9)
    assert monitor.diagnostics.value("0.weight", m.PARAM_STD, 1) == pytest.approx(np.std(before, ddof=1), rel=1e-12)


def test_bfloat16_models_are_summarised_in_float32():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1)).to(torch.bfloat16)
    inputs = torch.randn(32, 8, dtype=torch.bfloat16)
    for histogram_every in (1, 2):
        diagnostics = _record(model, inputs, steps=2, histogram_every=histogram_every)
        hidden = torch.tanh(model[0](inputs)).detach().float().double().numpy()
        assert diagnostics.value("1", m.ACT_STD, 1) == pytest.approx(hidden.std(ddof=1), rel=1e-5)
        weight = model[0].weight.detach().float().double().numpy()
        assert diagnostics.value("0.weight", m.PARAM_STD, 1) == pytest.approx(weight.std(ddof=1), rel=1e-5)
