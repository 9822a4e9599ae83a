"""One forward and backward pass at initialisation: a per-layer table and findings in seconds."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from normlab.diagnostics import metrics as m
from normlab.diagnostics.monitor import Monitor
from normlab.diagnostics.storage import Diagnostics


def inspect_model(
    model: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
    *,
    include: Iterable[type | str] | None = None,
    exclude: Iterable[type | str] | None = None,
    saturation_threshold: float = 0.97,
    bins: int = 64,
    step: int = 0,
) -> Diagnostics:
    """Record one forward and backward pass of ``model`` (no optimizer step) as diagnostics at ``step``.

    Runs in the model's current mode (train mode: BatchNorm uses batch statistics, as in the first training
    step). The model is left as it was: its buffers (e.g. running statistics) and its parameters' ``.grad``
    are restored afterwards.
    """
    buffers = [(buffer, buffer.detach().clone()) for buffer in model.buffers()]
    parameters = list(model.parameters())
    grads = [parameter.grad for parameter in parameters]
    monitor = Monitor(
        model, every=1, include=include, exclude=exclude, saturation_threshold=saturation_threshold, bins=bins
    )
    try:
        for parameter in parameters:
            parameter.grad = None
        monitor.begin_step(step)
        loss = loss_fn(model(inputs), targets)
        loss.backward()
        monitor.end_step(loss)
        diagnostics = monitor.diagnostics  # summarised here, before the model is restored below
    finally:
        monitor.close()
        with torch.no_grad():
            for buffer, saved in buffers:
                buffer.copy_(saved)
        for parameter, grad in zip(parameters, grads, strict=True):
            parameter.grad = grad
    return diagnostics


def _cell(value: float | None, spec: str) -> str:
    return "-" if value is None or not math.isfinite(value) else format(value, spec)


def format_layer_table(diagnostics: Diagnostics, step: int | None = None) -> str:
    """A plain-text table, one row per recorded module in forward order, at ``step`` (default: the first).

    Columns: layer, type, output mean and std, saturated %, dead %, std of the gradient reaching the output,
    and the grad:data ratio of the module's ``weight`` (if it has one).
    """
    steps = diagnostics.steps()
    if not steps:
        return "no diagnostics recorded"
    step = steps[0] if step is None else step
    header = ("layer", "type", "act mean", "act std", "saturated", "dead", "grad std", "weight grad:data")
    rows = [header]
    for layer in diagnostics.layers(m.ACT_MEAN):
        info = diagnostics.modules.get(layer)
        saturated = diagnostics.value(layer, m.ACT_SATURATED, step)
        dead = diagnostics.value(layer, m.ACT_DEAD, step)
        rows.append(
            (
                layer,
                info.type if info else "?",
                _cell(diagnostics.value(layer, m.ACT_MEAN, step), "+.3f"),
                _cell(diagnostics.value(layer, m.ACT_STD, step), ".3f"),
                _cell(None if saturated is None else 100 * saturated, ".1f")
                + ("%" if saturated is not None else ""),
                _cell(None if dead is None else 100 * dead, ".1f") + ("%" if dead is not None else ""),
                _cell(diagnostics.value(layer, m.GRAD_STD, step), ".2e"),
                _cell(diagnostics.value(f"{layer}.weight", m.GRAD_TO_DATA, step), ".2e"),
            )
        )
    widths = [max(len(row[column]) for row in rows) for column in range(len(header))]
    lines = [
        "  ".join(
            cell.ljust(width) if column < 2 else cell.rjust(width)
            for column, (cell, width) in enumerate(zip(row, widths, strict=True))
        )
        for row in rows
    ]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)
