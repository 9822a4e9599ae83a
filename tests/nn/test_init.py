"""normlab.nn.init against torch.nn.init: the same gains, fans, draws (bit for bit) and errors."""

import math
import warnings

import pytest
import torch

from normlab.nn import init

NONLINEARITIES = ["linear", "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d",
                  "conv_transpose3d", "sigmoid", "tanh", "relu", "leaky_relu", "selu"]


@pytest.mark.parametrize("nonlinearity", NONLINEARITIES)
def test_calculate_gain_matches_torch(nonlinearity):
    assert init.calculate_gain(nonlinearity) == torch.nn.init.calculate_gain(nonlinearity)


@pytest.mark.parametrize("nonlinearity, param, gain", [
    ("linear", None, 1.0), ("sigmoid", None, 1.0), ("tanh", None, 5 / 3), ("relu", None, math.sqrt(2)),
    ("leaky_relu", None, math.sqrt(2 / (1 + 0.01**2))), ("leaky_relu", 0.2, math.sqrt(2 / 1.04)),
    ("leaky_relu", 1, 1.0), ("selu", None, 0.75),
])
def test_calculate_gain_closed_forms(nonlinearity, param, gain):
    assert init.calculate_gain(nonlinearity, param) == pytest.approx(gain, rel=1e-15)
    assert init.calculate_gain(nonlinearity, param) == torch.nn.init.calculate_gain(nonlinearity, param)


@pytest.mark.parametrize("shape", [(3, 5), (4, 3, 5), (2, 3, 4, 5), (1, 1), (0, 3)], ids=str)
def test_fan_in_and_fan_out_match_torch(shape):
    tensor = torch.empty(shape)
    assert init.fan_in_and_fan_out(tensor) == torch.nn.init._calculate_fan_in_and_fan_out(tensor)


def test_fan_of_a_linear_weight_is_in_then_out_features():
    assert init.fan_in_and_fan_out(torch.empty(7, 3)) == (3, 7)  # (out_features, in_features)
    assert init.fan_in_and_fan_out(torch.empty(4, 3, 5)) == (15, 20)  # conv: in·k, out·k


DRAWS = [
    ("kaiming_uniform_", {}),
    ("kaiming_uniform_", {"a": math.sqrt(5)}),
    ("kaiming_uniform_", {"mode": "fan_out", "nonlinearity": "relu"}),
    ("kaiming_uniform_", {"mode": "FAN_IN", "nonlinearity": "tanh"}),
    ("kaiming_normal_", {}),
    ("kaiming_normal_", {"a": 0.2, "mode": "fan_out"}),
    ("kaiming_normal_", {"nonlinearity": "tanh"}),
    ("xavier_uniform_", {}),
    ("xavier_uniform_", {"gain": 5 / 3}),
    ("xavier_normal_", {}),
    ("xavier_normal_", {"gain": math.sqrt(2)}),
]


@pytest.mark.parametrize("shape", [(30, 20), (8, 4, 3)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("name, kwargs", DRAWS, ids=[f"{n}-{k}" for n, k in DRAWS])
def test_draws_equal_torch_bit_for_bit_for_the_same_generator(name, kwargs, shape, dtype):
    expected = getattr(torch.nn.init, name)(torch.empty(shape, dtype=dtype), **kwargs,
                                            generator=torch.Generator().manual_seed(4))
    actual = getattr(init, name)(torch.empty(shape, dtype=dtype), **kwargs,
                                 generator=torch.Generator().manual_seed(4))
    assert torch.equal(actual, expected)


@pytest.mark.parametrize("name, kwargs", DRAWS[:1] + DRAWS[4:5] + DRAWS[7:8] + DRAWS[9:10])
def test_draws_equal_torch_under_the_same_global_seed(name, kwargs):
    torch.manual_seed(11)
    expected = getattr(torch.nn.init, name)(torch.empty(6, 5), **kwargs)
    torch.manual_seed(11)
    actual = getattr(init, name)(torch.empty(6, 5), **kwargs)
    assert torch.equal(actual, expected)


def test_kaiming_normal_has_the_closed_form_spread():
    weight = init.kaiming_normal_(torch.empty(400, 100), nonlinearity="tanh",
                                  generator=torch.Generator().manual_seed(0))
    assert weight.std().item() == pytest.approx((5 / 3) / math.sqrt(100), rel=0.02)


def test_draws_happen_outside_autograd():
    weight = torch.nn.Parameter(torch.empty(4, 3))
    for name, kwargs in DRAWS:
        assert getattr(init, name)(weight, **kwargs) is weight
    assert init.zeros_(weight) is weight and weight.grad_fn is None


def test_zeros_and_ones_fill_in_place_like_torch():
    assert torch.equal(init.zeros_(torch.randn(3, 2)), torch.nn.init.zeros_(torch.randn(3, 2)))
    assert torch.equal(init.ones_(torch.randn(3)), torch.nn.init.ones_(torch.randn(3)))


@pytest.mark.parametrize("name", ["kaiming_uniform_", "kaiming_normal_"])
def test_zero_element_tensor_is_left_alone_with_a_warning_like_torch(name):
    for module in (torch.nn.init, init):
        with pytest.warns(UserWarning, match="zero-element"):
            assert getattr(module, name)(torch.empty(0, 3)).shape == (0, 3)


BAD_CALLS = {
    "unknown-nonlinearity": lambda init: init.calculate_gain("swish"),
    "leaky-slope-not-a-number": lambda init: init.calculate_gain("leaky_relu", "0.2"),
    "leaky-slope-bool": lambda init: init.calculate_gain("leaky_relu", True),
    "fan-of-a-vector": lambda init: init.xavier_uniform_(torch.empty(5)),
    "kaiming-of-a-vector": lambda init: init.kaiming_normal_(torch.empty(5)),
    "unknown-mode": lambda init: init.kaiming_uniform_(torch.empty(3, 2), mode="fan_avg"),
    "kaiming-unknown-nonlinearity": lambda init: init.kaiming_normal_(torch.empty(3, 2), nonlinearity="gelu"),
    "xavier-of-an-empty-matrix": lambda init: init.xavier_normal_(torch.empty(0, 0)),
}


@pytest.mark.parametrize("call", BAD_CALLS.values(), ids=BAD_CALLS.keys())
def test_bad_calls_raise_the_exception_type_torch_raises(call):
    with pytest.raises(Exception) as expected:
        call(torch.nn.init)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(expected.type):
            call(init)


def test_fan_error_names_the_shape_and_the_fix():
    with pytest.raises(ValueError, match=r"fewer than 2 dimensions \(got shape \(5,\)\)"):
        init.fan_in_and_fan_out(torch.empty(5))


def test_unknown_nonlinearity_error_lists_the_valid_names():
    with pytest.raises(ValueError, match="'swish'.*tanh, relu, leaky_relu, selu"):
        init.calculate_gain("swish")
