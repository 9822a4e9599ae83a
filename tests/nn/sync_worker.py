"""What each rank of the SyncBatchNorm tests runs, and the scenarios both the ranks and the reference share.

`test_sync.py` spawns two processes that join one process group (gloo on CPU, or NCCL with one GPU per rank)
and run `run_rank`: every scenario trains a `normlab.nn.SyncBatchNorm` on the rank's slice of each batch and
saves what it saw (outputs, input and parameter gradients, state, eval output) to `rank<r>.pt`. The test then
compares the ranks' results, put together, with one `torch.nn.BatchNorm1d` on the whole batch.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from normlab import nn as nnl

from .cases import randomize_

DTYPE = torch.float64
WORLD_SIZE = 2


@dataclass(frozen=True)
class Scenario:
    """A batch of sum(splits) examples of shape (C, *trailing), rank r holding splits[r] consecutive ones."""

    name: str
    channels: int
    trailing: tuple[int, ...]
    splits: tuple[int, ...]
    options: dict = field(default_factory=dict)
    steps: int = 3

    def __str__(self) -> str:
        return self.name

    def rank_slice(self, rank: int) -> slice:
        """The examples of the whole batch that `rank` holds."""
        start = sum(self.splits[:rank])
        return slice(start, start + self.splits[rank])

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole batch of `step` and the gradient of the output fed back to it (step -1: eval batch)."""
        generator = torch.Generator().manual_seed(1000 + step)
        shape = (sum(self.splits), self.channels, *self.trailing)
        x = torch.randn(shape, dtype=DTYPE, generator=generator) * 2 + 0.5
        return x, torch.randn(shape, dtype=DTYPE, generator=generator)

    def initial_state(self) -> dict[str, torch.Tensor]:
        """Random parameters and running statistics (a count of 3), the same in every process."""
        reference = torch.nn.BatchNorm1d(self.channels, dtype=DTYPE, **self.options)
        randomize_(reference, torch.Generator().manual_seed(0))
        return reference.state_dict()


SCENARIOS = (
    Scenario("even-(N,C)", 3, (), (4, 4)),
    Scenario("uneven-(N,C,L)", 3, (5,), (2, 5)),
    Scenario("uneven-momentum-None", 4, (), (5, 2), {"momentum": None}),
    Scenario("one-value-on-a-rank", 2, (1,), (1, 4)),  # torch allows one value per channel on a rank
    Scenario("empty-rank", 3, (), (6, 0)),
    Scenario("empty-rank-first-(N,C,L)", 2, (3,), (0, 3)),
    Scenario("affine-False", 3, (2,), (3, 2), {"affine": False}),
    Scenario("bias-False", 3, (), (3, 4), {"bias": False}),
    Scenario("track_running_stats-False", 3, (2,), (3, 3), {"track_running_stats": False}),
)


def _scenario(scenario: Scenario, rank: int, device: torch.device) -> dict:
    layer = nnl.SyncBatchNorm(scenario.channels, dtype=DTYPE, **scenario.options).to(device)
    layer.load_state_dict(scenario.initial_state())
    part = scenario.rank_slice(rank)
    steps = []
    for step in range(scenario.steps):
        x, grad_output = scenario.batch(step)
        leaf = x[part].to(device).requires_grad_()
        output = layer(leaf)
        output.backward(grad_output[part].to(device))
        steps.append({"output": output.detach().cpu(), "input_grad": leaf.grad.cpu(),
                      "param_grads": {name: p.grad.cpu() for name, p in layer.named_parameters()}})
        layer.zero_grad(set_to_none=True)
    state = {key: value.cpu() for key, value in layer.state_dict().items()}
    layer.eval()
    with torch.no_grad():
        eval_output = layer(scenario.batch(-1)[0][part].to(device)).cpu()
    return {"steps": steps, "state": state, "eval_output": eval_output}


def _count_collectives(device: torch.device) -> dict[str, int]:
    """How many all_gather and all_reduce calls one training forward and backward make."""
    counts = {"all_gather": 0, "all_reduce": 0}
    originals = {name: getattr(dist, name) for name in counts}

    def counting(name):
        def call(*args, **kwargs):
            counts[name] += 1
            return originals[name](*args, **kwargs)
        return call

    layer = nnl.SyncBatchNorm(3, dtype=DTYPE).to(device)
    x = torch.randn(4, 3, 2, dtype=DTYPE, device=device, requires_grad=True)
    try:
        for name in counts:
            setattr(dist, name, counting(name))
        layer(x).sum().backward()
    finally:
        for name, original in originals.items():
            setattr(dist, name, original)
    return counts


def ddp_model() -> torch.nn.Module:
    """The lesson's block in torch.nn, with random state: Linear → BatchNorm1d → Tanh → Linear."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.BatchNorm1d(6), torch.nn.Tanh(),
                                torch.nn.Linear(6, 3)).to(DTYPE)
    randomize_(model, torch.Generator().manual_seed(1))
    return model


DDP_BATCH, DDP_STEPS, DDP_LR = 8, 3, 0.1


def ddp_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole batch of a DDP step and its output gradient."""
    generator = torch.Generator().manual_seed(2000 + step)
    return (torch.randn(DDP_BATCH, 4, dtype=DTYPE, generator=generator),
            torch.randn(DDP_BATCH, 3, dtype=DTYPE, generator=generator))


def _ddp(rank: int, device: torch.device) -> dict:
    """normlab's SyncBatchNorm converted into a torch model, trained with DDP and SGD on an even split."""
    model = nnl.SyncBatchNorm.convert_sync_batchnorm(ddp_model()).to(device)
    ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=DDP_LR)
    part = slice(rank * DDP_BATCH // WORLD_SIZE, (rank + 1) * DDP_BATCH // WORLD_SIZE)
    outputs = []
    for step in range(DDP_STEPS):
        x, grad_output = ddp_batch(step)
        output = ddp(x[part].to(device))
        # DDP averages gradients over ranks: scale by the world size so they sum, as the whole batch's do
        (output * grad_output[part].to(device)).sum().mul(WORLD_SIZE).backward()
        optimizer.step()
        optimizer.zero_grad()
        outputs.append(output.detach().cpu())
    return {"outputs": outputs, "state": {key: value.cpu() for key, value in model.state_dict().items()}}


def run_rank(rank: int, backend: str, init_file: str, out_dir: str) -> None:
    """Join the group, run every scenario, the collective count and the DDP run; save the results."""
    torch.set_num_threads(1)
    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE,
                            timeout=datetime.timedelta(seconds=60))
    try:
        results = {"scenarios": {scenario.name: _scenario(scenario, rank, device) for scenario in SCENARIOS},
                   "collectives": _count_collectives(device), "ddp": _ddp(rank, device)}
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()
