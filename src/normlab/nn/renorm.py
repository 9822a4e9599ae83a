"""Batch renormalisation (Ioffe 2017, "Batch Renormalization: Towards Reducing Minibatch Dependence in
Batch-Normalized Models", Algorithm 1): training normalises with the batch statistics, corrected towards the
running statistics, so that training and inference see the same function of each example.
"""

import math

import torch
from torch.types import Device

from normlab.nn.batchnorm import BatchNorm1d, _BatchNorm, batch_statistics, values_per_channel
from normlab.nn.functional import per_channel
from normlab.nn.norm import _compute_dtype, _verify_batch_size


class BatchRenorm1d(_BatchNorm):
    """Batch renormalisation of (N, C) or (N, C, L) input; eval is BatchNorm1d's eval.

    In training, per channel, with μ_B and σ_B = √(σ²_B + ε) the batch mean and standard deviation (biased
    variance, as BatchNorm) and μ = running_mean, σ = √(running_var + ε) the running statistics before this
    batch:

        r = stop_grad(clip(σ_B / σ, 1/r_max, r_max))      d = stop_grad(clip((μ_B − μ) / σ, −d_max, d_max))
        x̂ = (x − μ_B) / σ_B · r + d                       y = γ · x̂ + β

    No gradient flows through r and d; through μ_B and σ_B it flows as in BatchNorm. With r = 1 and d = 0 this
    is BatchNorm; where the clips do not bind, x̂ = (x − μ) / σ, the eval transform. The running statistics are
    then updated exactly as BatchNorm1d updates them (running_var holds the unbiased variance; the paper's
    Algorithm 1 averages σ itself instead), and num_batches_tracked counts the batch, so state dicts of
    BatchNorm1d load into this layer and back (strict), and a loaded count resumes the schedule below.

    The clip limits grow with t = num_batches_tracked, the training batches seen before this one:

        ramp(t) = 0 for t < hold_steps, else min((t − hold_steps) / warmup_steps, 1)  (1 if warmup_steps = 0)
        r_max(t) = 1 + (r_max − 1) · ramp(t)                d_max(t) = d_max · ramp(t)

    so training starts as BatchNorm (r_max 1, d_max 0) while the running statistics settle, and reaches the
    final limits after hold_steps + warmup_steps batches. The paper held r_max = 1, d_max = 0 for 5,000 steps,
    then relaxed them linearly to reach d_max = 5 at 25,000 and r_max = 3 at 40,000 steps; this layer relaxes
    both over one ramp (hold_steps=5000, warmup_steps=20000 to 35000 come close). `current_r_max` and
    `current_d_max` give the limits the next training batch will use. Running statistics are always tracked
    (r and d need them); `momentum=None` makes them a cumulative average, as in BatchNorm1d.
    """

    r_max: float
    d_max: float
    warmup_steps: int
    hold_steps: int

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 r_max: float = 3.0, d_max: float = 5.0, warmup_steps: int = 5000, device: Device = None,
                 dtype: torch.dtype | None = None, *, hold_steps: int = 0, bias: bool = True) -> None:
        if not (math.isfinite(r_max) and r_max >= 1.0):
            raise ValueError(f"r_max must be a finite number >= 1 (r is clipped to [1/r_max, r_max]), got {r_max}")
        if not (math.isfinite(d_max) and d_max >= 0.0):
            raise ValueError(f"d_max must be a finite number >= 0 (d is clipped to [-d_max, d_max]), got {d_max}")
        for name, steps in (("warmup_steps", warmup_steps), ("hold_steps", hold_steps)):
            if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
                raise ValueError(f"{name} must be a non-negative int number of batches, got {steps!r}")
        super().__init__(num_features, eps, momentum, affine, True, device, dtype, bias=bias)
        self.r_max = float(r_max)
        self.d_max = float(d_max)
        self.warmup_steps = warmup_steps
        self.hold_steps = hold_steps

    _check_input_dim = BatchNorm1d._check_input_dim  # (N, C) or (N, C, L)

    def ramp(self, steps_seen: int) -> float:
        """How far the clip limits have relaxed after `steps_seen` training batches, from 0 to 1."""
        if steps_seen < self.hold_steps:
            return 0.0
        if self.warmup_steps == 0:
            return 1.0
        return min((steps_seen - self.hold_steps) / self.warmup_steps, 1.0)

    @property
    def current_r_max(self) -> float:
        """The r clip limit the next training batch uses: 1 + (r_max − 1)·ramp(num_batches_tracked)."""
        return 1.0 + (self.r_max - 1.0) * self.ramp(int(self.num_batches_tracked))

    @property
    def current_d_max(self) -> float:
        """The d clip limit the next training batch uses: d_max·ramp(num_batches_tracked)."""
        return self.d_max * self.ramp(int(self.num_batches_tracked))

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """Renormalise with batch statistics, r and d (training), or normalise as BatchNorm1d's eval."""
        if not self.training:
            return super().forward(input)
        self._check_input_dim(input)
        if self.running_mean is None or self.running_var is None:
            raise RuntimeError(
                "BatchRenorm1d needs running_mean and running_var in training (r and d compare the batch with "
                "them): call reset_running_stats() after restoring the buffers"
            )
        r_max, d_max = self.current_r_max, self.current_d_max  # before this batch is counted
        momentum = self._count_batch()
        _verify_batch_size(list(input.shape))
        self._check_batch(input, True, self.running_mean, self.running_var)

        x = input.to(_compute_dtype(input.dtype))  # (N, C) or (N, C, L)
        mean, var = batch_statistics(x)  # (C,), (C,) biased
        invstd = torch.rsqrt(var + self.eps)  # 1/σ_B
        with torch.no_grad():
            running_invstd = torch.rsqrt(self.running_var + self.eps)  # 1/σ
            r = ((var + self.eps).sqrt() * running_invstd).clamp(1.0 / r_max, r_max)  # σ_B/σ
            d = ((mean - self.running_mean) * running_invstd).clamp(-d_max, d_max)  # (μ_B − μ)/σ
        x_hat = (x - per_channel(mean, x)) * per_channel(invstd, x) * per_channel(r, x) + per_channel(d, x)
        self._update_running_stats(mean.detach(), var.detach(), values_per_channel(x), momentum)
        return self._affine(x_hat).to(input.dtype)

    def extra_repr(self) -> str:
        """BatchNorm1d's description, then the final clip limits and the schedule."""
        text = f"{super().extra_repr()}, r_max={self.r_max}, d_max={self.d_max}, warmup_steps={self.warmup_steps}"
        return text + (f", hold_steps={self.hold_steps}" if self.hold_steps else "")
