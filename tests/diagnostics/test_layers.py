"""Layer classification by class name, and module selection."""

import pytest
import torch
from torch import nn

from normlab.diagnostics.layers import ACTIVATION, EMBEDDING, LINEAR, NORM, OTHER, classify, select_modules

from .models import lesson_mlp


@pytest.mark.parametrize(
    ("module", "family", "bound", "relu_like"),
    [
        (nn.Tanh(), ACTIVATION, "tanh", False),
        (nn.Sigmoid(), ACTIVATION, "sigmoid", False),
        (nn.ReLU(), ACTIVATION, None, True),
        (nn.ReLU6(), ACTIVATION, None, True),  # a subclass of Hardtanh in torch, but ReLU-like
        (nn.GELU(), ACTIVATION, None, True),
        (nn.SiLU(), ACTIVATION, None, True),
        (nn.Linear(2, 2), LINEAR, None, False),
        (nn.MultiheadAttention(4, 1).out_proj, LINEAR, None, False),  # NonDynamicallyQuantizableLinear
        (nn.Embedding(3, 2), EMBEDDING, None, False),
        (nn.BatchNorm1d(2), NORM, None, False),
        (nn.LayerNorm(2), NORM, None, False),
        (nn.GroupNorm(1, 2), NORM, None, False),
        (nn.RMSNorm(2), NORM, None, False),
        (nn.Dropout(), OTHER, None, False),
    ],
)
def test_torch_layers_are_classified_by_class_name(module, family, bound, relu_like):
    kind = classify(module)
    assert (kind.family, kind.bound, kind.relu_like) == (family, bound, relu_like)


def test_a_users_own_class_with_a_known_name_is_recognised():
    class Tanh(nn.Module):  # not a torch.nn.Tanh: only the name matches
        def forward(self, x):
            return torch.tanh(x)

    class MaskedLinear(nn.Linear):
        pass

    assert classify(Tanh()).bound == "tanh"
    assert classify(MaskedLinear(2, 2)).family == LINEAR


def test_default_selection_is_activations_linear_embedding_and_norm_layers():
    names = [name for name, _, _ in select_modules(lesson_mlp())]
    assert names == ["0", "2", "3", "4", "5"]  # Flatten ("1") and the Sequential itself are left out


@pytest.mark.parametrize(
    ("include", "expected"),
    [
        ([nn.Tanh], ["4"]),
        (["Linear"], ["2", "5"]),
        (["[23]"], ["2", "3"]),
        (["Tanh", nn.Embedding], ["0", "4"]),
    ],
)
def test_include_by_type_type_name_or_glob(include, expected):
    assert [name for name, _, _ in select_modules(lesson_mlp(), include=include)] == expected


def test_exclude_removes_from_the_default_selection():
    names = [name for name, _, _ in select_modules(lesson_mlp(), exclude=["BatchNorm1d", "5"])]
    assert names == ["0", "2", "4"]


def test_an_include_item_matching_nothing_raises_with_its_name():
    with pytest.raises(ValueError, match="'Tahn'"):
        select_modules(lesson_mlp(), include=["Tahn"])


def test_bad_include_items_and_models_raise():
    with pytest.raises(TypeError, match="include items"):
        select_modules(lesson_mlp(), include=[3])
    with pytest.raises(TypeError, match="torch.nn.Module"):
        select_modules("not a model")
    with pytest.raises(ValueError, match="no module"):
        select_modules(lesson_mlp(), exclude=["*"])
