"""Findings fire on crafted bad models, stay quiet on a well-initialised one, and state their thresholds."""

import math

import pytest
import torch
from torch import nn

from normlab.diagnostics import Diagnostics, Monitor, find_issues, inspect_model
from normlab.diagnostics import metrics as m
from normlab.diagnostics.findings import RULES

from .models import VOCAB, batch, lesson_mlp, tanh_mlp, train_step


def _inspect(model):
    return inspect_model(model, *batch(0, 64))


def _rules(findings):
    return sorted({finding.rule for finding in findings})


def test_a_well_initialised_model_has_no_findings():
    model = lesson_mlp()
    with torch.no_grad():
        model[5].weight.mul_(0.1)
        model[5].bias.zero_()
    assert find_issues(_inspect(model), vocab_size=VOCAB) == []


def test_tanh_weights_times_ten_saturate_every_tanh_layer():
    findings = find_issues(_inspect(tanh_mlp(weight_scale=10.0)))
    saturated = [f for f in findings if f.rule == "saturation"]
    assert [f.layer for f in saturated] == ["3", "5", "7"]
    assert all(f.severity == "warning" for f in saturated)
    assert all(f.step == 0 and "25%" in f.message and "|t| > 0.97" in f.message for f in saturated)
    assert "5/3" in saturated[0].remedy and "BatchNorm" in saturated[0].remedy


def test_a_relu_layer_with_a_large_negative_bias_is_dead():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Embedding(VOCAB, 10), nn.Flatten(), nn.Linear(30, 64), nn.ReLU(), nn.Linear(64, VOCAB)
    )
    with torch.no_grad():
        model[2].bias.fill_(-10.0)
    findings = [f for f in find_issues(_inspect(model)) if f.rule == "dead-units"]
    assert len(findings) == 1 and findings[0].layer == "3"
    assert "100.0% dead" in findings[0].message and "10%" in findings[0].message
    assert findings[0].severity == "warning" and "exactly zero" in findings[0].message


def test_an_output_layer_times_ten_is_confidently_wrong():
    diagnostics = _inspect(tanh_mlp(output_scale=10.0))
    findings = [f for f in find_issues(diagnostics, vocab_size=VOCAB) if f.rule == "initial-loss"]
    assert len(findings) == 1
    assert diagnostics.value("", m.LOSS, 0) > 1.5 * math.log(VOCAB)
    assert f"{math.log(VOCAB):.2f}" in findings[0].message and "1.5x" in findings[0].message
    assert "0.1" in findings[0].remedy
    assert find_issues(diagnostics) == find_issues(diagnostics, vocab_size=None)  # needs the vocabulary


def test_small_weights_make_gradients_vanish():
    findings = [
        f for f in find_issues(_inspect(tanh_mlp(depth=4, weight_scale=0.2))) if "gradients" in f.rule
    ]
    assert _rules(findings) == ["vanishing-gradients"]
    assert findings[0].layer == "3" and "10x" in findings[0].message


def test_gradients_growing_towards_the_input_are_exploding():
    diagnostics = Diagnostics()
    for order, (layer, grad_std) in enumerate((("tanh1", 1.0), ("tanh2", 0.3), ("tanh3", 0.05))):
        diagnostics.modules[layer] = _tanh_info(layer, order)
        diagnostics.add_scalar(7, layer, m.GRAD_STD, grad_std)
    findings = find_issues(diagnostics)
    assert _rules(findings) == ["exploding-gradients"]
    assert findings[0].step == 7 and "20x larger" in findings[0].message


def _tanh_info(name, order):
    from normlab.diagnostics.storage import ModuleInfo

    return ModuleInfo(name, "Tanh", "activation", "tanh", False, order)


@pytest.mark.parametrize(("learning_rate", "verdict"), [(1e-6, "barely learns"), (20.0, "changes too fast")])
def test_update_to_data_far_from_one_in_a_thousand(learning_rate, verdict):
    model = lesson_mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=learning_rate)
    with Monitor(model, optimizer, every=1) as monitor:
        for step in range(4):
            train_step(model, optimizer, monitor, step, *batch(step))
    findings = [f for f in find_issues(monitor.diagnostics) if f.rule == "update-to-data"]
    assert findings and all(verdict in f.message and "0.001" in f.message for f in findings)
    assert any(f.severity == "warning" for f in findings)
    assert {f.layer for f in findings} <= {"0.weight", "2.weight", "5.weight"}  # weight matrices only
    assert all(f.step > 0 for f in findings)  # judged after the first step


def test_a_nan_weight_is_an_error_pointing_at_the_first_layer_it_reaches():
    model = lesson_mlp()
    with torch.no_grad():
        model[2].weight[0, 0] = float("nan")
    findings = find_issues(_inspect(model))
    assert findings[0].rule == "non-finite" and findings[0].severity == "error"
    assert findings[0].layer == "2" and findings[0].step == 0
    assert "the output of '2'" in findings[0].message


def test_every_rule_is_described_and_bad_vocab_sizes_raise():
    assert set(RULES) == {
        "saturation",
        "dead-units",
        "negative-units",
        "initial-loss",
        "update-to-data",
        "vanishing-gradients",
        "exploding-gradients",
        "non-finite",
    }
    with pytest.raises(ValueError, match="vocab_size"):
        find_issues(Diagnostics(), vocab_size=1)


def test_silu_units_negative_everywhere_are_an_observation_not_dead():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.SiLU(), nn.Linear(16, 4))
    with torch.no_grad():
        model[0].bias[:6] = -6.0  # six of sixteen units below zero for every input
    inputs = torch.randn(64, 8) * 0.3
    diagnostics = inspect_model(model, inputs, torch.randint(0, 4, (64,)))
    hidden = model[0](inputs)
    hidden.retain_grad()
    nn.functional.cross_entropy(model[2](model[1](hidden)), torch.randint(0, 4, (64,))).backward()
    assert (hidden.grad[:, :6].abs() > 0).all()  # they do receive gradient: not dead
    assert diagnostics.layers(m.ACT_DEAD) == []
    assert diagnostics.value("1", m.ACT_NEGATIVE, 0) == pytest.approx(6 / 16)
    findings = find_issues(diagnostics)
    assert _rules(findings) == ["negative-units"]
    assert findings[0].severity == "info" and "not dead" in findings[0].message and "SiLU" in findings[0].message


def test_a_relu_with_the_same_units_below_zero_has_dead_units():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    with torch.no_grad():
        model[0].bias[:6] = -6.0
    diagnostics = inspect_model(model, torch.randn(64, 8) * 0.3, torch.randint(0, 4, (64,)))
    assert diagnostics.value("1", m.ACT_DEAD, 0) == pytest.approx(6 / 16)
    assert [f.rule for f in find_issues(diagnostics)] == ["dead-units"]


def test_findings_come_worst_first():
    diagnostics = Diagnostics()
    diagnostics.modules["act"] = _tanh_info("act", 0)
    diagnostics.add_scalar(0, "act", m.ACT_SATURATED, 0.1)  # an observation
    diagnostics.add_scalar(3, "", m.LOSS, float("nan"))  # an error, later
    assert [f.severity for f in find_issues(diagnostics)] == ["error", "info"]
