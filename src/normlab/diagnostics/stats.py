"""Statistics of tensors, as pure functions that never leave the device.

Every function here returns tensors on the input's device and never calls ``.item()``, ``.tolist()`` or
``.cpu()``, so a monitor can compute everything of a training step and copy the results to the host once.

Several tensors are summarised together by flattening them into one vector and describing its layout with
:class:`Segments` (one segment per original tensor): a handful of vectorised operations then replace a loop
of small ones per tensor, which is what keeps a recording step cheap on small models.

Conventions (shared with the lesson): ``std`` is the unbiased standard deviation (Bessel's correction, as
``torch.Tensor.std``), except that a single value has std 0 instead of NaN. Histograms have ``bins`` equal-width
bins over ``[lo, hi]``, the finite minimum and maximum of the tensor; the last bin includes ``hi``, as in
``numpy.histogram``. NaN and Inf are left out of histograms and counted separately.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

TANH = "tanh"
SIGMOID = "sigmoid"


@dataclass(frozen=True)
class Segments:
    """The layout of several flattened tensors concatenated into one vector.

    ``lengths[i]`` is the number of elements of segment ``i``; ``ids`` (shape ``(N,)``, ``N = sum(lengths)``)
    holds the segment index of every element.
    """

    lengths: tuple[int, ...]
    ids: torch.Tensor

    @property
    def count(self) -> int:
        """Number of segments."""
        return len(self.lengths)


def make_segments(lengths: Sequence[int], device: torch.device | str = "cpu") -> Segments:
    """Build the :class:`Segments` of a vector made of pieces of the given ``lengths``, without host sync."""
    lengths = tuple(int(length) for length in lengths)
    if any(length < 0 for length in lengths):
        raise ValueError(f"segment lengths must be >= 0, got {lengths}")
    counts = torch.tensor(lengths, dtype=torch.long, device=device)
    indices = torch.arange(len(lengths), device=device)
    # output_size spares repeat_interleave a device-to-host read of counts.sum()
    ids = torch.repeat_interleave(indices, counts, output_size=sum(lengths))
    return Segments(lengths, ids)


def concat(tensors: Sequence[torch.Tensor]) -> tuple[torch.Tensor, Segments]:
    """Flatten ``tensors`` into one float32 vector on the first tensor's device, with its :class:`Segments`."""
    if not tensors:
        raise ValueError("concat needs at least one tensor")
    device = tensors[0].device
    values = torch.cat([t.detach().reshape(-1).to(device=device, dtype=torch.float32) for t in tensors])
    return values, make_segments([t.numel() for t in tensors], device)


def _accumulator_dtype(device: torch.device) -> torch.dtype:
    # float64 sums keep the moments of large tensors accurate; Apple's MPS has no float64
    return torch.float32 if device.type == "mps" else torch.float64


def _segment_sum(values: torch.Tensor, segments: Segments) -> torch.Tensor:
    total = torch.zeros(segments.count, dtype=values.dtype, device=values.device)
    return total.index_add_(0, segments.ids, values)


def segment_moments(values: torch.Tensor, segments: Segments) -> torch.Tensor:
    """Mean and std of each segment: a ``(segments.count, 2)`` tensor of ``(mean, std)``.

    Two passes (mean, then squared deviations from it), accumulated in float64 where the device has it, so a
    tensor with a large mean and a tiny spread (a norm layer's gain) gets an accurate std. An empty segment
    gives NaN. A segment holding NaN or Inf gives NaN: the damage stays visible.
    """
    wide = values.to(_accumulator_dtype(values.device))
    counts = torch.tensor(segments.lengths, dtype=wide.dtype, device=values.device)
    mean = _segment_sum(wide, segments) / counts
    squared_deviation = _segment_sum((wide - mean[segments.ids]).square(), segments)
    degrees_of_freedom = torch.where(counts > 1, counts - 1, counts)
    std = (squared_deviation / degrees_of_freedom).sqrt()
    return torch.stack([mean, std], dim=1)


def segment_norms(values: torch.Tensor, segments: Segments) -> torch.Tensor:
    """Euclidean (L2) norm of each segment, shape ``(segments.count,)``."""
    wide = values.to(_accumulator_dtype(values.device))
    return _segment_sum(wide.square(), segments).sqrt()


def segment_nonfinite(values: torch.Tensor, segments: Segments) -> torch.Tensor:
    """Number of NaN or Inf elements in each segment, shape ``(segments.count,)`` (float, for packing)."""
    return _segment_sum((~torch.isfinite(values)).to(torch.float32), segments)


def segment_histograms(values: torch.Tensor, segments: Segments, bins: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Equal-width histogram of each segment over its own finite range, without host sync.

    Returns ``counts`` of shape ``(segments.count, bins)`` (float32, exact below 2**24 per bin) and ``ranges`` of
    shape ``(segments.count, 2)`` holding ``(lo, hi)``. Bin ``k`` covers ``[lo + k w, lo + (k+1) w)`` with
    ``w = (hi - lo) / bins``; the last bin also holds ``hi``. A value on an inner edge may fall into either
    neighbour within float rounding. A constant segment gets the range ``(c - 0.5, c + 0.5)`` and an empty or
    all-non-finite one ``(-0.5, 0.5)`` with zero counts, so every range has positive width.
    """
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    finite = torch.isfinite(values)
    inf = torch.tensor(float("inf"), dtype=values.dtype, device=values.device)
    lo = torch.full((segments.count,), float("inf"), dtype=values.dtype, device=values.device)
    hi = torch.full((segments.count,), float("-inf"), dtype=values.dtype, device=values.device)
    lo = lo.scatter_reduce(0, segments.ids, torch.where(finite, values, inf), reduce="amin")
    hi = hi.scatter_reduce(0, segments.ids, torch.where(finite, values, -inf), reduce="amax")
    empty = lo > hi
    lo = torch.where(empty, torch.zeros_like(lo), lo)
    hi = torch.where(empty, torch.zeros_like(hi), hi)
    pad = torch.where(hi > lo, torch.zeros_like(lo), torch.full_like(lo, 0.5))
    lo, hi = lo - pad, hi + pad
    width = (hi - lo)[segments.ids]
    position = (torch.where(finite, values, lo[segments.ids]) - lo[segments.ids]) / width
    bucket = (position * bins).floor().clamp(0, bins - 1).long()
    flat = torch.zeros(segments.count * bins, dtype=torch.float32, device=values.device)
    flat.index_add_(0, segments.ids * bins + bucket, finite.to(torch.float32))
    return flat.view(segments.count, bins), torch.stack([lo, hi], dim=1)


def moments(tensor: torch.Tensor) -> torch.Tensor:
    """Mean and std of one tensor as a ``(2,)`` tensor; see :func:`segment_moments`."""
    values, segments = concat([tensor])
    return segment_moments(values, segments)[0]


def histogram(tensor: torch.Tensor, bins: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Histogram of one tensor: ``(counts (bins,), range (2,))``; see :func:`segment_histograms`."""
    values, segments = concat([tensor])
    counts, ranges = segment_histograms(values, segments, bins)
    return counts[0], ranges[0]


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
