"""Turn the tensors captured during one recording step into statistics.

On a histogram step every recorded tensor is captured as a copy, and :func:`summarise` computes all their
statistics and histograms together with numpy, on float64 values, in groups of at most :data:`CHUNK_ELEMENTS`
elements. On the other recording steps module outputs, their gradients and (for models above
``SMALL_MODEL_ELEMENTS`` parameters, see the monitor) the parameters are reduced at once where they lie, without a
copy: with numpy on views of tensors in CPU memory, with torch on a device (:func:`immediate_sums`); small models'
parameters are copied flat and summarised with numpy, several steps together (:func:`summarise_all`). Float64
models keep every bit; bfloat16 and float16 ones are summarised in float32. Copies on a GPU are moved to the host
group by group. Each step becomes a :class:`StepRecord`.

With a :class:`~normlab.diagnostics.distributed.Reducer` the statistics of module outputs and of their
gradients are over the global batch: partial sums, saturated counts, flags of units and histogram counts (over
a range agreed first) are all-reduced. The gradient reaching an output is divided by the number of processes,
as DDP divides the parameters' gradients, so that it is the gradient of the global batch's mean loss (exactly,
for a power-of-two number of processes).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from normlab.diagnostics import metrics as m
from normlab.diagnostics.capture import Capture, Output, Piece
from normlab.diagnostics.distributed import Reducer
from normlab.diagnostics.layers import HARD
from normlab.diagnostics.stats import (
    HostSegments,
    finish_histograms,
    host_segment_histograms,
    host_segment_ranges,
    host_segment_sums,
    host_segments,
    moments_from_sums,
    saturation_mask,
    sums_from_moments,
    units_any,
)
from normlab.diagnostics.storage import Histogram

CHUNK_ELEMENTS = 1 << 22
UPDATE = "update"
BATCH_KINDS = (m.HIST_ACT, m.HIST_GRAD)  # statistics of the batch, reduced over the processes


@dataclass(frozen=True)
class StepRecord:
    """The statistics of one recording step: ``(layer, metric, value)`` scalars and ``(layer, kind, Histogram)``."""

    step: int
    scalars: list[tuple[str, str, float]]
    histograms: list[tuple[str, str, Histogram]]


def _groups(pieces: list[Piece]) -> Iterator[tuple[list[Piece], int]]:
    """Consecutive copied pieces in groups of at most :data:`CHUNK_ELEMENTS` elements (a larger one alone),
    each with the index of its first segment among all segments."""
    group: list[Piece] = []
    size = first = index = 0
    for piece in pieces:
        if piece.tensor is not None:
            if group and size + piece.tensor.numel() > CHUNK_ELEMENTS:
                yield group, first
                group, size = [], 0
            if not group:
                first = index
            group.append(piece)
            size += piece.tensor.numel()
        elif group:
            yield group, first
            group, size = [], 0
        index += len(piece.labels)
    if group:
        yield group, first


def _host(tensor: torch.Tensor) -> np.ndarray:
    """The values of a copy as a flat numpy array (copies are detached; one on a GPU comes to the host)."""
    return (tensor.numpy() if tensor.device.type == "cpu" else tensor.cpu().numpy()).reshape(-1)


def _values(group: list[Piece]) -> np.ndarray:
    parts = [
        _host(p.tensor) if p.minus is None else np.subtract(_host(p.tensor), _host(p.minus), dtype=np.float64)
        for p in group
    ]
    return np.concatenate(parts, dtype=np.float64) if len(parts) > 1 else parts[0].astype(np.float64)


def _layout(numels: list[int], cache: dict) -> HostSegments:
    key = tuple(numels)
    if key not in cache:
        if len(cache) >= 16:
            cache.clear()
        cache[key] = host_segments(numels)
    return cache[key]


@dataclass
class _Units:
    """Unit statistics of the recorded outputs: saturated counts and per-unit flags, each tagged by layer."""

    saturated: list[tuple[str, int, float]] = field(default_factory=list)  # (layer, elements, count)
    fired: list[tuple[str, str, np.ndarray]] = field(default_factory=list)  # (layer, gate, any > 0 per unit)
    unsaturated: list[tuple[str, np.ndarray]] = field(default_factory=list)  # (layer, any not saturated)


def _on_host(flags: torch.Tensor | np.ndarray) -> np.ndarray:
    return flags.cpu().numpy() if isinstance(flags, torch.Tensor) else flags


def _unit_statistics(outputs: list[Output], threshold: float) -> _Units:
    units = _Units()
    for output in outputs:
        (key, _), numel = output.piece.labels[0], output.piece.numels[0]
        copy = output.piece.tensor
        values = copy.detach().cpu().numpy() if copy is not None else None
        mask = None
        if output.bound is not None:
            if values is not None:
                mask = saturation_mask(values, threshold, output.bound)
                count = float(np.count_nonzero(mask))
            else:
                count = float(output.saturated)
            units.saturated.append((key, numel, count))
            if output.unit_axis is not None:
                flags = units_any(~mask, output.unit_axis) if mask is not None else _on_host(output.unsaturated)
                units.unsaturated.append((key, np.asarray(flags, dtype=np.float64)))
        if output.gate is not None and output.unit_axis is not None:
            flags = units_any(values > 0, output.unit_axis) if values is not None else _on_host(output.fired)
            units.fired.append((key, output.gate, np.asarray(flags, dtype=np.float64)))
    return units


def summarise(
    capture: Capture,
    *,
    bins: int,
    saturation_threshold: float,
    reducer: Reducer | None = None,
    cache: dict | None = None,
) -> StepRecord:
    """Every statistic of ``capture``: over this process's tensors, or, with ``reducer``, over the group's.

    ``cache`` (a dict kept between calls) lets repeated steps reuse their segment layouts.
    """
    cache = {} if cache is None else cache
    pieces = capture.pieces()
    labels = [label for piece in pieces for label in piece.labels]
    lengths = [n for piece in pieces for n in piece.numels]
    batch = sum(kind in BATCH_KINDS for _, kind in labels)  # the first segments: outputs and their gradients
    histogrammed = sum(kind != UPDATE for _, kind in labels) if capture.histograms else 0
    sums = np.zeros((2, len(labels)))
    ranges = np.zeros((histogrammed, 2))
    counts = np.zeros((histogrammed, bins), dtype=np.int64)
    kept = []  # (values, segments, first index) of each group, for a second histogram pass
    for group, first in _groups(pieces):
        values = _values(group)
        segments = _layout([n for piece in group for n in piece.numels], cache)
        sums[:, first : first + segments.count] = host_segment_sums(values, segments)
        with_histogram = min(max(histogrammed - first, 0), segments.count)
        if with_histogram and reducer is None:
            prefix = segments.prefix(with_histogram)
            counts[first : first + with_histogram], ranges[first : first + with_histogram] = (
                host_segment_histograms(values[: sum(prefix.lengths)], prefix, bins)
            )
        elif with_histogram:
            prefix = segments.prefix(with_histogram)
            ranges[first : first + with_histogram] = host_segment_ranges(values[: sum(prefix.lengths)], prefix)
            kept.append((values, prefix, first))
    _add_taken_sums(pieces, sums)
    units = _unit_statistics(capture.outputs, saturation_threshold)
    loss = math.nan if capture.loss is None else float(capture.loss)
    if reducer is not None:
        sums, units, loss, lengths = _reduce(reducer, sums, batch, units, loss, labels, lengths)
        if histogrammed:
            ranges, counts = _reduce_histograms(reducer, ranges, counts, kept, batch, bins)
        scale = 1.0 / reducer.world_size  # the output gradients of the global batch's mean loss
        for index, (_, kind) in enumerate(labels[:batch]):
            if kind == m.HIST_GRAD:
                sums[:, index] *= (scale, scale * scale)
                if index < histogrammed:
                    ranges[index] *= scale
    scalars = _finish_scalars(labels, moments_from_sums(sums, lengths).tolist(), units)
    scalars += _globals(capture, loss)
    histograms = []
    if histogrammed:
        finished_counts, finished_ranges = finish_histograms(counts, ranges)
        histograms = [
            (layer, kind, Histogram(finished_counts[index], *finished_ranges[index].tolist()))
            for index, (layer, kind) in enumerate(labels[:histogrammed])
        ]
    return StepRecord(capture.step, scalars, histograms)


def summarise_all(
    captures: list[Capture],
    *,
    bins: int,
    saturation_threshold: float,
    reducer: Reducer | None = None,
    cache: dict | None = None,
) -> list[StepRecord]:
    """The records of several recording steps, in order.

    Consecutive steps without histograms (in a single process) are summarised together: each group of copies
    with numpy as in :func:`summarise`, and the moments, the sums taken at once and the scalars of all of them in
    one pass; the others go one by one through :func:`summarise`. The numbers are the same either way (every
    operation shared by several steps is elementwise).
    """
    cache = {} if cache is None else cache
    records: list[StepRecord] = []
    together: list[Capture] = []
    for capture in captures:
        if reducer is None and not capture.histograms:
            together.append(capture)
            continue
        if together:
            records += _scalar_records(together, saturation_threshold, cache)
            together = []
        records.append(summarise(capture, bins=bins, saturation_threshold=saturation_threshold, reducer=reducer,
                                 cache=cache))
    if together:
        records += _scalar_records(together, saturation_threshold, cache)
    return records


def _scalar_records(captures: list[Capture], saturation_threshold: float, cache: dict) -> list[StepRecord]:
    pieces_of = [capture.pieces() for capture in captures]
    pieces = [piece for step_pieces in pieces_of for piece in step_pieces]
    labels = [label for piece in pieces for label in piece.labels]
    lengths = [n for piece in pieces for n in piece.numels]
    sums = np.zeros((2, len(labels)))
    for group, first in _groups(pieces):
        segments = _layout([n for piece in group for n in piece.numels], cache)
        sums[:, first : first + segments.count] = host_segment_sums(_values(group), segments)
    _add_taken_sums(pieces, sums)
    moments = moments_from_sums(sums, lengths)
    records, start = [], 0
    for capture, step_pieces in zip(captures, pieces_of):
        end = start + sum(len(piece.labels) for piece in step_pieces)
        units = _unit_statistics(capture.outputs, saturation_threshold)
        scalars = _finish_scalars(labels[start:end], moments[:, start:end].tolist(), units)
        loss = math.nan if capture.loss is None else float(capture.loss)
        records.append(StepRecord(capture.step, scalars + _globals(capture, loss), []))
        start = end
    return records


def _globals(capture: Capture, loss: float) -> list[tuple[str, str, float]]:
    scalars = []
    if capture.loss is not None:
        scalars.append((m.GLOBAL, m.LOSS, loss))
    if capture.learning_rate is not None:
        scalars.append((m.GLOBAL, m.LEARNING_RATE, float(capture.learning_rate)))
    return scalars


def _add_taken_sums(pieces: list[Piece], sums: np.ndarray) -> None:
    """Put the sums taken at once with torch into ``sums`` (one copy to the host for all of them)."""
    taken = [(index, piece) for index, piece in _indexed(pieces) if piece.sums is not None]
    if taken:
        parts = [part for _, piece in taken for part in piece.sums]
        if any(isinstance(part, torch.Tensor) for part in parts):
            parts = torch.stack([torch.as_tensor(part) for part in parts]).cpu().numpy()
        totals, deviations = np.asarray(parts, dtype=np.float64).reshape(-1, 2).T
        numels = np.array([piece.numels[0] for _, piece in taken], dtype=np.float64)
        sums[:, [index for index, _ in taken]] = sums_from_moments(totals, deviations, numels)


def _indexed(pieces: list[Piece]) -> Iterator[tuple[int, Piece]]:
    index = 0
    for piece in pieces:
        yield index, piece
        index += len(piece.labels)


def _reduce(
    reducer: Reducer, sums: np.ndarray, batch: int, units: _Units, loss: float,
    labels: list[tuple[str, str]], lengths: list[int],
) -> tuple[np.ndarray, _Units, float, list[int]]:
    """Sum the batch statistics over the processes: counts, sums, saturated counts, loss; unit flags by max.

    Returns the reduced sums, unit statistics, mean loss and segment lengths.
    """
    flags = [f for _, _, f in units.fired] + [f for _, f in units.unsaturated]
    reducer.check_layout([*lengths[:batch], *(f.size for f in flags)], "module outputs")
    local = np.concatenate([
        np.asarray(lengths[:batch], dtype=np.float64), sums[:, :batch].reshape(-1),
        [count for _, _, count in units.saturated], [loss],
    ])
    total = reducer.sum(local)
    counts, rest = total[:batch], total[batch:]
    sums = sums.copy()
    sums[:, :batch] = rest[: 2 * batch].reshape(2, batch)
    saturated = rest[2 * batch : 2 * batch + len(units.saturated)]
    reduced = _Units(
        saturated=[(layer, int(n), float(c)) for (layer, _, _), n, c in zip(
            units.saturated, _counts_of(units.saturated, labels, counts), saturated)],
    )
    if flags:
        merged = reducer.max(np.concatenate(flags))
        offsets = np.cumsum([0] + [f.size for f in flags])
        parts = [merged[a:b] for a, b in zip(offsets[:-1], offsets[1:])]
        fired, unsaturated = parts[: len(units.fired)], parts[len(units.fired) :]
        reduced.fired = [(layer, gate, f) for (layer, gate, _), f in zip(units.fired, fired)]
        reduced.unsaturated = [(layer, f) for (layer, _), f in zip(units.unsaturated, unsaturated)]
    lengths = [*(int(n) for n in counts), *lengths[batch:]]
    return sums, reduced, float(rest[-1]) / reducer.world_size, lengths


def _counts_of(saturated: list[tuple[str, int, float]], labels: list[tuple[str, str]], counts: np.ndarray) -> list:
    where = {label: index for index, label in enumerate(labels)}
    return [counts[where[(layer, m.HIST_ACT)]] for layer, _, _ in saturated]


def _reduce_histograms(
    reducer: Reducer, ranges: np.ndarray, counts: np.ndarray, kept: list, batch: int, bins: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Agree on each batch histogram's range (min and max over the processes), then sum the counts over it."""
    shared = min(batch, len(ranges))
    local = ranges[:shared].copy()
    local[~np.isfinite(local).all(axis=1)] = (-math.inf, math.inf)  # NaN or Inf anywhere: an empty histogram
    extremes = reducer.max(np.concatenate([-local[:, 0], local[:, 1]]))
    ranges = ranges.copy()
    ranges[:shared, 0], ranges[:shared, 1] = -extremes[:shared], extremes[shared:]
    for values, prefix, first in kept:
        rows = slice(first, first + prefix.count)
        counts[rows], _ = host_segment_histograms(values[: sum(prefix.lengths)], prefix, bins, ranges[rows])
    counts = counts.copy()
    counts[:shared] = np.rint(reducer.sum(counts[:shared])).astype(np.int64)
    return ranges, counts


