"""Turn the tensors captured during one recording step into diagnostics, with one device-to-host copy.

Every captured tensor is flattened into one vector; the statistics of all of them are computed together
(see :mod:`normlab.diagnostics.stats`), packed into one tensor, and copied to the host once.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch

from normlab.diagnostics import metrics as m
from normlab.diagnostics.stats import (
    Segments,
    dead_fraction,
    make_segments,
    saturated_fraction,
    segment_histograms,
    segment_moments,
    segment_nonfinite,
    segment_norms,
)
from normlab.diagnostics.storage import Diagnostics, Histogram, ModuleInfo


@dataclass
class Capture:
    """Tensors captured during one recording step, still on their device.

    ``parameter_values`` and ``updates`` are the recorded parameters flattened and concatenated (in the
    monitor's parameter order, lengths ``parameter_numels``); ``parameter_grads`` concatenates the gradients of
    the parameters named in ``grad_names`` (those that had a gradient).
    """

    activations: list[tuple[str, torch.Tensor]] = field(default_factory=list)
    activation_grads: list[tuple[str, torch.Tensor]] = field(default_factory=list)
    parameter_values: torch.Tensor | None = None
    parameter_grads: torch.Tensor | None = None
    grad_names: list[str] = field(default_factory=list)
    grad_numels: list[int] = field(default_factory=list)
    updates: torch.Tensor | None = None
    loss: torch.Tensor | None = None
    learning_rate: float | torch.Tensor | None = None


class _Packer:
    """Collects small result tensors and copies them to the host in one transfer."""

    def __init__(self, device: torch.device, dtype: torch.dtype) -> None:
        self.device, self.dtype = device, dtype
        self.parts: list[torch.Tensor] = []
        self.slices: dict[str, slice] = {}
        self.size = 0

    def add(self, key: str, tensor: torch.Tensor) -> None:
        flat = tensor.detach().reshape(-1).to(device=self.device, dtype=self.dtype)
        self.slices[key] = slice(self.size, self.size + flat.numel())
        self.size += flat.numel()
        self.parts.append(flat)

    def fetch(self) -> dict[str, np.ndarray]:
        if not self.parts:
            return {}
        host = torch.cat(self.parts).cpu().numpy()  # the one device-to-host copy of the step
        return {key: host[where] for key, where in self.slices.items()}


def _ratio(numerator: float, denominator: float) -> float:
    if denominator != 0:
        return numerator / denominator
    return math.nan if numerator == 0 or math.isnan(numerator) else math.inf


def summarise(
    capture: Capture,
    step: int,
    diagnostics: Diagnostics,
    *,
    parameter_names: list[str],
    parameter_numels: list[int],
    bins: int,
    saturation_threshold: float,
) -> None:
    """Compute every statistic of ``capture`` and add them to ``diagnostics`` at ``step``."""
    pieces: list[torch.Tensor] = []
    labels: list[tuple[str, str]] = []
    lengths: list[int] = []

    def add(tensor: torch.Tensor, names: list[str], numels: list[int], kind: str) -> None:
        pieces.append(tensor.reshape(-1))
        labels.extend((name, kind) for name in names)
        lengths.extend(numels)

    for key, tensor in capture.activations:
        add(tensor, [key], [tensor.numel()], m.HIST_ACT)
    for key, tensor in capture.activation_grads:
        add(tensor, [key], [tensor.numel()], m.HIST_GRAD)
    if capture.parameter_values is not None:
        add(capture.parameter_values, parameter_names, parameter_numels, m.HIST_PARAM)
    if capture.parameter_grads is not None:
        add(capture.parameter_grads, capture.grad_names, capture.grad_numels, m.HIST_PARAM_GRAD)
    histogram_segments = len(labels)
    if capture.updates is not None:
        add(capture.updates, parameter_names, parameter_numels, "update")

    device = pieces[0].device if pieces else torch.device("cpu")
    wide = torch.float32 if device.type == "mps" else torch.float64
    packer = _Packer(device, wide)
    if pieces:
        values = torch.cat([piece.to(device=device, dtype=torch.float32) for piece in pieces])
        segments = make_segments(lengths, device)
        packer.add("moments", segment_moments(values, segments))
        packer.add("nonfinite", segment_nonfinite(values, segments))
        packer.add("norms", segment_norms(values, segments))
        histogram_size = sum(lengths[:histogram_segments])
        prefix = Segments(tuple(lengths[:histogram_segments]), segments.ids[:histogram_size])
        counts, ranges = segment_histograms(values[:histogram_size], prefix, bins)
        packer.add("counts", counts)
        packer.add("ranges", ranges)
    for key, tensor in capture.activations:
        info: ModuleInfo = diagnostics.modules[key]
        if info.bound is not None:
            packer.add(f"{key}\0{m.ACT_SATURATED}", saturated_fraction(tensor, saturation_threshold, info.bound))
        if info.relu_like and tensor.dim() > 0:
            packer.add(f"{key}\0{m.ACT_DEAD}", dead_fraction(tensor))
    if capture.loss is not None:
        packer.add(f"\0{m.LOSS}", capture.loss)
    if isinstance(capture.learning_rate, torch.Tensor):
        packer.add(f"\0{m.LEARNING_RATE}", capture.learning_rate)
    host = packer.fetch()

    if isinstance(capture.learning_rate, (int, float)):
        diagnostics.add_scalar(step, m.GLOBAL, m.LEARNING_RATE, capture.learning_rate)
    for key in packer.slices:
        if "\0" in key:
            layer, metric = key.split("\0")
            diagnostics.add_scalar(step, layer, metric, host[key][0])
    if pieces:
        _add_segment_statistics(diagnostics, step, labels, host, bins, histogram_segments)


def _add_segment_statistics(
    diagnostics: Diagnostics,
    step: int,
    labels: list[tuple[str, str]],
    host: Mapping[str, np.ndarray],
    bins: int,
    histogram_segments: int,
) -> None:
    moments = host["moments"].reshape(-1, 2)
    counts = host["counts"].reshape(-1, bins)
    ranges = host["ranges"].reshape(-1, 2)
    names = {
        m.HIST_ACT: (m.ACT_MEAN, m.ACT_STD, m.ACT_NONFINITE),
        m.HIST_GRAD: (m.GRAD_MEAN, m.GRAD_STD, m.GRAD_NONFINITE),
        m.HIST_PARAM: (m.PARAM_MEAN, m.PARAM_STD, m.PARAM_NONFINITE),
        m.HIST_PARAM_GRAD: (m.PARAM_GRAD_MEAN, m.PARAM_GRAD_STD, m.PARAM_GRAD_NONFINITE),
    }
    parameter_std: dict[str, float] = {}
    squared_grad_norm = None
    for index, (layer, kind) in enumerate(labels):
        mean, std = float(moments[index, 0]), float(moments[index, 1])
        if kind == "update":
            diagnostics.add_scalar(step, layer, m.UPDATE_TO_DATA, _ratio(std, parameter_std[layer]))
            continue
        mean_name, std_name, nonfinite_name = names[kind]
        diagnostics.add_scalar(step, layer, mean_name, mean)
        diagnostics.add_scalar(step, layer, std_name, std)
        diagnostics.add_scalar(step, layer, nonfinite_name, float(host["nonfinite"][index]))
        if index < histogram_segments:
            lo, hi = float(ranges[index, 0]), float(ranges[index, 1])
            diagnostics.add_histogram(step, layer, kind, Histogram(counts[index].round().astype(np.int64), lo, hi))
        if kind == m.HIST_PARAM:
            parameter_std[layer] = std
        elif kind == m.HIST_PARAM_GRAD:
            norm = float(host["norms"][index])
            diagnostics.add_scalar(step, layer, m.PARAM_GRAD_NORM, norm)
            squared_grad_norm = (squared_grad_norm or 0.0) + norm * norm
            if layer in parameter_std:
                diagnostics.add_scalar(step, layer, m.GRAD_TO_DATA, _ratio(std, parameter_std[layer]))
    if squared_grad_norm is not None:
        diagnostics.add_scalar(step, m.GLOBAL, m.GRAD_NORM, math.sqrt(squared_grad_norm))
