"""Small models and a training step for the diagnostics tests (plain torch.nn, nothing from normlab.nn)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from normlab.diagnostics import Monitor

VOCAB = 27
CONTEXT = 3


def lesson_mlp(seed: int = 0, hidden: int = 32) -> nn.Sequential:
    """Embedding -> flatten -> Linear -> BatchNorm1d -> Tanh -> Linear: the lesson's model, small."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Embedding(VOCAB, 5),
        nn.Flatten(),
        nn.Linear(CONTEXT * 5, hidden, bias=False),
        nn.BatchNorm1d(hidden),
        nn.Tanh(),
        nn.Linear(hidden, VOCAB),
    )


def tanh_mlp(
    seed: int = 0, depth: int = 3, hidden: int = 64, weight_scale: float = 1.0, output_scale: float = 0.1
) -> nn.Sequential:
    """A tanh MLP without normalisation; hidden weights at (5/3)/sqrt(fan_in) times ``weight_scale``.

    ``weight_scale=1`` and ``output_scale=0.1`` is the lesson's well-initialised network.
    """
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Embedding(VOCAB, 10), nn.Flatten()]
    width = CONTEXT * 10
    for _ in range(depth):
        linear = nn.Linear(width, hidden)
        with torch.no_grad():
            linear.weight.normal_(0, weight_scale * (5 / 3) / math.sqrt(width))
            linear.bias.zero_()
        layers += [linear, nn.Tanh()]
        width = hidden
    output = nn.Linear(width, VOCAB)
    with torch.no_grad():
        output.weight.mul_(output_scale)
        output.bias.zero_()
    return nn.Sequential(*layers, output)


def batch(seed: int = 0, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Random context windows and next-token targets."""
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randint(0, VOCAB, (size, CONTEXT), generator=generator)
    return inputs, torch.randint(0, VOCAB, (size,), generator=generator)


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    monitor: Monitor | None,
    step: int,
    inputs: torch.Tensor,
    targets: torch.Tensor,
) -> torch.Tensor:
    """One step of the protocol the monitor expects: begin, forward, backward, optimizer step, end."""
    if monitor is not None:
        monitor.begin_step(step)
    loss = F.cross_entropy(model(inputs), targets)
    if optimizer is not None:
        optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if optimizer is not None:
        optimizer.step()
    if monitor is not None:
        monitor.end_step(loss)
    return loss


def count_forward_hooks(model: nn.Module) -> int:
    """Forward and forward-pre hooks registered on any module of ``model``."""
    return sum(len(module._forward_hooks) + len(module._forward_pre_hooks) for module in model.modules())
