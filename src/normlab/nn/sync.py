"""Synchronised batch normalisation: batch statistics over the whole batch that the ranks of a process group
hold between them, written out over `torch.distributed` (gloo on CPU, NCCL on CUDA).

Forward, on each of the W ranks with n_i values per channel (n_i may differ, and may be 0):

    local (n_i, μ_i, M2_i = Σ (x − μ_i)²)  ──all_gather──►  N = Σ n_i
    μ = Σ n_i·μ_i / N        M2 = Σ M2_i + Σ n_i·(μ_i − μ)²        σ² = M2 / N  (biased)

the combination of Chan, Golub and LeVeque (1979) written for W parts at once: it adds centred sums of
squares and squared deviations of the means, never the cancelling Σx² − N·μ², so it is about as accurate as
centring the whole batch at once. Each rank normalises its own values with the global μ and σ², and the running
statistics take the unbiased σ²·N/(N − 1) over the global N. Backward, with x̂ the normalised input:

    Σdy, Σdy·x̂ per channel  ──all_reduce (one packed tensor of 2C values)──►  global sums
    dx = γ·invstd/N · (N·dy − Σdy − x̂·Σdy·x̂)

while dγ = Σdy·x̂ and dβ = Σdy stay local to the rank: DistributedDataParallel (or the caller) all-reduces
parameter gradients as it does for every other layer.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.autograd.function import FunctionCtx, once_differentiable
from torch.types import Device

from normlab.nn.batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d, _BatchNorm
from normlab.nn.functional import batch_norm_input_grad, per_channel, reduction_dims
from normlab.nn.norm import _compute_dtype


def combine_statistics(counts: torch.Tensor, means: torch.Tensor, m2s: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Mean and biased variance (C,) of W parts taken together, from each part's count, mean and M2.

    `counts` is (W, 1) values per channel in each part, `means` and `m2s` (W, C) its mean and centred sum of
    squares Σ (x − μ_i)². Chan et al.'s combination: μ = Σ n_i·μ_i / N, M2 = Σ M2_i + Σ n_i·(μ_i − μ)², σ² = M2/N.
    A part with n_i = 0 (and zeros for μ_i, M2_i) weighs nothing; with N = 0 the mean and variance are 0.
    Returns (μ, σ², N) with N a Python int.
    """
    total = int(counts.sum().item())
    weights = counts / max(total, 1)  # (W, 1) each part's share
    mean = (weights * means).sum(0)  # (C,)
    m2 = m2s.sum(0) + (counts * (means - mean).square()).sum(0)  # (C,)
    return mean, m2 / max(total, 1), total


