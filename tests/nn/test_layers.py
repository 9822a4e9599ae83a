"""Linear, Embedding, FlattenConsecutive, ReLU/Tanh edge values and Sequential, against torch.nn and closed
forms.

Forward/gradient/state-dict parity of every layer lives in test_parity.py; this file covers initialisation,
the API surface (signatures, indexing) and what has no torch twin.
"""

import inspect
import math
from collections import OrderedDict

import pytest
import torch

from normlab import nn as nnl

# ---- drop-in signatures ------------------------------------------------------------------------------------

TWINS = ["Linear", "Embedding", "BatchNorm1d", "LayerNorm", "GroupNorm", "RMSNorm", "Flatten", "ReLU",
         "Dropout"]


@pytest.mark.parametrize("name", TWINS)
def test_constructor_signature_extends_torchs_with_keyword_only_options(name):
    expected = list(inspect.signature(getattr(torch.nn, name).__init__).parameters.values())
    actual = list(inspect.signature(getattr(nnl, name).__init__).parameters.values())
    assert [(p.name, p.kind, p.default) for p in actual[: len(expected)]] == [
        (p.name, p.kind, p.default) for p in expected
    ]
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in actual[len(expected):])


# ---- Linear ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("in_features, out_features, bias", [(3, 4, True), (10, 1, True), (5, 7, False),
                                                             (0, 3, True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors is a no-op")
def test_linear_default_init_is_torchs_bit_for_bit_under_the_same_seed(in_features, out_features, bias,
                                                                        dtype):
    torch.manual_seed(123)
    expected = torch.nn.Linear(in_features, out_features, bias=bias, dtype=dtype)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    actual = nnl.Linear(in_features, out_features, bias=bias, dtype=dtype)
    assert torch.equal(torch.rand(1), expected_next)  # the same number of draws
    for key, value in expected.state_dict().items():
        assert torch.equal(actual.state_dict()[key], value), key


def _reference_linear(init: str, generator: torch.Generator, nonlinearity: str = "tanh", bias_init: str | None = None
                      ) -> torch.nn.Linear:
    """torch.nn.Linear re-drawn with torch.nn.init as the normlab option documents, weight first."""
    layer = torch.nn.Linear(6, 4)
    weight, bias = layer.weight, layer.bias
    gain = torch.nn.init.calculate_gain(nonlinearity)
    with torch.no_grad():
        if init == "torch":
            torch.nn.init.kaiming_uniform_(weight, a=math.sqrt(5), generator=generator)
        elif init == "kaiming":
            torch.nn.init.kaiming_normal_(weight, nonlinearity=nonlinearity, generator=generator)
        elif init == "fan_in":
            weight.normal_(0.0, 1 / math.sqrt(6), generator=generator)
        elif init == "xavier":
            torch.nn.init.xavier_normal_(weight, gain=gain, generator=generator)
        else:
            weight.normal_(generator=generator)
        bias_init = bias_init or {"torch": "uniform", "naive": "normal"}.get(init, "zeros")
        if bias_init == "uniform":
            torch.nn.init.uniform_(bias, -1 / math.sqrt(6), 1 / math.sqrt(6), generator=generator)
        elif bias_init == "normal":
            bias.normal_(generator=generator)
        else:
            bias.zero_()
    return layer


@pytest.mark.parametrize("init", nnl.init.INIT_SCHEMES)
@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
def test_linear_init_options_equal_their_torch_recipes(init, nonlinearity):
    expected = _reference_linear(init, torch.Generator().manual_seed(5), nonlinearity)
    generator = torch.Generator().manual_seed(5)
    actual = nnl.Linear(6, 4, init=init, nonlinearity=nonlinearity, generator=generator)
    for key, value in expected.state_dict().items():
        assert torch.equal(actual.state_dict()[key], value), key


@pytest.mark.parametrize("bias_init", ["uniform", "normal", "zeros"])
def test_linear_bias_init_overrides_the_schemes_bias(bias_init):
    expected = _reference_linear("kaiming", torch.Generator().manual_seed(5), bias_init=bias_init)
    actual = nnl.Linear(6, 4, init="kaiming", bias_init=bias_init, generator=torch.Generator().manual_seed(5))
    for key, value in expected.state_dict().items():
        assert torch.equal(actual.state_dict()[key], value), key


def test_linear_scales_multiply_the_draws_and_a_zero_bias_scale_gives_positive_zeros():
    plain = nnl.Linear(6, 4, init="naive", generator=torch.Generator().manual_seed(2))
    scaled = nnl.Linear(6, 4, init="naive", weight_scale=0.2, bias_scale=0.0,
                        generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(scaled.weight, plain.weight * 0.2)
    assert torch.equal(scaled.bias, torch.zeros(4)) and not torch.signbit(scaled.bias).any()
    assert repr(scaled) == ("Linear(in_features=6, out_features=4, bias=True, init='naive', weight_scale=0.2, "
                            "bias_scale=0.0)")


def test_linear_kaiming_init_has_the_closed_form_spread():
    layer = nnl.Linear(200, 300, init="kaiming", generator=torch.Generator().manual_seed(0))
    assert layer.weight.std().item() == pytest.approx((5 / 3) / math.sqrt(200), rel=0.02)
    assert not layer.bias.any()


def test_linear_reset_parameters_redraws_from_the_given_generator():
    layer = nnl.Linear(3, 2, init="naive", generator=torch.Generator().manual_seed(1))
    first = layer.weight.detach().clone()
    layer.reset_parameters(torch.Generator().manual_seed(1))
    assert torch.equal(layer.weight, first)


def test_linear_rejects_unknown_init_listing_the_valid_ones():
    with pytest.raises(ValueError, match="'he'.*torch, naive, fan_in, kaiming, xavier"):
        nnl.Linear(3, 2, init="he")


def test_linear_rejects_unknown_nonlinearity():
    with pytest.raises(ValueError, match="'gelu'"):
        nnl.Linear(3, 2, init="kaiming", nonlinearity="gelu")


def test_linear_repr_shows_a_non_default_init():
    assert repr(nnl.Linear(3, 2, init="xavier", nonlinearity="relu")) == (
        "Linear(in_features=3, out_features=2, bias=True, init='xavier', nonlinearity='relu')"
    )


# ---- Embedding ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("padding_idx", [None, 0, -2])
def test_embedding_init_is_torchs_bit_for_bit(padding_idx):
    torch.manual_seed(9)
    expected = torch.nn.Embedding(6, 3, padding_idx=padding_idx)
    torch.manual_seed(9)
    actual = nnl.Embedding(6, 3, padding_idx=padding_idx)
    assert torch.equal(actual.weight, expected.weight)
    assert actual.padding_idx == expected.padding_idx


def test_embedding_draws_from_the_given_generator():
    expected = torch.nn.init.normal_(torch.empty(6, 3), generator=torch.Generator().manual_seed(2))
    actual = nnl.Embedding(6, 3, generator=torch.Generator().manual_seed(2))
    assert torch.equal(actual.weight, expected)


def test_embedding_takes_a_given_weight_and_freeze_like_torch():
    table = torch.randn(4, 2)
    expected = torch.nn.Embedding(4, 2, _weight=table.clone(), _freeze=True)
    actual = nnl.Embedding(4, 2, _weight=table.clone(), _freeze=True)
    assert torch.equal(actual.weight, expected.weight)
    assert actual.weight.requires_grad is expected.weight.requires_grad is False


def test_embedding_looks_up_rows_like_indexing_the_table():
    layer = nnl.Embedding(5, 2, dtype=torch.float64)
    indices = torch.tensor([[4, 0], [2, 2]], dtype=torch.int32)
    assert torch.equal(layer(indices), layer.weight.detach()[indices.long()])
    assert torch.equal(layer(torch.tensor(3)), layer.weight.detach()[3])


@pytest.mark.parametrize("option", [{"max_norm": 1.0}, {"scale_grad_by_freq": True}, {"sparse": True}],
                         ids=lambda option: next(iter(option)))
def test_embedding_options_not_implemented_say_so(option):
    with pytest.raises(NotImplementedError, match=next(iter(option))):
        nnl.Embedding(5, 2, **option)


# ---- FlattenConsecutive ------------------------------------------------------------------------------------


@pytest.mark.parametrize("n, shape", [(2, (3, 8, 4)), (4, (2, 8, 3)), (1, (2, 3, 5)), (3, (2, 6, 1))])
def test_flatten_consecutive_concatenates_n_neighbouring_positions(n, shape):
    x = torch.randn(shape)
    expected = torch.cat([x[:, offset::n, :] for offset in range(n)], dim=-1)  # (B, T/n, C·n)
    assert torch.equal(nnl.FlattenConsecutive(n)(x), expected)


def test_flatten_consecutive_drops_the_position_axis_when_one_is_left():
    x = torch.randn(5, 2, 3)
    assert torch.equal(nnl.FlattenConsecutive(2)(x), torch.cat([x[:, 0], x[:, 1]], dim=-1))  # (5, 6)


def test_flatten_consecutive_names_t_and_n_when_t_is_not_divisible():
    with pytest.raises(ValueError, match=r"T=5 and n=2"):
        nnl.FlattenConsecutive(2)(torch.randn(3, 5, 4))


def test_flatten_consecutive_wants_three_axes():
    with pytest.raises(ValueError, match=r"\(B, T, C\).*\(3, 4\)"):
        nnl.FlattenConsecutive(2)(torch.randn(3, 4))


@pytest.mark.parametrize("n, error", [(0, ValueError), (-2, ValueError), (1.5, TypeError), (True, TypeError)])
def test_flatten_consecutive_rejects_a_bad_group_size(n, error):
    with pytest.raises(error, match="n"):
        nnl.FlattenConsecutive(n)


def test_flatten_consecutive_repr():
    assert repr(nnl.FlattenConsecutive(2)) == "FlattenConsecutive(n=2)"


# ---- activations at edge values ----------------------------------------------------------------------------

EDGES = [-2.0, -0.0, 0.0, 1e-30, 3.0, float("nan"), float("inf"), -float("inf")]


@pytest.mark.parametrize("name, kwargs", [("ReLU", {}), ("ReLU", {"inplace": True}), ("Tanh", {})])
def test_activation_values_and_gradients_at_edges_equal_torchs(name, kwargs):
    results = []
    for namespace in (torch.nn, nnl):
        leaf = torch.tensor(EDGES, requires_grad=True)
        output = getattr(namespace, name)(**kwargs)(leaf * 1)
        output.backward(torch.ones_like(output))
        results.append((output.detach(), leaf.grad))
    (expected, expected_grad), (actual, actual_grad) = results
    torch.testing.assert_close(actual, expected, equal_nan=True, atol=0, rtol=0)
    torch.testing.assert_close(actual_grad, expected_grad, equal_nan=True, atol=0, rtol=0)


def test_relu_inplace_overwrites_its_input():
    x = torch.tensor([-1.0, 2.0])
    assert nnl.ReLU(inplace=True)(x) is x and x.tolist() == [0.0, 2.0]


# ---- Sequential --------------------------------------------------------------------------------------------


def _stacks():
    return [namespace.Sequential(namespace.Linear(2, 3), namespace.Tanh(), namespace.Linear(3, 1))
            for namespace in (torch.nn, nnl)]


@pytest.mark.parametrize("index", [0, 2, -1, -3])
def test_sequential_int_index_picks_the_same_layer_as_torch(index):
    expected, actual = _stacks()
    assert type(actual[index]).__name__ == type(expected[index]).__name__
    assert actual[index] is list(actual)[index]


@pytest.mark.parametrize("index", [slice(1, None), slice(None, None, 2), slice(-2, None), slice(5, 9)],
                         ids=str)
def test_sequential_slice_is_a_sequential_with_torchs_keys(index):
    expected, actual = _stacks()
    assert type(actual[index]) is nnl.Sequential
    assert list(actual[index].state_dict()) == list(expected[index].state_dict())
    assert repr(actual[index]) == repr(expected[index])


def test_sequential_len_iteration_and_append_like_torch():
    expected, actual = _stacks()
    assert len(actual) == len(expected) == 3
    assert [type(m).__name__ for m in actual] == [type(m).__name__ for m in expected]
    assert actual.append(nnl.ReLU()) is actual
    assert len(actual) == 4 and list(actual.state_dict()) == list(expected.state_dict())


def test_sequential_of_named_layers_keeps_the_names():
    layers = OrderedDict([("hidden", nnl.Linear(2, 3)), ("act", nnl.Tanh())])
    assert list(nnl.Sequential(layers).state_dict()) == ["hidden.weight", "hidden.bias"]


def test_sequential_applies_layers_in_order():
    first, second = nnl.Linear(2, 3), nnl.Linear(3, 1)
    x = torch.randn(4, 2)
    torch.testing.assert_close(nnl.Sequential(first, nnl.Tanh(), second)(x), second(torch.tanh(first(x))))