_NAMES = {
    m.HIST_ACT: (m.ACT_MEAN, m.ACT_STD, m.ACT_NONFINITE),
    m.HIST_GRAD: (m.GRAD_MEAN, m.GRAD_STD, m.GRAD_NONFINITE),
    m.HIST_PARAM: (m.PARAM_MEAN, m.PARAM_STD, m.PARAM_NONFINITE),
    m.HIST_PARAM_GRAD: (m.PARAM_GRAD_MEAN, m.PARAM_GRAD_STD, m.PARAM_GRAD_NONFINITE),
}


def _ratio(numerator: float, denominator: float) -> float:
    if denominator != 0:
        return numerator / denominator
    return math.nan if numerator == 0 or math.isnan(numerator) else math.inf


def _share_of_zeros(flags: np.ndarray) -> float:
    return (flags.size - np.count_nonzero(flags)) / flags.size if flags.size else math.nan


def _finish_scalars(
    labels: list[tuple[str, str]], moments: list[list[float]], units: _Units
) -> list[tuple[str, str, float]]:
    """The scalars of one step from its segments' moments (mean, std, norm, non-finite flag lists)."""
    mean, std, norm, nonfinite = moments
    scalars: list[tuple[str, str, float]] = []
    parameter_std: dict[str, float] = {}
    squared_grad_norm = None
    for index, (layer, kind) in enumerate(labels):
        if kind == UPDATE:
            scalars.append((layer, m.UPDATE_TO_DATA, _ratio(std[index], parameter_std[layer])))
            continue
        mean_name, std_name, nonfinite_name = _NAMES[kind]
        scalars += [
            (layer, mean_name, mean[index]),
            (layer, std_name, std[index]),
            (layer, nonfinite_name, nonfinite[index]),
        ]
        if kind == m.HIST_PARAM:
            parameter_std[layer] = std[index]
        elif kind == m.HIST_PARAM_GRAD:
            scalars.append((layer, m.PARAM_GRAD_NORM, norm[index]))
            squared_grad_norm = (squared_grad_norm or 0.0) + norm[index] * norm[index]
            if layer in parameter_std:
                scalars.append((layer, m.GRAD_TO_DATA, _ratio(std[index], parameter_std[layer])))
    if squared_grad_norm is not None:
        scalars.append((m.GLOBAL, m.GRAD_NORM, math.sqrt(squared_grad_norm)))
    for layer, numel, count in units.saturated:
        scalars.append((layer, m.ACT_SATURATED, count / numel if numel else math.nan))
    for layer, flags in units.unsaturated:
        scalars.append((layer, m.ACT_SATURATED_UNITS, _share_of_zeros(flags)))
    for layer, gate, flags in units.fired:
        scalars.append((layer, m.ACT_DEAD if gate == HARD else m.ACT_NEGATIVE, _share_of_zeros(flags)))
    return scalars
