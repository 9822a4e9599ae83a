"""Batch normalisation with the math written out, equal to torch 2.13's: BatchNorm1d, BatchNorm2d, BatchNorm3d.

After torch's `batchnorm.py`: `_NormBase` holds the parameters, buffers, resets, repr and state-dict versioning
once; `_BatchNorm` holds the forward; the public classes differ only in the input ranks they accept. In training
each channel c is normalised with the mean μ_c and the *biased* variance σ²_c of its n values in the batch
(n = N, N·L, N·H·W or N·D·H·W), and the running statistics move towards the batch's:

    y = (x − μ) / √(σ² + ε) · γ + β
    running_mean ← (1 − m)·running_mean + m·μ        running_var ← (1 − m)·running_var + m·σ²·n/(n − 1)

with m the momentum, or 1/num_batches_tracked when momentum is None (a cumulative average). Eval normalises with
the running statistics instead. Unlike the lesson's BatchNorm1d, the variance that normalises is the biased one
(torch's); the unbiased one goes into `running_var`. The variants (GhostBatchNorm1d, BatchRenorm1d,
SyncBatchNorm) reuse these pieces in their own modules.
"""

import math

import torch
from torch import nn
from torch.types import Device

from normlab.nn.functional import batch_norm_train, per_channel, reduction_dims
from normlab.nn.norm import (
    _check_floating,
    _check_same_dtype,
    _compute_dtype,
    _register_affine,
    _reset_affine,
    _verify_batch_size,
)


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
        momentum = self._count_batch()
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        running_mean, running_var = self._buffers_in_use()
        if use_batch_stats:
            _verify_batch_size(list(input.shape))
        self._check_batch(input, use_batch_stats, running_mean, running_var)

        x = input.to(_compute_dtype(input.dtype))  # (N, C, *)
        if not use_batch_stats:
            return self._normalize(x, running_mean, running_var).to(input.dtype)
        if self.closed_form_backward:
            output, mean, var = batch_norm_train(x, self.weight, self.bias, self.eps)
        else:
            mean, var = batch_statistics(x)
            output = self._normalize(x, mean, var)
        self._update_running_stats(mean, var, values_per_channel(x), momentum)
        return output.to(input.dtype)

    def _count_batch(self) -> float:
        """Count a training batch and return the momentum m of its running-statistics update.

        Counted before the batch is checked, as torch does: a rejected batch still advances the count. With
        momentum None, m = 1/num_batches_tracked (after counting this batch), a cumulative average.
        """
        momentum = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                momentum = 1.0 / float(self.num_batches_tracked)
        return momentum

    def _buffers_in_use(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The running statistics this call reads or updates: all in eval, in training only when tracked."""
        if not self.training or self.track_running_stats:
            return self.running_mean, self.running_var
        return None, None

    def _update_running_stats(self, mean: torch.Tensor, var: torch.Tensor, n: int, momentum: float) -> None:
        """Move the running statistics towards a batch of n values per channel with biased variance `var`.

        Does nothing in eval, without tracked statistics, or for an empty batch (n = 0), as torch does. A
        batch of n = 1 never gets here: the batch-size checks reject it first.
        """
        running_mean, running_var = self._buffers_in_use()
        if not self.training or running_mean is None or n == 0:
            return
        with torch.no_grad():
            running_mean.copy_(momentum * mean + (1 - momentum) * running_mean)
            running_var.copy_(momentum * var * n / (n - 1) + (1 - momentum) * running_var)

    def _affine(self, x_hat: torch.Tensor) -> torch.Tensor:
        """x̂ · γ + β per channel, for the γ and β the layer has."""
        output = x_hat
        if self.weight is not None:
            output = output * per_channel(self.weight, x_hat)
        if self.bias is not None:
            output = output + per_channel(self.bias, x_hat)
        return output

    def _normalize(self, x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
        """(x − μ) / √(σ² + ε) · γ + β with per-channel (C,) statistics broadcast over x."""
        return self._affine((x - per_channel(mean, x)) * per_channel(torch.rsqrt(var + self.eps), x))

    def _check_batch(self, input: torch.Tensor, use_batch_stats: bool, running_mean: torch.Tensor | None,
                     running_var: torch.Tensor | None) -> None:
        """torch's checks after the batch size, in torch's order: eps, dtypes, buffers present, channels."""
        if use_batch_stats:
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

    def extra_repr(self) -> str:
        """torch's description, plus closed_form_backward=True when set."""
        suffix = ", closed_form_backward=True" if self.closed_form_backward else ""
        return super().extra_repr() + suffix


def values_per_channel(x: torch.Tensor) -> int:
    """n, the number of values each channel's statistics are taken over: N·(product of the axes after C)."""
    return math.prod(x.shape[d] for d in reduction_dims(x))


def batch_statistics(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance (C,) of (N, C, *) `x`, over every axis but 1."""
    dims = reduction_dims(x)
    mean = x.mean(dims)  # (C,)
    var = (x - per_channel(mean, x)).square().mean(dims)  # (C,), biased: divides by n
    return mean, var


def _rank_error(layer: nn.Module, expected: str, shapes: str, input: torch.Tensor) -> ValueError:
    """torch's message for an input of the wrong rank, and the shapes the layer takes."""
    return ValueError(f"expected {expected} input (got {input.dim()}D input): {type(layer).__name__} takes {shapes}")


class BatchNorm1d(_BatchNorm):
    """Batch normalisation of (N, C) or (N, C, L) input, equal to torch.nn.BatchNorm1d (torch 2.13).

    Statistics are taken per channel over N (and L). Options are torch's, plus the keyword-only
    `closed_form_backward` (train through the hand-derived backward of `normlab.nn.functional`).
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() not in (2, 3):
            raise _rank_error(self, "2D or 3D", "(N, C) or (N, C, L)", input)


class BatchNorm2d(_BatchNorm):
    """Batch normalisation of (N, C, H, W) input, equal to torch.nn.BatchNorm2d (torch 2.13).

    Statistics are taken per channel over N, H and W (n = N·H·W values). Options as BatchNorm1d's.
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() != 4:
            raise _rank_error(self, "4D", "(N, C, H, W)", input)


class BatchNorm3d(_BatchNorm):
    """Batch normalisation of (N, C, D, H, W) input, equal to torch.nn.BatchNorm3d (torch 2.13).

    Statistics are taken per channel over N, D, H and W (n = N·D·H·W values). Options as BatchNorm1d's.
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() != 5:
            raise _rank_error(self, "5D", "(N, C, D, H, W)", input)
