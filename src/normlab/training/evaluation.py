"""Evaluation and BatchNorm calibration of trained modules (of any engine's models, or any torch model)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 32_768) -> float:
    """Mean cross-entropy of `model` on (x, y) in eval mode (NaN for an empty split); restores the mode."""
    if len(x) == 0:
        return float("nan")
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        total = torch.zeros((), dtype=torch.float64, device=device)
        for start in range(0, len(x), batch_size):
            xb, yb = x[start:start + batch_size].to(device), y[start:start + batch_size].to(device)
            total += F.cross_entropy(model(xb), yb, reduction="sum").double()
        return total.item() / len(x)
    finally:
        model.train(was_training)


def batchnorm_layers(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The (name, module) of every batch-norm layer that tracks running statistics (normlab's or torch's)."""
    return [(name, module) for name, module in model.named_modules()
            if "BatchNorm" in type(module).__name__ and getattr(module, "running_mean", None) is not None]


@torch.no_grad()
def calibrate_batchnorm(model: torch.nn.Module, x: torch.Tensor) -> int:
    """Set every BatchNorm's running statistics to the population mean and variance of the inputs it sees on x.

    As the lesson does after training: one forward pass over the whole of `x` in train mode, each layer
    normalising with (and recording) the statistics of all of `x`. Returns the number of layers calibrated.
    """
    layers = batchnorm_layers(model)
    if not layers:
        return 0
    saved = [(module.momentum, module.num_batches_tracked.clone()) for _, module in layers]
    was_training = model.training
    try:
        for _, module in layers:
            module.reset_running_stats()
            module.momentum = None  # cumulative average: after one batch, exactly that batch's statistics
        model.train()
        model(x.to(next(model.parameters()).device))
    finally:
        for (_, module), (momentum, tracked) in zip(layers, saved):
            module.momentum = momentum
            module.num_batches_tracked.copy_(tracked)
        model.train(was_training)
    return len(layers)
