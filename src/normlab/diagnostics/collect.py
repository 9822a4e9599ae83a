"""Turn the tensors captured during one recording step into diagnostics.

The captured tensors are flattened into a few long vectors (at most :data:`CHUNK_ELEMENTS` each, which bounds
the extra memory of a recording step) and the statistics of all of them are computed together (see
:mod:`normlab.diagnostics.stats`): for tensors in CPU memory with numpy, which reads them in place; for
tensors on a GPU with torch on the device, the results packed into one tensor and copied to the host once.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from normlab.diagnostics import metrics as m
from normlab.diagnostics.stats import (
    HostSegments,
    Segments,
    dead_fraction,
    finish_histograms,
    host_segment_histograms,
    host_segment_sums,
    host_segments,
    make_segments,
    moments_from_sums,
    saturated_fraction,
    segment_histograms,
    segment_sums,
)
from normlab.diagnostics.storage import Diagnostics, Histogram

CHUNK_ELEMENTS = 1 << 22
UPDATE = "update"
HOST_DEVICES = ("cpu",)  # device types whose tensors numpy reads in place


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
        host = torch.cat(self.parts).to(self.dtype).cpu().numpy()  # the one device-to-host copy of a step
        return {key: host[where] for key, where in self.slices.items()}


_Scalar = tuple[str, str, "torch.Tensor | float | None"]  # (layer, metric, value)


@dataclass
class _Raw:
    """The raw statistics of every segment of a step, on the host, before they are finished."""

    labels: list[tuple[str, str]] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)
    sums: list[np.ndarray] = field(default_factory=list)  # (2, S) per group
    counts: list[np.ndarray] = field(default_factory=list)  # (H, bins) per group
    ranges: list[np.ndarray] = field(default_factory=list)  # (H, 2) per group
    scalars: list[tuple[str, str, float]] = field(default_factory=list)  # (layer, metric, value)


def _groups(pieces: list[_Piece], raw: _Raw) -> Iterator[tuple[list[_Piece], list[int], int]]:
    """Consecutive pieces in groups of at most :data:`CHUNK_ELEMENTS` elements (a larger piece alone).

    Records each group's segment labels and lengths in ``raw`` and yields the group, its segment lengths and
    how many of its segments get a histogram: all but the updates, which come last.
    """
    groups: list[list[_Piece]] = []
    size = 0
    for piece in pieces:
        if not groups or size + piece.tensor.numel() > CHUNK_ELEMENTS:
            groups.append([])
            size = 0
        groups[-1].append(piece)
        size += piece.tensor.numel()
    for group in groups:
        labels = [label for piece in group for label in piece.labels]
        lengths = [n for piece in group for n in piece.numels]
        raw.labels += labels
        raw.lengths += lengths
        yield group, lengths, sum(kind != UPDATE for _, kind in labels)


def _layout(numels: list[int], device: torch.device | None, cache: dict) -> Segments | HostSegments:
    """The (cached) layout of ``numels``: on ``device`` for the torch reductions, or for numpy's (None)."""
    key = (tuple(numels), device)
    if key not in cache:
        if len(cache) >= 8:
            cache.clear()
        cache[key] = host_segments(numels) if device is None else make_segments(numels, device)
    return cache[key]


def _ratio(numerator: float, denominator: float) -> float:
    if denominator != 0:
        return numerator / denominator
    return math.nan if numerator == 0 or math.isnan(numerator) else math.inf


def _pieces(capture: Capture, parameter_names: list[str], parameter_numels: list[int]) -> list[_Piece]:
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
    return pieces


def _extras(capture: Capture, diagnostics: Diagnostics, saturation_threshold: float) -> Iterator[_Scalar]:
    """``(layer, metric, value)`` of the step's other statistics; values are tensors, floats or None."""
    for key, tensor in capture.activations:
        info = diagnostics.modules[key]
        if info.bound is not None:
            yield key, m.ACT_SATURATED, saturated_fraction(tensor, saturation_threshold, info.bound)
        if info.relu_like and tensor.dim() > 0:
            yield key, m.ACT_DEAD, dead_fraction(tensor)
    yield m.GLOBAL, m.LOSS, capture.loss
    yield m.GLOBAL, m.LEARNING_RATE, capture.learning_rate


def _host_array(tensor: torch.Tensor) -> np.ndarray:
    return (tensor if tensor.dtype == torch.float32 else tensor.float()).numpy()


def _on_host(pieces: list[_Piece], raw: _Raw, extras: Iterator[_Scalar], bins: int, cache: dict) -> None:
    """Every statistic with numpy, for tensors in CPU memory."""
    for group, lengths, with_histogram in _groups(pieces, raw):
        values = np.concatenate([_host_array(piece.tensor) for piece in group], dtype=np.float64)
        segments = _layout(lengths, None, cache)
        raw.sums.append(host_segment_sums(values, segments))
        if with_histogram:
            prefix = segments.prefix(with_histogram)
            counts, ranges = host_segment_histograms(values[: sum(prefix.lengths)], prefix, bins)
            raw.counts.append(counts)
            raw.ranges.append(ranges)
    for layer, metric, value in extras:
        if value is not None:
            raw.scalars.append((layer, metric, float(value)))


