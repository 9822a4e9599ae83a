"""Weight initialisers written out: gains, fans, Kaiming (He) and Xavier (Glorot), equal to `torch.nn.init`.

Every function draws with `tensor.normal_` / `tensor.uniform_` and the optional `generator`, so for the same
generator state the values are bit-for-bit those of `torch.nn.init`. Weights are shaped (out, in, *kernel):
`fan_in = in * prod(kernel)`, `fan_out = out * prod(kernel)`; a Linear weight (out_features, in_features)
therefore has fan_in = in_features.
"""

import math
import warnings

import torch

_LINEAR_GAIN_NAMES = (
    "linear", "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d",
    "sigmoid",
)
NONLINEARITIES = _LINEAR_GAIN_NAMES + ("tanh", "relu", "leaky_relu", "selu")
FAN_MODES = ("fan_in", "fan_out")
# The weight schemes of normlab.nn.Linear and of the model's `init`/`output_init` (one list for both):
# torch's default U(±1/√fan_in), the lesson's unscaled N(0, 1), N(0, 1/fan_in), Kaiming and Xavier normal.
INIT_SCHEMES = ("torch", "naive", "fan_in", "kaiming", "xavier")
BIAS_INITS = ("uniform", "normal", "zeros")


def calculate_gain(nonlinearity: str, param: float | None = None) -> float:
    """The gain that keeps activations at unit scale through `nonlinearity` (torch.nn.init.calculate_gain).

    linear, conv*, sigmoid: 1; tanh: 5/3; relu: √2; leaky_relu: √(2 / (1 + slope²)) with `param` the negative
    slope (default 0.01); selu: 3/4. Any other name raises ValueError listing the valid ones.
    """
    if nonlinearity in _LINEAR_GAIN_NAMES:
        return 1.0
    if nonlinearity == "tanh":
        return 5.0 / 3
    if nonlinearity == "relu":
        return math.sqrt(2.0)
    if nonlinearity == "leaky_relu":
        if param is None:
            negative_slope = 0.01
        elif isinstance(param, (int, float)) and not isinstance(param, bool):
            negative_slope = param
        else:
            raise ValueError(f"negative_slope {param!r} not a valid number: pass an int or float slope")
        return math.sqrt(2.0 / (1 + negative_slope**2))
    if nonlinearity == "selu":
        return 3.0 / 4
    raise ValueError(f"Unsupported nonlinearity {nonlinearity!r}: use one of {', '.join(NONLINEARITIES)}")


def fan_in_and_fan_out(tensor: torch.Tensor) -> tuple[int, int]:
    """(fan_in, fan_out) of a weight shaped (out, in, *kernel); ValueError for fewer than 2 dimensions."""
    if tensor.dim() < 2:
        raise ValueError(
            "Fan in and fan out can not be computed for tensor with fewer than 2 dimensions "
            f"(got shape {tuple(tensor.shape)}); initialise 1-D tensors with uniform_/normal_/zeros_ instead"
        )
    receptive_field_size = math.prod(tensor.shape[2:])
    return tensor.size(1) * receptive_field_size, tensor.size(0) * receptive_field_size


def _fan(tensor: torch.Tensor, mode: str) -> int:
    mode = mode.lower()
    if mode not in FAN_MODES:
        raise ValueError(f"Mode {mode} not supported, please use one of {list(FAN_MODES)}")
    fan_in, fan_out = fan_in_and_fan_out(tensor)
    return fan_in if mode == "fan_in" else fan_out


def _kaiming_std(tensor: torch.Tensor, a: float, mode: str, nonlinearity: str) -> float:
    return calculate_gain(nonlinearity, a) / math.sqrt(_fan(tensor, mode))


def kaiming_uniform_(
    tensor: torch.Tensor,
    a: float = 0,
    mode: str = "fan_in",
    nonlinearity: str = "leaky_relu",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Fill `tensor` in place from U(-b, b), b = √3 · gain / √fan: He et al. (2015), uniform variant.

    `a` is the negative slope used by `leaky_relu`; `mode` picks fan_in (keeps forward variance) or fan_out
    (keeps backward variance). A tensor with no elements is left alone with a warning, as torch does.
    """
    if 0 in tensor.shape:
        warnings.warn("Initializing zero-element tensors is a no-op", stacklevel=2)
        return tensor
    bound = math.sqrt(3.0) * _kaiming_std(tensor, a, mode, nonlinearity)
    with torch.no_grad():
        return tensor.uniform_(-bound, bound, generator=generator)


def kaiming_normal_(
    tensor: torch.Tensor,
    a: float = 0,
    mode: str = "fan_in",
    nonlinearity: str = "leaky_relu",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Fill `tensor` in place from N(0, std²), std = gain / √fan: He et al. (2015), normal variant.

    Arguments as in `kaiming_uniform_`. A tensor with no elements is left alone with a warning.
    """
    if 0 in tensor.shape:
        warnings.warn("Initializing zero-element tensors is a no-op", stacklevel=2)
        return tensor
    std = _kaiming_std(tensor, a, mode, nonlinearity)
    with torch.no_grad():
        return tensor.normal_(0, std, generator=generator)


def _xavier_std(tensor: torch.Tensor, gain: float) -> float:
    fan_in, fan_out = fan_in_and_fan_out(tensor)
    return gain * math.sqrt(2.0 / float(fan_in + fan_out))


def xavier_uniform_(
    tensor: torch.Tensor, gain: float = 1.0, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Fill `tensor` in place from U(-a, a), a = gain · √(6 / (fan_in + fan_out)): Glorot & Bengio (2010)."""
    bound = math.sqrt(3.0) * _xavier_std(tensor, gain)
    with torch.no_grad():
        return tensor.uniform_(-bound, bound, generator=generator)


def xavier_normal_(
    tensor: torch.Tensor, gain: float = 1.0, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Fill `tensor` in place from N(0, std²), std = gain · √(2 / (fan_in + fan_out)): Glorot & Bengio."""
    std = _xavier_std(tensor, gain)
    with torch.no_grad():
        return tensor.normal_(0.0, std, generator=generator)


def ones_(tensor: torch.Tensor) -> torch.Tensor:
    """Fill `tensor` with ones in place, outside autograd (for normalisation gains)."""
    with torch.no_grad():
        return tensor.fill_(1.0)


def zeros_(tensor: torch.Tensor) -> torch.Tensor:
    """Fill `tensor` with zeros in place, outside autograd (for biases)."""
    with torch.no_grad():
        return tensor.zero_()
