"""Evaluation and BatchNorm calibration of trained modules (of any engine's models, or any torch model)."""

from __future__ import annotations

import functools

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
    """The (name, module) of every batch norm that tracks running statistics (normlab's BatchNorm1d/2d/3d,
    BatchRenorm1d, GhostBatchNorm1d, SyncBatchNorm, or torch's), in the order of `named_modules()`."""
    return [(name, module) for name, module in model.named_modules()
            if isinstance(getattr(module, "running_mean", None), torch.Tensor)
            and isinstance(getattr(module, "running_var", None), torch.Tensor) and hasattr(module, "momentum")]


@torch.no_grad()
def calibrate_batchnorm(model: torch.nn.Module, x: torch.Tensor, chunk: int = 32_768) -> int:
    """Set every batch norm's running statistics to the population mean and (unbiased) variance, per channel,
    of the inputs it sees when the model runs on all of `x` in eval mode; returns the number of layers.

    The lesson's calibration, made exact for any batch norm (ghost batches included): layer by layer in forward
    order, so that each layer's inputs come from the layers before it already calibrated; in float64, over
    chunks of `chunk` examples. `num_batches_tracked` and `momentum` are left as they were.
    """
    layers = batchnorm_layers(model)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        for _, module in layers:
            sums: list[torch.Tensor] = []
            handle = module.register_forward_pre_hook(functools.partial(_record_moments, sums))
            try:
                for start in range(0, len(x), chunk):
                    model(x[start:start + chunk].to(device))
            finally:
                handle.remove()
            count, total, squares = torch.stack(sums).sum(0)
            mean = total / count
            var = (squares - count * mean.square()).clamp(min=0) / (count - 1).clamp(min=1)
            module.running_mean.copy_(mean)
            module.running_var.copy_(var)
    finally:
        model.train(was_training)
    return len(layers)


def _record_moments(sums: list[torch.Tensor], module: torch.nn.Module, inputs: tuple) -> None:
    """Append (count, Σx, Σx²) per channel (axis 1) of a batch norm's input, in float64."""
    value = inputs[0].double().transpose(0, 1).reshape(inputs[0].shape[1], -1)  # (C, N·L...)
    sums.append(torch.stack([torch.full_like(value[:, 0], value.shape[1]), value.sum(1), value.square().sum(1)]))