def _on_device(pieces: list[_Piece], raw: _Raw, extras: Iterator[_Scalar], bins: int, cache: dict) -> None:
    """Every statistic with torch on the tensors' device, then one copy of all the results to the host."""
    device = pieces[0].tensor.device if pieces else torch.device("cpu")
    packer = _Packer(device, torch.float32 if device.type == "mps" else torch.float64)
    for number, (group, lengths, with_histogram) in enumerate(_groups(pieces, raw)):
        values = torch.cat(
            [piece.tensor if piece.tensor.device == device else piece.tensor.to(device) for piece in group]
        )
        values = values if values.dtype == torch.float32 else values.float()
        segments = _layout(lengths, device, cache)
        packer.add(f"sums{number}", segment_sums(values, segments))
        if with_histogram:
            prefix = segments.prefix(with_histogram)
            counts, ranges = segment_histograms(values[: prefix.ids.numel()], prefix, bins)
            packer.add(f"counts{number}", counts)
            packer.add(f"ranges{number}", ranges)
    later = []
    for number, (layer, metric, value) in enumerate(extras):
        if isinstance(value, torch.Tensor):
            packer.add(f"scalar{number}", value)
            later.append((number, layer, metric))
        elif value is not None:
            raw.scalars.append((layer, metric, float(value)))
    host = packer.fetch()
    raw.sums += [host[key].reshape(2, -1) for key in host if key.startswith("sums")]
    raw.counts += [host[key].reshape(-1, bins) for key in host if key.startswith("counts")]
    raw.ranges += [host[key].reshape(-1, 2) for key in host if key.startswith("ranges")]
    raw.scalars += [(layer, metric, float(host[f"scalar{number}"][0])) for number, layer, metric in later]


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

    Tensors in CPU memory are summarised with numpy (see :mod:`normlab.diagnostics.stats`), others with torch
    on their device. ``cache`` (a dict kept between calls) lets repeated steps reuse their segment layouts.
    """
    cache = {} if cache is None else cache
    pieces = _pieces(capture, parameter_names, parameter_numels)
    extras = _extras(capture, diagnostics, saturation_threshold)
    on_host = not pieces or pieces[0].tensor.device.type in HOST_DEVICES
    raw = _Raw()
    (_on_host if on_host else _on_device)(pieces, raw, extras, bins, cache)
    diagnostics.add_scalars(step, raw.scalars)
    if raw.labels:
        _add_statistics(diagnostics, step, raw, bins)


_NAMES = {
    m.HIST_ACT: (m.ACT_MEAN, m.ACT_STD, m.ACT_NONFINITE),
    m.HIST_GRAD: (m.GRAD_MEAN, m.GRAD_STD, m.GRAD_NONFINITE),
    m.HIST_PARAM: (m.PARAM_MEAN, m.PARAM_STD, m.PARAM_NONFINITE),
    m.HIST_PARAM_GRAD: (m.PARAM_GRAD_MEAN, m.PARAM_GRAD_STD, m.PARAM_GRAD_NONFINITE),
}


def _add_statistics(diagnostics: Diagnostics, step: int, raw: _Raw, bins: int) -> None:
    mean, std, norm, nonfinite = moments_from_sums(np.concatenate(raw.sums, axis=1), raw.lengths).tolist()
    counts, ranges = finish_histograms(
        np.concatenate(raw.counts) if raw.counts else np.zeros((0, bins)),
        np.concatenate(raw.ranges) if raw.ranges else np.zeros((0, 2)),
    )
    ranges = ranges.tolist()
    scalars: list[tuple[str, str, float]] = []
    parameter_std: dict[str, float] = {}
    squared_grad_norm = None
    for index, (layer, kind) in enumerate(raw.labels):
        if kind == UPDATE:
            scalars.append((layer, m.UPDATE_TO_DATA, _ratio(std[index], parameter_std[layer])))
            continue
        mean_name, std_name, nonfinite_name = _NAMES[kind]
        scalars += [
            (layer, mean_name, mean[index]),
            (layer, std_name, std[index]),
            (layer, nonfinite_name, nonfinite[index]),
        ]
        diagnostics.add_histogram(step, layer, kind, Histogram(counts[index], *ranges[index]))
        if kind == m.HIST_PARAM:
            parameter_std[layer] = std[index]
        elif kind == m.HIST_PARAM_GRAD:
            scalars.append((layer, m.PARAM_GRAD_NORM, norm[index]))
            squared_grad_norm = (squared_grad_norm or 0.0) + norm[index] * norm[index]
            if layer in parameter_std:
                scalars.append((layer, m.GRAD_TO_DATA, _ratio(std[index], parameter_std[layer])))
    if squared_grad_norm is not None:
        scalars.append((m.GLOBAL, m.GRAD_NORM, math.sqrt(squared_grad_norm)))
    diagnostics.add_scalars(step, scalars)
