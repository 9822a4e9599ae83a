"""Batch normalisation with batch statistics and a hand-derived backward pass (a `torch.autograd.Function`).

With x̂ = (x − μ)·invstd, invstd = 1/√(σ² + ε), σ² the biased batch variance and n the number of values per
channel (N, or N·L for (N, C, L) input), the gradients are

    dβ = Σ dy        dγ = Σ dy·x̂        dx = γ·invstd/n · (n·dy − Σ dy − x̂·Σ dy·x̂)

with every Σ over all axes but the channel axis 1. `BatchNorm1d(closed_form_backward=True)` trains through
this function; the default path lets autograd differentiate the written-out forward instead, and the tests
check that the two agree and that this one passes `torch.autograd.gradcheck`.
"""

import math

import torch
from torch.autograd.function import FunctionCtx, once_differentiable


def reduction_dims(input: torch.Tensor) -> tuple[int, ...]:
    """Every axis but the channel axis 1: (0,) for (N, C), (0, 2) for (N, C, L)."""
    return (0, *range(2, input.dim()))


def per_channel(values: torch.Tensor, input: torch.Tensor) -> torch.Tensor:
    """View a per-channel vector (C,) so it broadcasts against `input` (N, C, *): (1, C, 1, ...)."""
    return values.view(1, -1, *([1] * (input.dim() - 2)))


def batch_norm_input_grad(grad_output: torch.Tensor, x_hat: torch.Tensor, invstd: torch.Tensor,
                          weight: torch.Tensor | None, sum_dy: torch.Tensor, sum_dy_x_hat: torch.Tensor,
                          n: int) -> torch.Tensor:
    """dx = γ·invstd/n · (n·dy − Σdy − x̂·Σdy·x̂), the input gradient of training-mode batch norm.

    `grad_output` (dy) and `x_hat` have the input's shape (N, C, *); `invstd`, `weight` (γ, or None for 1),
    `sum_dy` and `sum_dy_x_hat` are (C,) and `n` is the number of values per channel the statistics were taken
    over. The sums and n may cover more than this `grad_output` (SyncBatchNorm passes sums over every rank).
    """
    scale = invstd if weight is None else weight * invstd
    return per_channel(scale / n, grad_output) * (
        n * grad_output
        - per_channel(sum_dy, grad_output)
        - x_hat * per_channel(sum_dy_x_hat, grad_output)
    )


class BatchNormFunction(torch.autograd.Function):
    """Training-mode batch norm whose backward is the closed form above; outputs (y, mean, biased var).

    The mean and variance come out as non-differentiable outputs so the caller can update running
    statistics without computing them twice. The backward is not itself differentiable (no double backward).
    """

    @staticmethod
    def forward(
        ctx: FunctionCtx,
        input: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        eps: float,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        dims = reduction_dims(input)
        mean = input.mean(dims)  # (C,)
        centered = input - per_channel(mean, input)
        var = centered.square().mean(dims)  # (C,), biased: divides by n
        invstd = torch.rsqrt(var + eps)
        x_hat = centered * per_channel(invstd, input)
        output = x_hat
        if weight is not None:
            output = output * per_channel(weight, input)
        if bias is not None:
            output = output + per_channel(bias, input)
        ctx.save_for_backward(x_hat, invstd, weight)
        ctx.has_bias = bias is not None
        ctx.mark_non_differentiable(mean, var)
        return output, mean, var

    @staticmethod
    @once_differentiable
    def backward(
        ctx: FunctionCtx, grad_output: torch.Tensor, _grad_mean: torch.Tensor, _grad_var: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, None]:
        x_hat, invstd, weight = ctx.saved_tensors
        dims = reduction_dims(grad_output)
        n = math.prod(grad_output.shape[d] for d in dims)  # values per channel
        sum_dy = grad_output.sum(dims)  # (C,)
        sum_dy_x_hat = (grad_output * x_hat).sum(dims)  # (C,)
        grad_input = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_input = batch_norm_input_grad(grad_output, x_hat, invstd, weight, sum_dy, sum_dy_x_hat, n)
        if weight is not None and ctx.needs_input_grad[1]:
            grad_weight = sum_dy_x_hat
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = sum_dy
        return grad_input, grad_weight, grad_bias, None


def batch_norm_train(
    input: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Normalise (N, C) or (N, C, L) `input` with its own batch statistics; backward in closed form.

    Returns (output, mean, var): output has the input's shape; mean and the biased variance are (C,) and carry
    no gradient. `weight` (γ) and `bias` (β) are (C,) or None. The caller checks shapes, dtypes and eps.
    """
    return BatchNormFunction.apply(input, weight, bias, eps)
