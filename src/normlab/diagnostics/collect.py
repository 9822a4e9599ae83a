"""Turn the tensors captured during one recording step into diagnostics, with one device-to-host copy.

The captured tensors are flattened into a few long vectors (at most :data:`CHUNK_ELEMENTS` each, which bounds
the extra memory of a recording step), the statistics of all of them are computed together (see
:mod:`normlab.diagnostics.stats`), packed into one tensor, and copied to the host once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from normlab.diagnostics import metrics as m
from normlab.diagnostics.stats import (
    Segments,
    dead_fraction,
    finish_histogram,
    make_segments,
    moments_from_sums,
    saturated_fraction,
    segment_histograms,
    segment_sums,
)
from normlab.diagnostics.storage import Diagnostics, Histogram

CHUNK_ELEMENTS = 1 << 22
UPDATE = "update"


@dataclass
class Capture:
    """Tensors captured during one recording step, still on their device.

    ``parameter_values`` and ``updates`` are the recorded parameters flattened and concatenated (in the
    monitor's parameter order); ``parameter_grads`` concatenates the gradients of the parameters named in
    ``grad_names`` (those that had a gradient), of sizes ``grad_numels``.
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


@dataclass
class _Piece:
    """One flat tensor made of one or more segments, each labelled ``(layer, kind)``."""

    tensor: torch.Tensor
    labels: list[tuple[str, str]]
    numels: list[int]


class _Packer:
    """Collects small result tensors and copies them to the host in one transfer."""

    def __init__(self, device: torch.device, dtype: torch.dtype) -> None:
        self.device, self.dtype = device, dtype
        self.parts: list[torch.Tensor] = []
        self.slices: dict[str, slice] = {}
        self.size = 0

    def add(self, key: str, tensor: torch.Tensor) -> None:
        flat = tensor.reshape(-1)  # torch.cat in fetch promotes every part to the widest dtype
        if flat.device != self.device:
            flat = flat.to(self.device)
        self.slices[key] = slice(self.size, self.size + flat.numel())
        self.size += flat.numel()
        self.parts.append(flat)

    def fetch(self) -> dict[str, np.ndarray]:
        if not self.parts:
            return {}
        host = torch.cat(self.parts).to(self.dtype).cpu().numpy()  # the one device-to-host copy of the step
        return {key: host[where] for key, where in self.slices.items()}


def _groups(pieces: list[_Piece]) -> list[list[_Piece]]:
    groups: list[list[_Piece]] = []
    size = 0
    for piece in pieces:
        if not groups or size + piece.tensor.numel() > CHUNK_ELEMENTS:
            groups.append([])
            size = 0
        groups[-1].append(piece)
        size += piece.tensor.numel()
    return groups


def _segments(numels: list[int], device: torch.device, cache: dict) -> Segments:
    key = (tuple(numels), device)
    if key not in cache:
        if len(cache) >= 8:
            cache.clear()
        cache[key] = make_segments(numels, device)
    return cache[key]


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
    cache: dict | None = None,
) -> None:
    """Compute every statistic of ``capture`` and add them to ``diagnostics`` at ``step``.

    ``cache`` (a dict kept between calls) lets repeated steps reuse their segment layouts.
    """
    cache = {} if cache is None else cache
    pieces = [_Piece(t.reshape(-1), [(key, m.HIST_ACT)], [t.numel()]) for key, t in capture.activations]
    pieces += [
        _Piece(t.reshape(-1), [(key, m.HIST_GRAD)], [t.numel()]) for key, t in capture.activation_grads
    ]
    if capture.parameter_values is not None:
        names = [(name, m.HIST_PARAM) for name in parameter_names]
        pieces.append(_Piece(capture.parameter_values, names, parameter_numels))
    if capture.parameter_grads is not None:
        names = [(name, m.HIST_PARAM_GRAD) for name in capture.grad_names]
        pieces.append(_Piece(capture.parameter_grads, names, capture.grad_numels))
    if capture.updates is not None:
        names = [(name, UPDATE) for name in parameter_names]
        pieces.append(_Piece(capture.updates, names, parameter_numels))

    device = pieces[0].tensor.device if pieces else torch.device("cpu")
    packer = _Packer(device, torch.float32 if device.type == "mps" else torch.float64)
    labels: list[tuple[str, str]] = []
    lengths: list[int] = []
    for number, group in enumerate(_groups(pieces)):
        values = torch.cat(
            [piece.tensor if piece.tensor.device == device else piece.tensor.to(device) for piece in group]
        )
        values = values if values.dtype == torch.float32 else values.float()
        group_lengths = [n for piece in group for n in piece.numels]
        segments = _segments(group_lengths, device, cache)
        packer.add(f"sums{number}", segment_sums(values, segments).T)
        group_labels = [label for piece in group for label in piece.labels]
        with_histogram = sum(kind != UPDATE for _, kind in group_labels)  # updates come last
        if with_histogram:
            prefix = segments.prefix(with_histogram)
            counts, ranges = segment_histograms(values[: prefix.ids.numel()], prefix, bins)
            packer.add(f"histogram{number}", torch.cat([ranges, counts.to(ranges.dtype)], dim=1))
        labels += group_labels
        lengths += group_lengths
    extra: list[tuple[str, str]] = []
    for key, tensor in capture.activations:
        info = diagnostics.modules[key]
        if info.bound is not None:
            extra.append((key, m.ACT_SATURATED))
            packer.add(str(len(extra)), saturated_fraction(tensor, saturation_threshold, info.bound))
        if info.relu_like and tensor.dim() > 0:
            extra.append((key, m.ACT_DEAD))
            packer.add(str(len(extra)), dead_fraction(tensor))
    for name, value in ((m.LOSS, capture.loss), (m.LEARNING_RATE, capture.learning_rate)):
        if isinstance(value, torch.Tensor):
            extra.append((m.GLOBAL, name))
            packer.add(str(len(extra)), value)
        elif value is not None:
            diagnostics.add_scalar(step, m.GLOBAL, name, float(value))
    host = packer.fetch()

    for number, (layer, metric) in enumerate(extra, start=1):
        diagnostics.add_scalar(step, layer, metric, float(host[str(number)][0]))
    if labels:
        sums = np.concatenate([host[key].reshape(-1, 2) for key in host if key.startswith("sums")])
        rows = [host[key].reshape(-1, bins + 2) for key in host if key.startswith("histogram")]
        histograms = np.concatenate(rows) if rows else np.zeros((0, bins + 2))
        _add_statistics(diagnostics, step, labels, lengths, sums, histograms)


