"""Layer-wise normalisation layers with the math written out, equal to torch 2.13's: LayerNorm, GroupNorm,
RMSNorm; and the dtype, shape and batch-size checks every normalisation layer of normlab.nn shares.

Every layer normalises as y = (x − mean) / √(var + ε) · γ + β (RMSNorm: y = x / √(mean(x²) + ε) · γ), with the
biased variance, over the axes its name says. Statistics are computed in the input's dtype, except float16 and
bfloat16 input, computed in float32 and cast back, as torch does on CPU. Parameter names, shapes, dtypes and
registration order are torch's, so state dicts load both ways; bad input raises the exception type torch raises.
The batch norms live in `batchnorm.py` (and their variants in `ghost.py`, `renorm.py`, `sync.py`).
"""

import math
import numbers

import torch
from torch import nn
from torch.types import Device

from normlab.nn import init
from normlab.nn.functional import per_channel

_REDUCED_PRECISION = (torch.float16, torch.bfloat16)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype statistics are computed in: float32 for float16/bfloat16 input, else the input's dtype."""
    return torch.float32 if dtype in _REDUCED_PRECISION else dtype


def _check_floating(input: torch.Tensor, op: str) -> None:
    if not input.is_floating_point():
        raise NotImplementedError(
            f'"{op}" not implemented for {input.dtype} input: pass floating-point input, e.g. input.float()'
        )


def _check_same_dtype(input: torch.Tensor, *tensors: torch.Tensor | None) -> None:
    """Parameters and buffers must share the input's dtype (float32 ones may serve float16/bfloat16 input)."""
    for tensor in tensors:
        if tensor is None or tensor.dtype == input.dtype:
            continue
        if input.dtype in _REDUCED_PRECISION and tensor.dtype == torch.float32:
            continue
        raise RuntimeError(
            f"mixed dtype: the input is {input.dtype} but the layer's parameters/buffers are {tensor.dtype}; "
            f"convert one of them, e.g. layer.to({input.dtype}) or input.to({tensor.dtype})"
        )


def _verify_batch_size(size: list[int]) -> None:
    """torch's check that training sees more than one value per channel: size[0] · prod(size[2:]) != 1."""
    if size[0] * math.prod(size[2:]) == 1:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input size {size}: "
            "batch statistics of a single value are undefined; use a batch of at least 2 or call .eval()"
        )


def _as_shape(normalized_shape: int | list[int] | torch.Size) -> tuple[int, ...]:
    if isinstance(normalized_shape, numbers.Integral):
        return (int(normalized_shape),)
    return tuple(normalized_shape)


def _check_trailing_shape(input: torch.Tensor, normalized_shape: tuple[int, ...]) -> None:
    if not normalized_shape:
        raise RuntimeError(
            "Expected normalized_shape to be at least 1-dimensional, i.e., containing at least one element, "
            f"but got normalized_shape = {list(normalized_shape)}; pass the size(s) of the last axis/axes"
        )
    if tuple(input.shape[-len(normalized_shape):]) != normalized_shape:  # also when input has fewer axes
        raise RuntimeError(
            f"Given normalized_shape={list(normalized_shape)}, expected input with shape "
            f"[*, {', '.join(map(str, normalized_shape))}], but got input of size {list(input.shape)}"
        )


def _register_affine(module: nn.Module, shape: tuple[int, ...], affine: bool, bias: bool, factory: dict
                     ) -> None:
    """Register γ (`weight`) and β (`bias`) of `shape`, or None in their place, in torch's order."""
    module.register_parameter("weight", nn.Parameter(torch.empty(shape, **factory)) if affine else None)
    has_bias = affine and bias
    module.register_parameter("bias", nn.Parameter(torch.empty(shape, **factory)) if has_bias else None)


def _reset_affine(module: nn.Module) -> None:
    """γ to 1 and β to 0, for those the module has."""
    if module.weight is not None:
        init.ones_(module.weight)
    if getattr(module, "bias", None) is not None:
        init.zeros_(module.bias)


class LayerNorm(nn.Module):
    """Layer normalisation over the trailing `normalized_shape` axes, equal to torch.nn.LayerNorm.

    Each sample is normalised by its own mean and biased variance over those axes, in training and eval alike;
    γ (`weight`) and β (`bias`) have shape `normalized_shape`.
    """

    normalized_shape: tuple[int, ...]
    eps: float
    elementwise_affine: bool

    def __init__(self, normalized_shape: int | list[int] | torch.Size, eps: float = 1e-5,
                 elementwise_affine: bool = True, bias: bool = True, device: Device = None,
                 dtype: torch.dtype | None = None) -> None:
        factory_kwargs = {"device": device, "dtype": dtype}
        super().__init__()
        self.normalized_shape = _as_shape(normalized_shape)
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        _register_affine(self, self.normalized_shape, elementwise_affine, bias, factory_kwargs)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """γ to 1 and β to 0."""
        _reset_affine(self)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """Normalise (*, *normalized_shape) input over its trailing axes."""
        _check_trailing_shape(input, self.normalized_shape)
        _check_same_dtype(input, self.weight, self.bias)
        _check_floating(input, "layer_norm")
        x = input.to(_compute_dtype(input.dtype))
        dims = tuple(range(-len(self.normalized_shape), 0))
        mean = x.mean(dims, keepdim=True)  # (*, 1, ..., 1)
        var = (x - mean).square().mean(dims, keepdim=True)  # biased
        output = (x - mean) * torch.rsqrt(var + self.eps)
        if self.weight is not None:
            output = output * self.weight
        if self.bias is not None:
            output = output + self.bias
        return output.to(input.dtype)

    def extra_repr(self) -> str:
        """torch's description: shape, eps, elementwise_affine, bias."""
        return (
            f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}, "
            f"bias={self.bias is not None}"
        )


