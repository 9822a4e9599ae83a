"""Layer classification by class name, and module selection."""

import pytest
import torch
from torch import nn

from normlab.diagnostics.layers import (
    ACTIVATION,
    ATTENTION,
    CONV,
    EMBEDDING,
    LINEAR,
    NORM,
    OTHER,
    POOL,
    RECURRENT,
    classify,
    select_modules,
)

from .models import lesson_mlp


@pytest.mark.parametrize(
    ("module", "family", "bound", "relu_like"),
    [
        (nn.Tanh(), ACTIVATION, "tanh", False),
        (nn.Sigmoid(), ACTIVATION, "sigmoid", False),
        (nn.ReLU(), ACTIVATION, None, True),
        (nn.ReLU6(), ACTIVATION, None, True),  # a subclass of Hardtanh in torch, but ReLU-like
        (nn.GELU(), ACTIVATION, None, True),  # ReLU-like, with a soft gate (see below)
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


def test_relu_and_relu6_have_hard_gates_and_the_smooth_ones_soft_gates():
    assert [classify(module).gate for module in (nn.ReLU(), nn.ReLU6())] == ["hard", "hard"]
    soft = (nn.GELU(), nn.SiLU(), nn.Mish(), nn.ELU(), nn.LeakyReLU(), nn.PReLU(), nn.SELU(), nn.Hardswish())
    assert {classify(module).gate for module in soft} == {"soft"}


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


@pytest.mark.parametrize(
    ("name", "family", "gate", "bound"),
    [
        ("NewGELUActivation", ACTIVATION, "soft", None),  # transformers' GPT-2 activation
        ("SiLUActivation", ACTIVATION, "soft", None),
        ("FastGELU", ACTIVATION, "soft", None),
        ("MyReLU", ACTIVATION, "hard", None),
        ("ScaledTanh", ACTIVATION, None, "tanh"),
        ("LinearActivation", ACTIVATION, None, None),
        ("TanhAttentionBlock", OTHER, None, None),  # a name merely containing one is not an activation
    ],
)
def test_other_libraries_activations_are_recognised_by_how_their_name_ends(name, family, gate, bound):
    module = type(name, (nn.Module,), {"forward": lambda self, x: x})()
    kind = classify(module)
    assert (kind.family, kind.gate, kind.bound) == (family, gate, bound)


@pytest.mark.parametrize(
    ("module", "family", "axis"),
    [
        (nn.Conv1d(2, 2, 1), CONV, 1),
        (nn.ConvTranspose2d(2, 2, 1), CONV, 1),
        (nn.BatchNorm2d(2), NORM, 1),
        (nn.GroupNorm(1, 2), NORM, 1),
        (nn.LayerNorm(2), NORM, -1),
        (nn.MaxPool1d(2), POOL, 1),
        (nn.GRU(2, 2), RECURRENT, -1),
        (nn.MultiheadAttention(4, 1), ATTENTION, -1),
        (nn.Linear(2, 2), LINEAR, -1),
        (nn.ReLU(), ACTIVATION, None),
    ],
)
def test_unit_axes_are_channels_for_conv_norm_and_pool_outputs_and_features_otherwise(module, family, axis):
    kind = classify(module)
    assert (kind.family, kind.unit_axis) == (family, axis)


def test_default_selection_covers_every_module_owning_parameters():
    class Scaled(nn.Module):  # a user's module with its own parameter and an unknown name
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(2))
            self.inner = nn.Dropout()

        def forward(self, x):
            return self.inner(x) * self.scale

    model = nn.Sequential(nn.Conv1d(1, 2, 1), nn.GRU(2, 2), Scaled(), nn.Dropout())
    assert [name for name, _, _ in select_modules(model)] == ["0", "1", "2"]
