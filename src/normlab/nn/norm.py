"""Normalisation layers with the math written out, equal to torch 2.13's: BatchNorm1d, LayerNorm, GroupNorm,
RMSNorm.

Every layer normalises as y = (x − mean) / √(var + ε) · γ + β (RMSNorm: y = x / √(mean(x²) + ε) · γ), with the
biased variance, over the axes its name says. Statistics are computed in the input's dtype, except float16 and
bfloat16 input, computed in float32 and cast back, as torch does on CPU. Parameter and buffer names, shapes,
dtypes and registration order are torch's, so state dicts load both ways; bad input raises the exception type
torch raises. Unlike the lesson's BatchNorm1d, the variance used to normalise is the biased one (torch's); the
unbiased one goes into `running_var`.
"""

import math
import numbers

import torch
from torch import nn
from torch.types import Device

from normlab.nn import init
from normlab.nn.functional import batch_norm_train, per_channel, reduction_dims

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


class _NormBase(nn.Module):
    """Parameters, running-statistics buffers, resets, repr and state-dict versioning of batch norms."""

    _version = 2  # version 2 added num_batches_tracked; older state dicts without it keep the layer's count
    num_features: int
    eps: float
    momentum: float | None
    affine: bool
    track_running_stats: bool

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, device: Device = None,
                 dtype: torch.dtype | None = None, *, bias: bool = True) -> None:
        factory_kwargs = {"device": device, "dtype": dtype}
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        _register_affine(self, (num_features,), affine, bias, factory_kwargs)  # γ, β: (C,)
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, **factory_kwargs))
            self.register_buffer("running_var", torch.ones(num_features, **factory_kwargs))
            self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)
        self.reset_parameters()

    def reset_running_stats(self) -> None:
        """Running mean 0, running variance 1, batch count 0 (when running statistics are tracked)."""
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_var.fill_(1)
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        """Reset the running statistics, then γ to 1 and β to 0."""
        self.reset_running_stats()
        _reset_affine(self)

    def _check_input_dim(self, input: torch.Tensor) -> None:
        raise NotImplementedError(f"{type(self).__name__} must say which input ranks it accepts")

    def extra_repr(self) -> str:
        """torch's description: features, eps, momentum, affine, bias, track_running_stats."""
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
            f"bias={self.bias is not None}, track_running_stats={self.track_running_stats}"
        )

    def _load_from_state_dict(self, state_dict: dict, prefix: str, local_metadata: dict, strict: bool,
                              missing_keys: list[str], unexpected_keys: list[str],
                              error_msgs: list[str]) -> None:
        version = local_metadata.get("version")
        if (version is None or version < 2) and self.track_running_stats:
            # state dicts older than version 2 have no num_batches_tracked: keep ours, or start from 0
            key = prefix + "num_batches_tracked"
            if key not in state_dict:
                state_dict[key] = (
                    self.num_batches_tracked
                    if self.num_batches_tracked is not None and self.num_batches_tracked.device.type != "meta"
                    else torch.tensor(0, dtype=torch.long)
                )
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)


