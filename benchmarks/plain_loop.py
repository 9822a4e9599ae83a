"""The competitor: the idiomatic plain PyTorch training loop (torch.nn modules, torch.optim.SGD), independent of
normlab's layers and training code. Used by `speed.py` and `time_to_target.py`."""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from torch import nn


def plain_model(vocab_size: int, *, n_embd: int = 10, block_size: int = 3, n_hidden: int = 200, n_layers: int = 1,
                norm: bool = True, bn_momentum: float = 0.001, seed: int = 0) -> nn.Sequential:
    """The lesson's MLP in torch.nn: Embedding → Flatten → [Linear → BatchNorm1d → Tanh] × n_layers → Linear,
    with the lesson's careful init (Kaiming for tanh on the hidden layers, output ×0.01, bias 0)."""
    generator = torch.Generator().manual_seed(seed)
    layers: list[nn.Module] = [nn.Embedding(vocab_size, n_embd), nn.Flatten()]
    width = n_embd * block_size
    for _ in range(n_layers):
        linear = nn.Linear(width, n_hidden, bias=not norm)
        with torch.no_grad():
            linear.weight.normal_(0.0, (5 / 3) / math.sqrt(width), generator=generator)
        layers += [linear] + ([nn.BatchNorm1d(n_hidden, momentum=bn_momentum)] if norm else []) + [nn.Tanh()]
        width = n_hidden
    output = nn.Linear(width, vocab_size)
    with torch.no_grad():
        output.weight.normal_(0.0, 0.01, generator=generator)
        output.bias.zero_()
    layers.append(output)
    return nn.Sequential(*layers)


def plain_train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, steps: int, batch_size: int = 32,
                lr: float = 0.1, decay_step: int | None = None, seed: int = 0, device: str = "cpu") -> float:
    """Minibatch SGD as a plain loop: the lesson's schedule (lr, then lr/10 from `decay_step`). Returns seconds."""
    decay_step = steps // 2 if decay_step is None else decay_step
    model.to(device).train()
    x, y = x.to(device), y.to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    generator = torch.Generator(device=device).manual_seed(seed)
    _synchronize(device)
    started = time.perf_counter()
    for step in range(steps):
        ix = torch.randint(0, x.shape[0], (batch_size,), generator=generator, device=device)
        loss = F.cross_entropy(model(x[ix]), y[ix])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for group in optimizer.param_groups:
            group["lr"] = lr if step < decay_step else lr / 10
        optimizer.step()
    _synchronize(device)
    return time.perf_counter() - started


@torch.no_grad()
def plain_evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, device: str = "cpu") -> float:
    """Mean cross-entropy in eval mode."""
    model.eval()
    loss = F.cross_entropy(model(x.to(device)), y.to(device)).item()
    model.train()
    return loss


def _synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