def gather_batch_statistics(x: torch.Tensor, group: dist.ProcessGroup | None
                            ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Mean and biased variance (C,) of the batch all ranks of `group` hold together, and its size N.

    `x` is this rank's (n_i, C, *) part in the compute dtype. One all_gather of a packed (2C + 1,) tensor
    [n_i, μ_i, M2_i] per rank, then `combine_statistics`; a rank with n_i = 0 sends zeros and weighs nothing.
    The counts travel in x's dtype: exact up to 2**24 values per channel and rank in float32, 2**53 in float64.
    Every rank of the group must call this with the same C; N is returned as a Python int (a host sync on CUDA).
    """
    dims = reduction_dims(x)
    count = x.new_tensor([x.numel() // x.shape[1]])  # (1,) values per channel on this rank
    if x.numel() > 0:
        mean = x.mean(dims)  # (C,)
        m2 = (x - per_channel(mean, x)).square().sum(dims)  # (C,) centred sum of squares
    else:
        mean = m2 = x.new_zeros(x.shape[1])
    packed = torch.cat([count, mean, m2])  # (2C + 1,)
    gathered = [torch.empty_like(packed) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, packed, group=group)
    counts, means, m2s = torch.stack(gathered).split([1, mean.numel(), mean.numel()], dim=1)  # (W, 1), (W, C)
    return combine_statistics(counts, means, m2s)


class SyncBatchNormFunction(torch.autograd.Function):
    """y = (x − μ)·invstd·γ + β with global statistics, whose backward all-reduces (Σdy, Σdy·x̂) once.

    `mean` and `invstd` are (C,) and carry no gradient (they are inputs here, computed by
    `gather_batch_statistics`); the backward accounts for the input's effect on them through the global sums.
    Not differentiable twice. Every rank of `group` must run the backward when any does, as with any collective.
    """

    @staticmethod
    def forward(ctx: FunctionCtx, input: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                mean: torch.Tensor, invstd: torch.Tensor, count: int, group: dist.ProcessGroup | None
                ) -> torch.Tensor:
        x_hat = (input - per_channel(mean, input)) * per_channel(invstd, input)
        output = x_hat
        if weight is not None:
            output = output * per_channel(weight, input)
        if bias is not None:
            output = output + per_channel(bias, input)
        ctx.save_for_backward(x_hat, invstd, weight)
        ctx.has_bias = bias is not None
        ctx.count = count
        ctx.group = group
        return output

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x_hat, invstd, weight = ctx.saved_tensors
        dims = reduction_dims(grad_output)
        sum_dy = grad_output.sum(dims)  # (C,) this rank's
        sum_dy_x_hat = (grad_output * x_hat).sum(dims)  # (C,) this rank's
        grad_input = None
        if ctx.needs_input_grad[0]:
            packed = torch.cat([sum_dy, sum_dy_x_hat])  # (2C,): one collective for both sums
            dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=ctx.group)
            global_sum_dy, global_sum_dy_x_hat = packed.split(sum_dy.numel())
            grad_input = batch_norm_input_grad(grad_output, x_hat, invstd, weight, global_sum_dy,
                                               global_sum_dy_x_hat, ctx.count)
        grad_weight = sum_dy_x_hat if weight is not None and ctx.needs_input_grad[1] else None
        grad_bias = sum_dy if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_input, grad_weight, grad_bias, None, None, None, None


class SyncBatchNorm(_BatchNorm):
    """Batch norm of (N, C, *) input whose training statistics span every rank of a process group.

    torch.nn.SyncBatchNorm's constructor, buffers, state dict and repr. In training with an initialised
    `torch.distributed` process group of more than one rank (`process_group`, or the whole world when None), the
    mean and biased variance are those of the batch all ranks hold together, and the running statistics take
    the unbiased variance over that global count N (see the module's docstring for the math). Ranks may hold
    different batch sizes, including 0 (that rank's output is empty; it still joins the collectives). A global
    batch of a single value per channel raises ValueError on every rank (torch instead writes inf into
    running_var). Unlike torch's, it runs on CPU tensors (gloo) as well as CUDA tensors (NCCL).

    Without an initialised process group, with one rank, or in eval mode it is BatchNorm of the input's rank:
    per-rank statistics, exactly as BatchNorm1d/2d/3d. Every rank must call forward and backward alike, as
    with any collective. `momentum=None` and `num_batches_tracked` behave as in BatchNorm.
    """

    process_group: dist.ProcessGroup | None

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, process_group: dist.ProcessGroup | None = None,
                 device: Device = None, dtype: torch.dtype | None = None, *, bias: bool = True) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias)
        self.process_group = process_group

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(
                f"expected at least 2D input (got {input.dim()}D input): SyncBatchNorm takes (N, C, *)"
            )
        if input.size(1) == 0:
            raise ValueError("SyncBatchNorm number of input channels should be non-zero, got input of size "
                             f"{list(input.shape)}")

    def _sync_group(self) -> dist.ProcessGroup | None:
        """The group to synchronise over in this call, or None to normalise like BatchNorm."""
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return None
        group = self.process_group if self.process_group is not None else dist.group.WORLD
        return group if dist.get_world_size(group) > 1 else None

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """Normalise with the group's batch statistics (training, >1 rank), else as BatchNorm."""
        group = self._sync_group()
        if group is None:
            return super().forward(input)
        self._check_input_dim(input)
        momentum = self._count_batch()
        running_mean, running_var = self._buffers_in_use()
        self._check_batch(input, True, running_mean, running_var)

        x = input.to(_compute_dtype(input.dtype))  # (n_i, C, *)
        with torch.no_grad():
            mean, var, count = gather_batch_statistics(x, group)
        if count == 1:
            raise ValueError(
                f"Expected more than 1 value per channel when training, got 1 over all ranks of the process "
                f"group (input size {list(input.shape)} on this rank): use a larger batch or call .eval()"
            )
        invstd = torch.rsqrt(var + self.eps)
        output = SyncBatchNormFunction.apply(x, self.weight, self.bias, mean, invstd, count, group)
        self._update_running_stats(mean, var, count, momentum)
        return output.to(input.dtype)

    @classmethod
    def convert_sync_batchnorm(cls, module: nn.Module, process_group: dist.ProcessGroup | None = None
                               ) -> nn.Module:
        """Replace every BatchNorm1d/2d/3d in `module` (normlab's or torch's) by a SyncBatchNorm, recursively.

        As torch's: the SyncBatchNorm shares the original's parameters (the same `nn.Parameter` objects, so
        requires_grad and optimizer references carry over) and buffers, and takes its train/eval mode, options
        and `qconfig`; containers are changed in place and returned, a BatchNorm passed itself comes back as a
        new SyncBatchNorm. Converted: normlab's BatchNorm1d/2d/3d and SyncBatchNorm, and every subclass of
        torch's `_BatchNorm` (torch.nn.BatchNorm1d/2d/3d, torch.nn.SyncBatchNorm). Left as they are:
        GhostBatchNorm1d and BatchRenorm1d, whose training statistics are not the plain batch's.
        """
        converted = module
        if isinstance(module, (BatchNorm1d, BatchNorm2d, BatchNorm3d, SyncBatchNorm,
                               nn.modules.batchnorm._BatchNorm)):
            converted = cls(module.num_features, module.eps, module.momentum, module.affine,
                            module.track_running_stats, process_group, bias=module.bias is not None)
            if module.affine:
                converted.weight = module.weight
                converted.bias = module.bias
            converted.running_mean = module.running_mean
            converted.running_var = module.running_var
            converted.num_batches_tracked = module.num_batches_tracked
            converted.training = module.training
            if hasattr(module, "qconfig"):
                converted.qconfig = module.qconfig
        for name, child in module.named_children():
            converted.add_module(name, cls.convert_sync_batchnorm(child, process_group))
        return converted
