"""Statistics of tensors, as pure functions: vectorised reductions over many tensors at once.

Several tensors are summarised together by flattening them into one vector and describing its layout (one
segment per original tensor): a handful of vectorised operations then replace a loop of small ones per
tensor, which is what keeps a recording step cheap on small models. There are two implementations of the
same reductions:

- on the device, with torch (:class:`Segments`, :func:`segment_sums`, :func:`segment_histograms`,
  :func:`saturated_fraction`, :func:`dead_fraction`): they never read anything back to the host, so a monitor
  on a GPU computes everything of a training step there and copies the results once;
- on the host, with numpy (:class:`HostSegments`, :func:`host_segment_sums`, :func:`host_segment_histograms`),
  for tensors already in CPU memory: numpy's reductions cost a fraction of torch's there, and the host can
  branch on the data.

Both return raw sums and histograms, which :func:`moments_from_sums` and :func:`finish_histograms` turn into
the reported statistics (on the host, for all segments at once).

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


@dataclass(frozen=True)
class Segments:
    """The layout of several flattened tensors concatenated into one vector.

    ``lengths[i]`` is the number of elements of segment ``i``. On the device: ``ids`` (shape ``(N,)``,
    ``N = sum(lengths)``) holds the segment index of every element, ``counts`` the lengths (shape ``(S,)``).
    """

    lengths: tuple[int, ...]
    ids: torch.Tensor
    counts: torch.Tensor
    _cache: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def count(self) -> int:
        """Number of segments."""
        return len(self.lengths)

    def prefix(self, count: int) -> Segments:
        """The layout of the first ``count`` segments only (views, no copy); cached."""
        key = ("prefix", count)
        if key not in self._cache:
            ids = self.ids[: sum(self.lengths[:count])]
            self._cache[key] = Segments(self.lengths[:count], ids, self.counts[:count])
        return self._cache[key]

    def bin_offsets(self, stride: int) -> torch.Tensor:
        """``ids * stride``: where each element's segment starts in a flat (segment, bin) table; cached."""
        if stride not in self._cache:
            self._cache[stride] = (self.ids * stride).int()
        return self._cache[stride]


def make_segments(lengths: Sequence[int], device: torch.device | str = "cpu") -> Segments:
    """Build the :class:`Segments` of a vector made of pieces of the given ``lengths``, without host sync."""
    lengths = tuple(int(length) for length in lengths)
    if not lengths or any(length < 0 for length in lengths):
        raise ValueError(f"segment lengths must be a non-empty list of ints >= 0, got {lengths}")
    counts = torch.tensor(lengths, dtype=torch.long, device=device)
    indices = torch.arange(len(lengths), device=device)
    # output_size spares repeat_interleave a device-to-host read of counts.sum()
    ids = torch.repeat_interleave(indices, counts, output_size=sum(lengths))
    return Segments(lengths, ids, counts)


def concat(tensors: Sequence[torch.Tensor]) -> tuple[torch.Tensor, Segments]:
    """Flatten ``tensors`` into one float32 vector on the first tensor's device, with its layout."""
    if not tensors:
        raise ValueError("concat needs at least one tensor")
    device = tensors[0].device
    values = torch.cat([t.detach().reshape(-1).to(device=device, dtype=torch.float32) for t in tensors])
    return values, make_segments([t.numel() for t in tensors], device)


def _wide(device: torch.device) -> torch.dtype:
    # float64 keeps sums of squares accurate enough for the variance; Apple's MPS has no float64
    return torch.float32 if device.type == "mps" else torch.float64


def segment_sums(values: torch.Tensor, segments: Segments) -> torch.Tensor:
    """Sum and sum of squares of each segment, accumulated in float64: shape ``(2, segments.count)``.

    Turn them into moments on the host with :func:`moments_from_sums`, one segment at a time.
    """
    wide = values.to(_wide(values.device), copy=True)  # a copy: it is squared in place below
    # unsafe=True skips a validation that would read the lengths back to the host
    total = torch.segment_reduce(wide, "sum", lengths=segments.counts, unsafe=True)
    total_of_squares = torch.segment_reduce(wide.square_(), "sum", lengths=segments.counts, unsafe=True)
    return torch.stack([total, total_of_squares])


