"""Statistics of tensors, as pure functions: reductions on the device, finished on the host.

The ``segment_*`` functions and :func:`saturated_fraction` / :func:`dead_fraction` return tensors on the
input's device and never read anything back to the host, so a monitor can compute everything of a training
step and copy the results to the host once; :func:`moments_from_sums` and :func:`finish_histogram` then
finish on the host, per segment.

Several tensors are summarised together by flattening them into one vector and describing its layout with
:class:`Segments` (one segment per original tensor): a handful of vectorised operations then replace a loop
of small ones per tensor, which is what keeps a recording step cheap on small models.

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


def moments_from_sums(total: float, total_of_squares: float, count: int) -> tuple[float, float, float, float]:
    """Mean, std, L2 norm and non-finite flag of a segment from its :func:`segment_sums` (on the host).

    ``var = (sum(x**2) - sum(x) * mean) / (count - 1)`` in float64 is accurate for float32 data unless
    ``|mean| / std`` exceeds about 1e6. The flag is 1.0 when the segment held any NaN or Inf (its sums are
    then not finite), and mean, std and norm are then not finite either: the damage stays visible. An empty
    segment has NaN mean and std.
    """
    if not (math.isfinite(total) and math.isfinite(total_of_squares)):
        return total / max(count, 1), math.nan, math.sqrt(total_of_squares), 1.0
    if count == 0:
        return math.nan, math.nan, 0.0, 0.0
    mean = total / count
    squared_deviation = max(total_of_squares - total * mean, 0.0)
    return mean, math.sqrt(squared_deviation / max(count - 1, 1)), math.sqrt(total_of_squares), 0.0


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


def finish_histogram(counts: np.ndarray, lo: float, hi: float) -> tuple[np.ndarray, float, float]:
    """Apply the conventions to one raw row of :func:`segment_histograms` (on the host).

    A constant segment ``c`` gets the range ``(c - 0.5, c + 0.5)`` with all its values in the middle bin. An
    empty segment, or one holding NaN or Inf (its range is then not finite), gets ``(-0.5, 0.5)`` and zero
    counts: its non-finite flag from :func:`moments_from_sums` says why.
    """
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return np.zeros_like(counts), -0.5, 0.5
    if lo == hi:
        centred = np.zeros_like(counts)
        centred[len(counts) // 2] = counts.sum()
        return centred, lo - 0.5, hi + 0.5
    return counts, lo, hi


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


def summary(tensor: torch.Tensor) -> tuple[float, float, float, float]:
    """Mean, std, norm and non-finite flag of one tensor, on the host; see :func:`moments_from_sums`.

    A convenience for a single tensor (it copies to the host).
    """
    values, segments = concat([tensor])
    total, total_of_squares = segment_sums(values, segments).cpu()[:, 0].tolist()
    return moments_from_sums(total, total_of_squares, tensor.numel())


def histogram(tensor: torch.Tensor, bins: int) -> tuple[np.ndarray, float, float]:
    """Finished histogram of one tensor on the host: ``(counts, lo, hi)``; see :func:`segment_histograms`."""
    values, segments = concat([tensor])
    counts, ranges = segment_histograms(values, segments, bins)
    lo, hi = ranges[0].tolist()
    return finish_histogram(counts[0].cpu().numpy().astype(np.int64), lo, hi)


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
