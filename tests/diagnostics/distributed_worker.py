"""A worker of the distributed tests: one process of a 2-process gloo group training a small DDP model.

Each process takes its half of a fixed batch; the monitor (process group found from the DDP wrapper) records
every step, and rank 0 saves the diagnostics to ``out_dir``. Not a test module: ``torch.multiprocessing.spawn``
imports it in each child.
"""

from __future__ import annotations

import gc
import json
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from normlab.diagnostics import Monitor

VOCAB, BATCH, STEPS = 11, 24, 3


def make_model() -> nn.Module:
    """A float64 model with an embedding, LayerNorm, tanh and ReLU layers (no BatchNorm: per-process statistics)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Embedding(VOCAB, 6), nn.Flatten(), nn.Linear(18, 16), nn.LayerNorm(16), nn.Tanh(),
        nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, VOCAB),
    ).double()


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch of ``step``."""
    generator = torch.Generator().manual_seed(step)
    inputs = torch.randint(0, VOCAB, (BATCH, 3), generator=generator)
    return inputs, torch.randint(0, VOCAB, (BATCH,), generator=generator)


def train(
    model: nn.Module, monitor_model: nn.Module, rows: slice, monitor_options: dict, twice: bool = False
) -> Monitor:
    """Train ``model`` for STEPS steps on ``rows`` of each global batch, monitored."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = Monitor(monitor_model, optimizer, every=1, histogram_every=2, bins=16, **monitor_options)
    for step in range(STEPS):
        inputs, targets = batch(step)
        monitor.begin_step(step)
        output = model(inputs[rows])
        if twice:
            output = model(inputs[rows]) + output  # this process runs every module a second time
        loss = F.cross_entropy(output, targets[rows])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        monitor.end_step(loss)
    return monitor


def run(rank: int, world_size: int, init_file: str, out_dir: str, mismatch: bool) -> None:
    """Entry point of each spawned process."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        ddp = nn.parallel.DistributedDataParallel(make_model())
        half = BATCH // world_size
        try:
            monitor = train(ddp, ddp, slice(rank * half, (rank + 1) * half), {}, twice=mismatch and rank == 1)
        except RuntimeError as error:
            Path(out_dir, f"error{rank}.txt").write_text(str(error))
            return
        monitor.save(Path(out_dir) / f"rank{rank}")
        monitor.close()
        Path(out_dir, f"done{rank}.json").write_text(json.dumps({"main": monitor.is_main_process}))
    finally:
        # The model (and, after an error, the monitor's hooks that still reference it) must go before the process
        # group: DDP's reducer destroyed after it aborts the process at exit, now and then.
        ddp = None
        gc.collect()
        dist.destroy_process_group()