_NAMES = {
    m.HIST_ACT: (m.ACT_MEAN, m.ACT_STD, m.ACT_NONFINITE),
    m.HIST_GRAD: (m.GRAD_MEAN, m.GRAD_STD, m.GRAD_NONFINITE),
    m.HIST_PARAM: (m.PARAM_MEAN, m.PARAM_STD, m.PARAM_NONFINITE),
    m.HIST_PARAM_GRAD: (m.PARAM_GRAD_MEAN, m.PARAM_GRAD_STD, m.PARAM_GRAD_NONFINITE),
}


def _add_statistics(
    diagnostics: Diagnostics,
    step: int,
    labels: list[tuple[str, str]],
    lengths: list[int],
    sums: np.ndarray,
    histograms: np.ndarray,
) -> None:
    parameter_std: dict[str, float] = {}
    squared_grad_norm = None
    all_counts = np.rint(histograms[:, 2:]).astype(np.int64)
    ranges = histograms[:, :2].tolist()
    for index, ((layer, kind), count, (total, total_of_squares)) in enumerate(
        zip(labels, lengths, sums.tolist(), strict=True)
    ):
        mean, std, norm, nonfinite = moments_from_sums(total, total_of_squares, count)
        if kind == UPDATE:
            diagnostics.add_scalar(step, layer, m.UPDATE_TO_DATA, _ratio(std, parameter_std[layer]))
            continue
        mean_name, std_name, nonfinite_name = _NAMES[kind]
        diagnostics.add_scalar(step, layer, mean_name, mean)
        diagnostics.add_scalar(step, layer, std_name, std)
        diagnostics.add_scalar(step, layer, nonfinite_name, nonfinite)
        diagnostics.add_histogram(
            step, layer, kind, Histogram(*finish_histogram(all_counts[index], *ranges[index]))
        )
        if kind == m.HIST_PARAM:
            parameter_std[layer] = std
        elif kind == m.HIST_PARAM_GRAD:
            diagnostics.add_scalar(step, layer, m.PARAM_GRAD_NORM, norm)
            squared_grad_norm = (squared_grad_norm or 0.0) + norm * norm
            if layer in parameter_std:
                diagnostics.add_scalar(step, layer, m.GRAD_TO_DATA, _ratio(std, parameter_std[layer]))
    if squared_grad_norm is not None:
        diagnostics.add_scalar(step, m.GLOBAL, m.GRAD_NORM, math.sqrt(squared_grad_norm))
