"""Statistics of tensors, as pure functions: vectorised reductions over many tensors at once.

Several tensors are summarised together by flattening them into one float64 numpy vector and describing its
layout (one segment per original tensor, :class:`HostSegments`): a handful of vectorised operations then
replace a loop of small ones per tensor, which is what keeps a recording step cheap on small models.
:func:`host_segment_sums` gives each segment's sum and sum of squares, :func:`host_segment_ranges` its minimum
and maximum, :func:`host_segment_histograms` its bin counts (over its own range, or over ranges given, e.g. agreed
by the processes of a distributed run); :func:`moments_from_sums` and :func:`finish_histograms` turn them into the
reported statistics. Large tensors are summarised where they are, with torch (:func:`tensor_sums`), without a copy.

Units (:func:`units_any`, :func:`units_all`): the dead and saturated shares of a layer's output are counted per
unit, one index along its unit axis (the channel axis 1 of ``(N, C, *)`` outputs, the last axis of ``(N, *, F)``
outputs); a unit is reduced over every other axis, i.e. over the batch and all positions.

Conventions (shared with the lesson): ``std`` is the unbiased standard deviation (Bessel's correction, as
``torch.Tensor.std``), except that a single value has std 0 instead of NaN. Histograms have ``bins``
equal-width bins over ``[lo, hi]``, the minimum and maximum of the tensor; the last bin includes ``hi``, as in
``numpy.histogram``. A tensor holding NaN or Inf is flagged, and its histogram left empty.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

TANH = "tanh"
SIGMOID = "sigmoid"
ONE_PASS_ELEMENTS = 1 << 15


def moments_from_sums(sums: np.ndarray, counts: Sequence[int] | np.ndarray) -> np.ndarray:
    """Mean, std, L2 norm and non-finite flag of each segment from its sums (on the host): shape ``(4, S)``.

    ``sums`` is ``(2, S)``: each segment's sum and sum of squares in float64 (:func:`host_segment_sums`,
    :func:`tensor_sums`); ``counts`` its number of elements. ``var = (sum(x**2) - sum(x) * mean) /
    (count - 1)`` in float64 is accurate for float32 data unless ``|mean| / std`` exceeds about 1e6. The flag is
    1.0 when the segment held any NaN or Inf (its sums are then not finite), and mean, std and norm are then not
    finite either: the damage stays visible. An empty segment has NaN mean and std.
    """
    total, total_of_squares = np.asarray(sums, dtype=np.float64)
    count = np.asarray(counts, dtype=np.float64)
    finite = np.isfinite(total) & np.isfinite(total_of_squares)
    with np.errstate(invalid="ignore"):
        mean = total / np.maximum(count, 1)
        squared_deviation = np.maximum(total_of_squares - total * mean, 0.0)
        std = np.sqrt(squared_deviation / np.maximum(count - 1, 1))
        norm = np.sqrt(total_of_squares)
    std[~finite] = math.nan
    empty = finite & (count == 0)
    mean[empty] = std[empty] = math.nan
    return np.stack([mean, std, norm, (~finite).astype(np.float64)])


def finish_histograms(counts: np.ndarray, ranges: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Apply the conventions to raw histograms (on the host): ``(counts (S, bins) int64, ranges (S, 2))``.

    ``counts`` and ``ranges`` are the raw rows of :func:`host_segment_histograms`.
    A constant segment ``c`` gets the range ``(c - 0.5, c + 0.5)`` with all its values in the middle bin. An
    empty segment, or one holding NaN or Inf (its range is then not finite), gets ``(-0.5, 0.5)`` and zero
    counts: its non-finite flag from :func:`moments_from_sums` says why.
    """
    counts = np.rint(counts).astype(np.int64)
    lo, hi = np.array(ranges, dtype=np.float64).reshape(-1, 2).T.copy()
    broken = ~(np.isfinite(lo) & np.isfinite(hi))
    counts[broken] = 0
    lo[broken], hi[broken] = -0.5, 0.5
    constant = np.flatnonzero(lo == hi)
    if constant.size:
        totals = counts[constant].sum(axis=1)
        counts[constant] = 0
        counts[constant, counts.shape[1] // 2] = totals
        lo[constant] -= 0.5
        hi[constant] += 0.5
    return counts, np.stack([lo, hi], axis=1)


@dataclass(frozen=True)
class HostSegments:
    """The layout of several flattened tensors concatenated into one numpy vector.

    ``starts[i]`` is where segment ``i`` begins; ``nonempty`` lists the segments with at least one element
    (numpy's ``reduceat`` needs them: it cannot express an empty segment).
    """

    lengths: tuple[int, ...]
    sizes: np.ndarray
    starts: np.ndarray
    nonempty: np.ndarray
    _cache: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def count(self) -> int:
        """Number of segments."""
        return len(self.lengths)

    def prefix(self, count: int) -> HostSegments:
        """The layout of the first ``count`` segments only; cached."""
        key = ("prefix", count)
        if key not in self._cache:
            self._cache[key] = host_segments(self.lengths[:count])
        return self._cache[key]

    def bin_offsets(self, stride: int) -> np.ndarray:
        """Each element's segment index times ``stride``, as float64: where its row of bins starts; cached."""
        if stride not in self._cache:
            self._cache[stride] = np.repeat(np.arange(self.count) * float(stride), self.sizes)
        return self._cache[stride]


def host_segments(lengths: Sequence[int]) -> HostSegments:
    """Build the :class:`HostSegments` of a vector made of pieces of the given ``lengths``."""
    lengths = tuple(int(length) for length in lengths)
    if not lengths or any(length < 0 for length in lengths):
        raise ValueError(f"segment lengths must be a non-empty list of ints >= 0, got {lengths}")
    sizes = np.array(lengths, dtype=np.int64)
    starts = np.cumsum(sizes) - sizes
    return HostSegments(lengths, sizes, starts, np.flatnonzero(sizes))


def _reduce(ufunc: np.ufunc, values: np.ndarray, segments: HostSegments, empty: float) -> np.ndarray:
    """``ufunc`` over each segment of ``values`` (``empty`` for an empty segment)."""
    result = np.full(segments.count, empty)
    if values.size:
        result[segments.nonempty] = ufunc.reduceat(values, segments.starts[segments.nonempty])
    return result


def host_segment_sums(values: np.ndarray, segments: HostSegments) -> np.ndarray:
    """Sum and sum of squares of each segment of ``values`` in float64: shape ``(2, segments.count)``."""
    values = np.asarray(values, dtype=np.float64)
    return np.stack([_reduce(np.add, values, segments, 0.0), _reduce(np.add, np.square(values), segments, 0.0)])


def host_segment_ranges(values: np.ndarray, segments: HostSegments) -> np.ndarray:
    """Minimum and maximum of each segment of ``values``: shape ``(segments.count, 2)``; NaN propagates.

    An empty segment gets ``(inf, -inf)``.
    """
    values = np.asarray(values, dtype=np.float64)
    return np.stack([_reduce(np.minimum, values, segments, math.inf), _reduce(np.maximum, values, segments, -math.inf)],
                    axis=1)


def host_segment_histograms(
    values: np.ndarray, segments: HostSegments, bins: int, ranges: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Raw equal-width histogram of each segment over ``[lo, hi]``: ``counts`` (``(S, bins)``, int64) and the
    ``ranges`` (``(S, 2)``) used.

    ``ranges`` defaults to each segment's own minimum and maximum (:func:`host_segment_ranges`); given, e.g. the
    extremes over the processes of a distributed run, values outside a range are clamped into its end bins.
    ``values`` holds float32 or float64 numbers in a float64 array. Positions ``(x - lo) * bins / (hi - lo)``
    are computed in float64, where every float32 range, from a few denormals to wider than the largest
    float32, is an ordinary number: a value on an inner edge lands in the bin above it, as in
    ``numpy.histogram``, and a value within about 1e-12 of a bin width of an edge may fall into either
    neighbour. Finish the rows with :func:`finish_histograms`.
    """
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    values = np.asarray(values, dtype=np.float64)
    given = ranges is not None
    ranges = np.asarray(ranges, dtype=np.float64) if given else host_segment_ranges(values, segments)
    lo, hi = ranges[:, 0], ranges[:, 1]
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        span = hi - lo
        # bins nudged up by a few units in the last place: x − lo exactly on an edge lands in the bin above
        scale = bins * (1 + 2.0**-50) / span
        # not constant, empty or holding NaN/Inf: the others put every value at position 0
        usable = np.isfinite(span) & (span > 0) & np.isfinite(scale)
        position = np.repeat(np.where(usable, lo, 0.0), segments.sizes)
        np.subtract(values, position, out=position)
        position *= np.repeat(np.where(usable, scale, 0.0), segments.sizes)
    if given or not usable.all():
        np.nan_to_num(position, copy=False, nan=0.0, posinf=0.0, neginf=0.0)  # Inf · 0, or NaN in a given range
    # hi itself lands at position bins: each row has one spare bin, folded into the last one below; values
    # beyond a given range are clamped into the end bins
    np.clip(position, 0.0, float(bins), out=position)
    position += segments.bin_offsets(bins + 1)
    size = segments.count * (bins + 1)
    # positions are >= 0, so the cast floors them; torch's cast and bincount are faster than numpy's
    index = torch.from_numpy(position).to(torch.int32 if size < 2**31 else torch.int64)
    table = torch.bincount(index, minlength=size).numpy()
    table = table.reshape(segments.count, bins + 1)
    counts = table[:, :bins].copy()
    counts[:, -1] += table[:, bins]
    return counts, ranges


def units_any(mask: np.ndarray | torch.Tensor, unit_axis: int) -> np.ndarray | torch.Tensor:
    """For each unit (index along ``unit_axis``), whether ``mask`` holds anywhere in it: shape ``(units,)``."""
    axes = tuple(axis for axis in range(mask.ndim) if axis != unit_axis % mask.ndim)
    return mask.any(axis=axes) if isinstance(mask, np.ndarray) else mask.any(dim=axes)


def units_all(mask: np.ndarray | torch.Tensor, unit_axis: int) -> np.ndarray | torch.Tensor:
    """For each unit (index along ``unit_axis``), whether ``mask`` holds everywhere in it: shape ``(units,)``."""
    axes = tuple(axis for axis in range(mask.ndim) if axis != unit_axis % mask.ndim)
    return mask.all(axis=axes) if isinstance(mask, np.ndarray) else mask.all(dim=axes)


def saturation_mask(values: np.ndarray | torch.Tensor, threshold: float, bound: str) -> np.ndarray | torch.Tensor:
    """Where a bounded activation's output sits in its flat tails (numpy or torch, elementwise).

    ``bound="tanh"`` (outputs in [-1, 1]): ``|t| > threshold``. ``bound="sigmoid"`` (outputs in [0, 1]):
    ``t > threshold`` or ``t < 1 - threshold``. There the local gradient is nearly zero.
    """
    if not 0.5 < threshold < 1:
        raise ValueError(f"saturation threshold must be in (0.5, 1), got {threshold}")
    if bound == TANH:
        return abs(values) > threshold
    if bound == SIGMOID:
        return (values > threshold) | (values < 1 - threshold)
    raise ValueError(f"bound must be {TANH!r} or {SIGMOID!r}, got {bound!r}")


def tensor_sums(tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum and sum of squared deviations from the mean (``M2``) of ``tensor``, with torch, where it lies and
    without keeping a copy: two 0-d tensors.

    Two passes (the mean first, then the deviations from it) keep the variance accurate whatever the mean.
    float32 tensors are reduced in float32 (torch's cascade sum; relative error about 1e-7 for a thousand
    elements, 1e-6 for a million), float64 ones in float64. Turn them into a sum of squares with
    :func:`sums_from_moments`.
    """
    flat = tensor.detach().reshape(-1)
    total = flat.sum()
    deviation = torch.sub(flat, total, alpha=1 / max(flat.numel(), 1))
    return total, torch.dot(deviation, deviation)


def array_sums(array: np.ndarray) -> tuple[float, float]:
    """:func:`tensor_sums` of a float32 or float64 numpy array: numpy's pairwise sum, in the array's dtype.

    Arrays of :data:`ONE_PASS_ELEMENTS` or more whose values are not far from zero relative to their spread (the
    sum of squared deviations is at least half the sum of squares) take ``M2`` from the sum of squares, one pass
    with no temporary array (relative error about 1e-6 for a million float32 values); the others, and every
    small array, take the exact two-pass route.
    """
    flat = array.reshape(-1)
    total = np.add.reduce(flat)  # what ndarray.sum calls, without its Python wrapper
    count = max(flat.size, 1)
    if flat.size >= ONE_PASS_ELEMENTS:
        squares = float(np.dot(flat, flat))
        deviations = squares - float(total) * float(total) / count
        if deviations >= 0.5 * squares:
            return float(total), deviations
    deviation = flat - total / count
    return float(total), float(np.dot(deviation, deviation))


def sums_from_moments(totals: np.ndarray, squared_deviations: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Sum and sum of squares (``(2, S)``, float64) from sums and ``M2`` (:func:`tensor_sums`), for
    :func:`moments_from_sums`."""
    totals = np.asarray(totals, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        squares = np.asarray(squared_deviations, dtype=np.float64) + totals * totals / np.maximum(counts, 1)
    return np.stack([totals, squares])


def saturated_fraction(tensor: torch.Tensor, threshold: float, bound: str) -> torch.Tensor:
    """Share of the elements of a bounded activation's output that sit in its flat tails (0-d tensor).

    See :func:`saturation_mask`: the layer below barely learns from these examples.
    """
    return saturation_mask(tensor.detach(), threshold, bound).to(torch.float32).mean()


def dead_fraction(tensor: torch.Tensor, unit_axis: int = -1) -> torch.Tensor:
    """Share of units never positive in the batch (0-d tensor): dead ReLU units.

    A unit is one index along ``unit_axis`` (the last axis for ``(N, *, F)`` outputs of Linear layers, 1 for
    ``(N, C, *)`` outputs of convolutions); it is dead when its output is <= 0 for every example and every
    position. For ReLU that means exactly zero everywhere, so no gradient ever reaches its weights.
    """
    t = tensor.detach()
    if t.dim() == 0:
        raise ValueError("dead_fraction needs a tensor with a unit dimension, got a 0-d tensor")
    return 1.0 - units_any(t > 0, unit_axis).to(torch.float32).mean()