class GroupNorm(nn.Module):
    """Group normalisation of (N, C, *) input, equal to torch.nn.GroupNorm.

    The C channels are split into `num_groups` groups of C / num_groups consecutive channels; each sample is
    normalised by the mean and biased variance of each of its groups (channels and trailing axes together),
    in training and eval alike. γ and β are per channel, (C,).
    """

    num_groups: int
    num_channels: int
    eps: float
    affine: bool

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True,
                 device: Device = None, dtype: torch.dtype | None = None, *,
                 bias: bool = True) -> None:
        factory_kwargs = {"device": device, "dtype": dtype}
        super().__init__()
        if num_channels % num_groups != 0:
            raise ValueError(
                f"num_channels ({num_channels}) must be divisible by num_groups ({num_groups}): "
                "pick a number of groups that divides the channels"
            )
        self.num_groups = num_groups
        self.num_channels = num_channels
        self.eps = eps
        self.affine = affine
        _register_affine(self, (num_channels,), affine, bias, factory_kwargs)  # γ, β: (C,)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """γ to 1 and β to 0."""
        _reset_affine(self)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """Normalise (N, C, *) input per sample and group of channels."""
        self._check_input(input)
        x = input.to(_compute_dtype(input.dtype))
        batch, channels = x.shape[:2]
        grouped = x.reshape(batch, self.num_groups, channels // self.num_groups * math.prod(x.shape[2:]))
        mean = grouped.mean(-1, keepdim=True)  # (N, G, 1)
        var = (grouped - mean).square().mean(-1, keepdim=True)  # (N, G, 1), biased
        output = ((grouped - mean) * torch.rsqrt(var + self.eps)).reshape(x.shape)
        if self.weight is not None:
            output = output * per_channel(self.weight, x)
        if self.bias is not None:
            output = output + per_channel(self.bias, x)
        return output.to(input.dtype)

    def _check_input(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise RuntimeError(
                f"Expected at least 2 dimensions for input tensor but received {input.dim()}: pass (N, C, *)"
            )
        if self.num_groups <= 0:
            raise RuntimeError(f"Expected num groups to be greater than 0, got {self.num_groups}")
        batch, channels = input.shape[:2]
        _verify_batch_size([batch * channels // self.num_groups, self.num_groups, *input.shape[2:]])
        if input.size(1) % self.num_groups:
            raise RuntimeError(
                "Expected number of channels in input to be divisible by num_groups, but got input of shape "
                f"{list(input.shape)} and num_groups={self.num_groups}"
            )
        for name, tensor in (("weight", self.weight), ("bias", self.bias)):
            if tensor is not None and tensor.numel() != input.size(1):
                raise RuntimeError(
                    f"Expected {name} to be a vector of size equal to the number of channels in input, but "
                    f"got {name} of shape {list(tensor.shape)} and input of shape {list(input.shape)}"
                )
        _check_same_dtype(input, self.weight, self.bias)
        _check_floating(input, "group_norm")

    def extra_repr(self) -> str:
        """torch's description: groups, channels, eps, affine, bias."""
        return (
            f"{self.num_groups}, {self.num_channels}, eps={self.eps}, affine={self.affine}, "
            f"bias={self.bias is not None}"
        )


class RMSNorm(nn.Module):
    """Root-mean-square normalisation over the trailing `normalized_shape` axes, equal to torch.nn.RMSNorm.

    y = x / √(mean(x²) + ε) · γ, without centring and without β. `eps=None` means the machine epsilon of the
    compute dtype: float32's for float16, bfloat16 and float32 input, float64's for float64 input.
    """

    normalized_shape: tuple[int, ...]
    eps: float | None
    elementwise_affine: bool

    def __init__(self, normalized_shape: int | list[int] | torch.Size, eps: float | None = None,
                 elementwise_affine: bool = True, device: Device = None,
                 dtype: torch.dtype | None = None) -> None:
        factory_kwargs = {"device": device, "dtype": dtype}
        super().__init__()
        self.normalized_shape = _as_shape(normalized_shape)
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        weight = torch.empty(self.normalized_shape, **factory_kwargs) if elementwise_affine else None
        self.register_parameter("weight", None if weight is None else nn.Parameter(weight))  # γ, no β
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """γ to 1."""
        _reset_affine(self)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """Scale (*, *normalized_shape) input by the inverse RMS of its trailing axes."""
        if self.normalized_shape and input.dim() < len(self.normalized_shape):
            raise ValueError(
                f"Input tensor must have at least {len(self.normalized_shape)} dimensions, but got "
                f"{input.dim()}: RMSNorm({self.normalized_shape}) normalises the trailing axes"
            )
        _check_trailing_shape(input, self.normalized_shape)
        _check_floating(input, "rms_norm")
        compute_dtype = _compute_dtype(input.dtype)
        eps = torch.finfo(compute_dtype).eps if self.eps is None else self.eps
        x = input.to(compute_dtype)
        dims = tuple(range(-len(self.normalized_shape), 0))
        output = x * torch.rsqrt(x.square().mean(dims, keepdim=True) + eps)
        if self.weight is not None:
            output = output * self.weight
        return output.to(input.dtype)

    def extra_repr(self) -> str:
        """torch's description: shape, eps, elementwise_affine."""
        return f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}"
