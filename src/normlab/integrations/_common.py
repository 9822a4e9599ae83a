"""What both callbacks share: the monitor's options, the optimizer behind a wrapper, the process group."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from normlab.diagnostics import Monitor
from normlab.diagnostics.writers import TensorBoardWriter


def torch_optimizer(optimizer: Any) -> torch.optim.Optimizer | None:
    """The ``torch.optim.Optimizer`` inside a trainer's wrapper (accelerate's, Lightning's), or None.

    accelerate's wrapper is itself an Optimizer subclass, but its step hooks live on the optimizer it wraps.
    """
    for _ in range(4):
        inner = getattr(optimizer, "optimizer", None) or getattr(optimizer, "_optimizer", None)
        if isinstance(inner, torch.optim.Optimizer):
            optimizer = inner
        elif optimizer is None or isinstance(optimizer, torch.optim.Optimizer):
            return optimizer
        else:
            return None
    return optimizer


def world_group(world_size: int) -> Any:
    """The default process group when the trainer runs several processes, else None (one process)."""
    distributed = torch.distributed
    if world_size > 1 and distributed.is_available() and distributed.is_initialized():
        return distributed.group.WORLD
    return None


class MonitorOptions:
    """A callback's settings: where to write, how often to record, live writers, and the Monitor's options."""

    def __init__(
        self,
        run_dir: str | os.PathLike,
        every: int,
        report: bool,
        tensorboard: str | os.PathLike | None,
        writers: tuple,
        monitor_options: dict,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.every = every
        self.report = report
        self.tensorboard = tensorboard
        self.writers = writers
        self.monitor_options = monitor_options

    def monitor(self, model: torch.nn.Module, optimizer: Any, world_size: int, main_process: bool) -> Monitor:
        """A Monitor on ``model`` with the trainer's optimizer, reducing over the processes of a distributed run."""
        writers = list(self.writers)
        if self.tensorboard is not None and main_process:
            writers.append(TensorBoardWriter(self.tensorboard))
        return Monitor(
            model, torch_optimizer(optimizer), every=self.every, writers=writers,
            process_group=world_group(world_size), **self.monitor_options,
        )

    def finish(self, monitor: Monitor | None, main_process: bool) -> None:
        """Save the diagnostics (and the report) on the main process, then close the monitor."""
        if monitor is None:
            return
        if main_process:
            monitor.save(self.run_dir, report=self.report)
        monitor.close()
