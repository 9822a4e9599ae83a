"""inspect_model: one forward and backward pass at initialisation, leaving the model as it was."""

import copy

import pytest
import torch
import torch.nn.functional as F

from normlab.diagnostics import format_layer_table, inspect_model
from normlab.diagnostics import metrics as m

from .models import batch, lesson_mlp


def test_inspect_leaves_buffers_and_gradients_unchanged():
    model = lesson_mlp()
    model[2].weight.grad = torch.full_like(model[2].weight, 7.0)
    before = copy.deepcopy(model.state_dict())
    diagnostics = inspect_model(model, *batch())
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name  # running statistics included
    assert torch.equal(model[2].weight.grad, torch.full_like(model[2].weight, 7.0))
    assert model[5].weight.grad is None
    assert diagnostics.steps() == [0]


def test_inspect_records_the_loss_of_one_forward_pass():
    model = lesson_mlp()
    inputs, targets = batch()
    expected = F.cross_entropy(copy.deepcopy(model)(inputs), targets).item()
    assert inspect_model(model, inputs, targets).value("", m.LOSS, 0) == pytest.approx(expected)


def test_layer_table_has_one_row_per_recorded_module_with_its_numbers():
    diagnostics = inspect_model(lesson_mlp(), *batch())
    lines = format_layer_table(diagnostics).splitlines()
    assert lines[0].split()[:4] == ["layer", "type", "act", "mean"]
    assert [line.split()[:2] for line in lines[2:]] == [
        ["0", "Embedding"],
        ["2", "Linear"],
        ["3", "BatchNorm1d"],
        ["4", "Tanh"],
        ["5", "Linear"],
    ]
    tanh = lines[5].split()
    assert tanh[3] == f"{diagnostics.value('4', m.ACT_STD, 0):.3f}"
    assert tanh[4] == f"{100 * diagnostics.value('4', m.ACT_SATURATED, 0):.1f}%"
    assert lines[3].split()[-1] == f"{diagnostics.value('2.weight', m.GRAD_TO_DATA, 0):.2e}"
    assert format_layer_table(type(diagnostics)()) == "no diagnostics recorded"
