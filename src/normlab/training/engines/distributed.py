"""The ddp engine: one model trained by the W processes of torch.distributed's default group, each computing
its slice of every batch, with torch's `DistributedDataParallel` averaging the gradients (gloo on CPU, NCCL on
CUDA) and torch.optim stepping identical copies of the weights.

The loop hands every process the same global batch of B indices (a pure function of seed and step); rank r takes
the B/W consecutive examples from r·B/W, so the mean of the per-rank mean losses is the global batch's mean and
DDP's average of the per-rank gradients is the gradient a single process computes on the whole batch (B must be
divisible by W). What each rank normalises with follows `model.norm`:

    syncbatch    every batch norm (the output norm too) takes the statistics of the whole global batch over
                 all ranks (`normlab.nn.SyncBatchNorm`): the run follows the one-process BatchNorm run step by step
    batch        plain BatchNorm1d on the rank's B/W examples: each rank's own batch statistics and running
                 statistics (buffers are synchronised once, at the start; rank 0's are the ones saved)
    ghostbatch   ghost batches within the rank's slice (the same chunks as one process when B/W is a multiple of
                 the ghost batch size)
    layer, ...   per-example norms: the same as one process

With `model.dropout` each rank draws its own masks for its slice (seeded with its rank too, see
`normlab.model.seed_dropout`): independent across ranks, but not the masks of a one-process run.

Batch losses stay per rank until the loop's sync, where `agree` averages them (and a stop request) over the
ranks in one all-reduce, so every rank sees the same NaN and stops at the same step.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from normlab import nn
from normlab.config import TrainConfig
from normlab.errors import ConfigError
from normlab.model import LanguageModel, dropout_layers
from normlab.training.engines import Split
from normlab.training.engines.reference import ReferenceEngine, reference_step
from normlab.training.optimizers import make_optimizer


def rank_slice(batch_size: int, rank: int, world_size: int) -> slice:
    """The positions of the global batch that `rank` computes: B/W consecutive examples from rank·B/W."""
    if batch_size % world_size:
        raise ConfigError(f"train.batch_size={batch_size} must be divisible by the {world_size} processes, so that "
                          "every rank takes an equal slice of each batch: choose a multiple of "
                          f"{world_size}, e.g. {batch_size - batch_size % world_size or world_size}")
    share = batch_size // world_size
    return slice(rank * share, (rank + 1) * share)


class DistributedEngine(ReferenceEngine):
    """Trains `model` on this process's slice of every batch, wrapped in `DistributedDataParallel` over the
    default process group (which must be initialised: see `normlab.runs.ranks`). The rest is the reference
    engine's: the losses of `run_steps` are this rank's (averaged over ranks by `agree`), `evaluate` uses this
    rank's model (its own running statistics; rank 0's are the ones saved), and every rank records the same
    steps."""

    def __init__(self, model: LanguageModel, config: TrainConfig, train_xy: Split, *,
                 optimizer_state: dict[str, Any] | None = None, step: int = 0) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            raise ConfigError("the ddp engine needs an initialised torch.distributed process group")
        self.rank, self.processes = dist.get_rank(), dist.get_world_size()
        self.part = rank_slice(config.batch_size, self.rank, self.processes)
        self.seed, self.next_step, self.dropouts = config.seed, step, dropout_layers(model)
        self.device = torch.device(config.device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())  # the rank's GPU (see ranks.join)
        self.model = model.to(self.device).train()
        if any(isinstance(module, nn.SyncBatchNorm) for module in model.modules()):
            nn.SyncBatchNorm.convert_sync_batchnorm(self.model)  # norm=syncbatch: the output norm syncs too
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        self.ddp = DistributedDataParallel(self.model, device_ids=device_ids, forward_sync_buffers=False)
        self.optimizer = make_optimizer(self.model.parameters(), config)
        if optimizer_state is not None:
            self.optimizer.load_state_dict(optimizer_state)
        self.grad_clip = config.grad_clip
        self.x, self.y = train_xy[0].to(self.device), train_xy[1].to(self.device)
        self.monitors: list[Any] = []

    def _step(self, indices: torch.Tensor, rate: float) -> torch.Tensor:
        index = indices[self.part]  # (B/W,) this rank's slice of the global batch
        self._draw_masks()
        return reference_step(self.ddp, self.optimizer, self.x[index], self.y[index], rate, self.grad_clip)

    def agree(self, losses: torch.Tensor, stop: bool) -> tuple[torch.Tensor, bool]:
        """One all-reduce of the window's losses and the stop flags: the mean over ranks (the global batch's loss;
        NaN if any rank's is) and whether any rank was asked to stop."""
        packed = torch.cat([losses.reshape(-1), losses.new_tensor([1.0 if stop else 0.0])])
        dist.all_reduce(packed, op=dist.ReduceOp.SUM)
        return (packed[:-1] / self.processes).view_as(losses), bool(packed[-1].item() > 0)

    def attach_monitors(self, every: int, **options: Any) -> list[Any]:
        """A Monitor on the DDP model, with this rank's optimizer (update:data measured around the real step;
        gradients read after DDP's all-reduce): statistics over the global batch, reduced over DDP's process
        group (partial sums and histogram counts). Every rank records the same steps; rank 0 alone writes."""
        from normlab.diagnostics import Monitor

        self.monitors = [Monitor(self.ddp, self.optimizer, every=every, **options)]  # reduces over DDP's group
        return self.monitors
