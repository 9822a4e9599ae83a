"""Ghost batch normalisation (Hoffer et al. 2017, "Train longer, generalize better"): batch norm whose
training statistics come from small virtual ("ghost") batches of a large batch.
"""

import torch
from torch.types import Device

from normlab.nn.batchnorm import BatchNorm1d, _BatchNorm


class GhostBatchNorm1d(_BatchNorm):
    """Batch norm of (N, C) or (N, C, L) input whose training statistics come from ghost batches.

    In training the batch is cut along N into consecutive chunks of `ghost_batch_size` examples (`input.split`)
    and each chunk is normalised with its own mean and biased variance, exactly as if BatchNorm1d were called on
    the chunks one after another and the outputs concatenated:

    - the last chunk holds the N mod ghost_batch_size examples left over, when there are any, and is a ghost
      batch of its own (its statistics are as noisy as its size makes them);
    - the running statistics take one momentum update per chunk, in order, and `num_batches_tracked` grows by
      the number of chunks, ⌈N / ghost_batch_size⌉ (one for an empty batch, as BatchNorm1d counts it);
      with momentum None each chunk gets weight 1/num_batches_tracked, a cumulative average over chunks;
    - a chunk of a single value per channel has no variance: when the last of several chunks would be one,
      ValueError is raised before any chunk is processed, leaving the running statistics and the count
      untouched; a batch that is a single chunk behaves exactly as BatchNorm1d (counted, then rejected).

    With ghost_batch_size ≥ N this is BatchNorm1d. Eval is BatchNorm1d's eval: the running statistics, or the
    whole batch's statistics when `track_running_stats=False` (not per chunk). Parameters, buffers and state
    dicts are BatchNorm1d's, so state dicts load both ways. `closed_form_backward` as in BatchNorm1d.
    """

    ghost_batch_size: int

    def __init__(self, num_features: int, ghost_batch_size: int, eps: float = 1e-5,
                 momentum: float | None = 0.1, affine: bool = True, track_running_stats: bool = True,
                 device: Device = None, dtype: torch.dtype | None = None, *, bias: bool = True,
                 closed_form_backward: bool = False) -> None:
        if isinstance(ghost_batch_size, bool) or not isinstance(ghost_batch_size, int):
            raise TypeError(f"ghost_batch_size must be an int number of examples, got {ghost_batch_size!r}")
        if ghost_batch_size < 1:
            raise ValueError(f"ghost_batch_size must be at least 1 example, got {ghost_batch_size}")
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias,
                         closed_form_backward=closed_form_backward)
        self.ghost_batch_size = ghost_batch_size

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """Normalise each ghost batch with its own statistics (training) or as BatchNorm1d does (eval)."""
        if not self.training:
            return super().forward(input)
        self._check_input_dim(input)
        chunks = input.split(self.ghost_batch_size)  # (≤ ghost_batch_size, C, *) each
        last = chunks[-1]
        if len(chunks) > 1 and last.shape[0] * (last.shape[2] if last.dim() == 3 else 1) == 1:
            raise ValueError(
                f"Expected more than 1 value per channel when training, but the last ghost batch of input size "
                f"{list(input.shape)} holds 1 example of 1 value per channel (batch {input.shape[0]} = "
                f"{len(chunks) - 1}·{self.ghost_batch_size} + 1): use a batch size or ghost_batch_size that "
                "does not leave a single example over"
            )
        batch_norm = super().forward  # BatchNorm1d's training step, one chunk at a time
        return torch.cat([batch_norm(chunk) for chunk in chunks])

    _check_input_dim = BatchNorm1d._check_input_dim  # (N, C) or (N, C, L)

    def extra_repr(self) -> str:
        """BatchNorm1d's description with the ghost batch size after the features."""
        features, rest = super().extra_repr().split(", ", 1)
        return f"{features}, ghost_batch_size={self.ghost_batch_size}, {rest}"
