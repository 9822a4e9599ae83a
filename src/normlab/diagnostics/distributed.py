"""Statistics over the global batch of a data-parallel run: partial sums all-reduced, never tensors gathered.

Under ``torch.distributed`` each process sees its own share of the batch. The monitor of every process
reduces what it saw to partial statistics (counts, sums, sums of squares, extremes, saturated counts, flags of
units that fired, histogram counts over a range agreed first) and :class:`Reducer` adds them up over the
process group with ``all_reduce``. Parameters and their gradients (read at the optimizer step, after DDP's
all-reduce) are the same on every process and need no reduction.

Every process must make the same calls in the same order: recording steps are a function of the step number
only, and every process runs the same modules the same number of times in a recording step (as DDP itself
needs). :meth:`Reducer.check_layout` turns a mismatch into the same error on every process rather than a hang.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

AUTO = "auto"


def resolve_process_group(model: nn.Module, process_group: Any) -> Any | None:
    """The process group to reduce over, or None for a single process.

    ``"auto"``: the group of a ``DistributedDataParallel`` model when ``torch.distributed`` is initialised,
    else None. ``None``: one process. Anything else is taken as a process group.
    """
    if process_group is None:
        return None
    if isinstance(process_group, str):
        if process_group != AUTO:
            raise ValueError(f"process_group must be a process group, None or {AUTO!r}, got {process_group!r}")
        if not (dist.is_available() and dist.is_initialized()):
            return None
        if isinstance(model, nn.parallel.DistributedDataParallel):
            return model.process_group
        return None
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("process_group was given but torch.distributed is not initialised: "
                           "call torch.distributed.init_process_group first")
    return process_group


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a ``DistributedDataParallel`` wrapper (names then match a single-process model)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


class Reducer:
    """Sums and maxima of float64 arrays over the processes of a group (``all_reduce``, in place)."""

    def __init__(self, group: Any) -> None:
        self.group = group
        self.world_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" \
            else torch.device("cpu")

    def _reduce(self, array: np.ndarray, op: Any) -> np.ndarray:
        tensor = torch.from_numpy(np.array(array, dtype=np.float64, copy=True).reshape(-1)).to(self.device)
        dist.all_reduce(tensor, op=op, group=self.group)
        return tensor.cpu().numpy().reshape(np.shape(array))

    def sum(self, array: np.ndarray) -> np.ndarray:
        """Elementwise sum over the processes."""
        return self._reduce(array, dist.ReduceOp.SUM)

    def max(self, array: np.ndarray) -> np.ndarray:
        """Elementwise maximum over the processes."""
        return self._reduce(array, dist.ReduceOp.MAX)

    def check_layout(self, sizes: list[int], what: str) -> None:
        """Raise on every process when the processes disagree on ``sizes`` (what each will reduce next)."""
        local = np.array([len(sizes), *sizes[:64], sum(sizes)], dtype=np.float64)
        padded = np.zeros(66)
        padded[: local.size] = local
        extremes = self.max(np.concatenate([padded, -padded]))
        if not np.array_equal(extremes[:66], -extremes[66:]):
            raise RuntimeError(
                f"the processes of the group recorded different {what} in this step (this process: "
                f"{len(sizes)} of them, {sum(sizes)} elements): every process must run the same modules the "
                "same number of times in a recording step, and call begin_step with the same steps"
            )