class _BatchNorm(_NormBase):
    """Batch norm over every axis but the channel axis 1; subclasses only say which input ranks they take.

    Training normalises with the batch mean and biased variance and folds the batch into the running
    statistics (unbiased variance); eval normalises with the running statistics, or with batch statistics when
    there are none (`track_running_stats=False`). `momentum=None` makes the running statistics a cumulative
    average over `num_batches_tracked` batches. `closed_form_backward=True` trains through
    `normlab.nn.functional.batch_norm_train`, whose backward is derived by hand.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, device: Device = None,
                 dtype: torch.dtype | None = None, *, bias: bool = True,
                 closed_form_backward: bool = False) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias)
        self.closed_form_backward = closed_form_backward

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """Normalise `input` per channel; in training mode also update the running statistics."""
        self._check_input_dim(input)
        momentum = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            # counted before the batch is checked, as torch does: a rejected batch still advances the count
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                momentum = 1.0 / float(self.num_batches_tracked)
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        # the buffers take part in eval, and in training only when tracked (then they are updated)
        running_mean = self.running_mean if not self.training or self.track_running_stats else None
        running_var = self.running_var if not self.training or self.track_running_stats else None
        self._check_batch(input, use_batch_stats, running_mean, running_var)

        x = input.to(_compute_dtype(input.dtype))  # (N, C) or (N, C, L)
        if not use_batch_stats:
            return self._normalize(x, running_mean, running_var).to(input.dtype)
        if self.closed_form_backward:
            output, mean, var = batch_norm_train(x, self.weight, self.bias, self.eps)
        else:
            dims = reduction_dims(x)
            mean = x.mean(dims)  # (C,)
            var = (x - per_channel(mean, x)).square().mean(dims)  # (C,), biased
            output = self._normalize(x, mean, var)
        n = math.prod(x.shape[d] for d in reduction_dims(x))  # values per channel
        if running_mean is not None and n > 0:  # an empty batch leaves the running statistics alone
            with torch.no_grad():
                running_mean.copy_(momentum * mean + (1 - momentum) * running_mean)
                running_var.copy_(momentum * var * n / (n - 1) + (1 - momentum) * running_var)
        return output.to(input.dtype)

    def _normalize(self, x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
        """(x − μ) / √(σ² + ε) · γ + β with per-channel (C,) statistics broadcast over x."""
        output = (x - per_channel(mean, x)) * per_channel(torch.rsqrt(var + self.eps), x)
        if self.weight is not None:
            output = output * per_channel(self.weight, x)
        if self.bias is not None:
            output = output + per_channel(self.bias, x)
        return output

    def _check_batch(self, input: torch.Tensor, use_batch_stats: bool, running_mean: torch.Tensor | None,
                     running_var: torch.Tensor | None) -> None:
        """torch's checks, in torch's order: batch size, eps, dtypes, buffers present, channel counts."""
        if use_batch_stats:
            _verify_batch_size(list(input.shape))
            if self.eps <= 0.0:
                raise ValueError(
                    f"batch_norm eps must be positive during training, but got {self.eps}: use e.g. eps=1e-5"
                )
        elif self.eps < 0.0:
            raise ValueError(f"batch_norm eps must be non-negative, but got {self.eps}: use e.g. eps=1e-5")
        _check_floating(input, "batch_norm")
        _check_same_dtype(input, self.weight, self.bias, running_mean, running_var)
        if use_batch_stats and (running_mean is None) != (running_var is None):
            raise ValueError(
                "running_mean and running_var must either both be None or neither be None; "
                "call reset_running_stats() on a layer built with track_running_stats=True"
            )
        if not use_batch_stats and (running_mean is None or running_var is None):
            raise RuntimeError("running_mean and running_var must be defined in evaluation mode")
        channels = input.shape[1]
        named = {"running_mean": running_mean, "running_var": running_var, "weight": self.weight,
                 "bias": self.bias}
        for name, tensor in named.items():
            if tensor is not None and tensor.numel() != channels:
                raise RuntimeError(
                    f"{name} should contain {channels} elements not {tensor.numel()}: the input has "
                    f"{channels} channels on axis 1 but the layer has num_features={self.num_features}"
                )


class BatchNorm1d(_BatchNorm):
    """Batch normalisation of (N, C) or (N, C, L) input, equal to torch.nn.BatchNorm1d (torch 2.13).

    Statistics are taken per channel over N (and L). Options are torch's, plus the keyword-only
    `closed_form_backward` (train through the hand-derived backward of `normlab.nn.functional`).
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() not in (2, 3):
            raise ValueError(
                f"expected 2D or 3D input (got {input.dim()}D input): BatchNorm1d takes (N, C) or (N, C, L)"
            )

    def extra_repr(self) -> str:
        """torch's description, plus closed_form_backward=True when set."""
        suffix = ", closed_form_backward=True" if self.closed_form_backward else ""
        return super().extra_repr() + suffix


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