def moments_from_sums(sums: np.ndarray, counts: Sequence[int] | np.ndarray) -> np.ndarray:
    """Mean, std, L2 norm and non-finite flag of each segment from its sums (on the host): shape ``(4, S)``.

    ``sums`` is ``(2, S)``: each segment's sum and sum of squares in float64 (:func:`segment_sums`,
    :func:`host_segment_sums`); ``counts`` its number of elements. ``var = (sum(x**2) - sum(x) * mean) /
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


def segment_histograms(
    values: torch.Tensor, segments: Segments, bins: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw equal-width histogram of each segment over its own ``[min, max]``, without host sync.

    Returns ``counts`` of shape ``(segments.count, bins)`` (float32, exact below 2**24 per bin) and ``ranges``
    of shape ``(segments.count, 2)`` holding each segment's ``(min, max)``. Bin ``k`` covers
    ``[lo + k w, lo + (k+1) w)`` with ``w = (hi - lo) / bins``; the last bin also holds ``hi``, as in
    ``numpy.histogram``. A value within about 1e-5 of a bin width of an inner edge may fall into either
    neighbour (positions are computed in the input's precision). Finish each row on the host with
    :func:`finish_histogram`, which handles constant, empty and non-finite segments.
    """
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    lo = torch.full((segments.count,), float("inf"), dtype=values.dtype, device=values.device)
    hi = torch.full((segments.count,), float("-inf"), dtype=values.dtype, device=values.device)
    lo = lo.scatter_reduce_(0, segments.ids, values, reduce="amin")  # NaN propagates
    hi = hi.scatter_reduce_(0, segments.ids, values, reduce="amax")
    # position in bin units, lo -> 0 and hi -> bins: (x·h − lo·h) / ((hi·h − lo·h) / c). The division cannot
    # overflow even for a range of a few denormals; h = 1, or 0.5 (exact) when some range is wider than the
    # largest float (e.g. -3e38..3e38), so that no difference overflows either (one factor for all segments: a
    # per-element one costs a gather; only a denormal range histogrammed beside such a range loses its last bit).
    # c is bins nudged up by a few units in the last place, so that a value exactly on an edge (x − lo exact)
    # lands in the bin above it, as in numpy. NaN (a constant segment: 0 / 0, or one holding Inf or NaN) becomes
    # position 0; the clamp keeps hi in the last bin. In place where possible: large temporaries are costly on CPU.
    too_wide = (torch.isinf(hi - lo) & torch.isfinite(lo) & torch.isfinite(hi)).any()
    half = torch.where(too_wide, 0.5, 1.0).to(values.dtype)
    lo_half = lo * half
    width = (hi * half - lo_half).div_(bins * (1 + 2.0**-21))
    position = (values * half).sub_(lo_half.index_select(0, segments.ids))
    position.div_(width.index_select(0, segments.ids))
    index = position.nan_to_num_(0.0, 0.0, 0.0).clamp_(0, bins - 0.5).int().add_(segments.bin_offsets(bins))
    counts = _count(index, segments.count * bins).view(segments.count, bins)
    return counts, torch.stack([lo, hi], dim=1)


def finish_histograms(counts: np.ndarray, ranges: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Apply the conventions to raw histograms (on the host): ``(counts (S, bins) int64, ranges (S, 2))``.

    ``counts`` and ``ranges`` are the raw rows of :func:`segment_histograms` or :func:`host_segment_histograms`.
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


def _count(index: torch.Tensor, size: int) -> torch.Tensor:
    """How often each of ``0 .. size-1`` occurs in ``index`` (float32), without host sync."""
    if index.device.type == "cpu":
        # several times faster on CPU, where there is no device to wait for
        return torch.bincount(index, minlength=size).to(torch.float32)
    return _scatter_count(index, size)


def _scatter_count(index: torch.Tensor, size: int) -> torch.Tensor:
    # CUDA's bincount reads the maximum back to the host to size its output; a scatter never does
    ones = torch.ones_like(index, dtype=torch.float32)
    return torch.zeros(size, device=index.device).index_add_(0, index, ones)


@dataclass(frozen=True)
class HostSegments:
    """The layout of several flattened tensors concatenated into one numpy vector (see :class:`Segments`).

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
    """Sum and sum of squares of each segment of ``values`` in float64: shape ``(2, segments.count)``.

    The host twin of :func:`segment_sums`.
    """
    values = np.asarray(values, dtype=np.float64)
    return np.stack([_reduce(np.add, values, segments, 0.0), _reduce(np.add, np.square(values), segments, 0.0)])


def host_segment_histograms(
    values: np.ndarray, segments: HostSegments, bins: int
) -> tuple[np.ndarray, np.ndarray]:
    """Raw equal-width histogram of each segment over its own ``[min, max]``: the host twin of
    :func:`segment_histograms`, returning ``counts`` (``(S, bins)``, int64) and ``ranges`` (``(S, 2)``).

    ``values`` holds float32 numbers (in a float32 or float64 array). Positions ``(x - lo) * bins / (hi - lo)``
    are computed in float64, where every float32 range, from a few denormals to wider than the largest
    float32, is an ordinary number: a value on an inner edge lands in the bin above it, as in
    ``numpy.histogram``, and a value within about 1e-12 of a bin width of an edge may fall into either
    neighbour. Finish the rows with :func:`finish_histograms`.
    """
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    values = np.asarray(values, dtype=np.float64)
    lo = _reduce(np.minimum, values, segments, math.inf)  # NaN propagates
    hi = _reduce(np.maximum, values, segments, -math.inf)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        span = hi - lo
        # bins nudged up by a few units in the last place: x − lo exactly on an edge lands in the bin above
        scale = bins * (1 + 2.0**-50) / span
        # not constant, empty or holding NaN/Inf: the others put every value at position 0
        usable = np.isfinite(span) & (span > 0) & np.isfinite(scale)
        position = np.repeat(np.where(usable, lo, 0.0), segments.sizes)
        np.subtract(values, position, out=position)
        position *= np.repeat(np.where(usable, scale, 0.0), segments.sizes)
    if not usable.all():
        np.nan_to_num(position, copy=False, nan=0.0, posinf=0.0, neginf=0.0)  # Inf · 0
    # hi itself lands at position bins: each row has one spare bin, folded into the last one below
    position += segments.bin_offsets(bins + 1)
    size = segments.count * (bins + 1)
    # positions are >= 0, so the cast floors them; torch's cast and bincount are faster than numpy's
    index = torch.from_numpy(position).to(torch.int32 if size < 2**31 else torch.int64)
    table = torch.bincount(index, minlength=size).numpy()
    table = table.reshape(segments.count, bins + 1)
    counts = table[:, :bins].copy()
    counts[:, -1] += table[:, bins]
    return counts, np.stack([lo, hi], axis=1)


def saturated_fraction(tensor: torch.Tensor, threshold: float, bound: str) -> torch.Tensor:
    """Share of the elements of a bounded activation's output that sit in its flat tails (0-d tensor).

    ``bound="tanh"`` (outputs in [-1, 1]): ``|t| > threshold``. ``bound="sigmoid"`` (outputs in [0, 1]):
    ``t > threshold`` or ``t < 1 - threshold``. There the local gradient is nearly zero, so the layer below
    barely learns from these examples.
    """
    if not 0.5 < threshold < 1:
        raise ValueError(f"saturation threshold must be in (0.5, 1), got {threshold}")
    t = tensor.detach()
    if bound == TANH:
        saturated = t.abs() > threshold
    elif bound == SIGMOID:
        saturated = (t > threshold) | (t < 1 - threshold)
    else:
        raise ValueError(f"bound must be {TANH!r} or {SIGMOID!r}, got {bound!r}")
    return saturated.to(torch.float32).mean()


def dead_fraction(tensor: torch.Tensor) -> torch.Tensor:
    """Share of units never positive in the batch (0-d tensor): dead ReLU-like units.

    A unit is one feature along the last dimension; it is dead when its output is <= 0 for every example and
    every position (all leading dimensions). For ReLU that means exactly zero everywhere, so no gradient ever
    reaches its weights; for GELU/SiLU/ELU-like units it means the input always sat in the flat negative side.
    """
    t = tensor.detach()
    if t.dim() == 0:
        raise ValueError("dead_fraction needs a tensor with a feature dimension, got a 0-d tensor")
    alive = (t.reshape(-1, t.shape[-1]) > 0).any(dim=0)
    return 1.0 - alive.to(torch.float32).mean()
