"""The statistics in normlab.diagnostics.stats against hand computations and numpy.

Sums have two implementations, numpy on float64 copies (``host``) and torch where the tensor lies (``torch``,
two passes): every test of the moments runs on both (``backend``). Histograms are numpy's.
"""

import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from normlab.diagnostics import stats

BACKENDS = pytest.mark.parametrize("backend", ["torch", "host"])


def _raw(pieces: list, bins: int, backend: str = "host") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Raw (sums (2, S), counts (S, bins), ranges (S, 2)) of the pieces; sums through one backend."""
    pieces = [np.asarray(piece, dtype=np.float32).reshape(-1) for piece in pieces]
    values = np.concatenate(pieces, dtype=np.float64)
    segments = stats.host_segments([piece.size for piece in pieces])
    counts, ranges = stats.host_segment_histograms(values, segments, bins)
    if backend == "torch":
        taken = [stats.tensor_sums(torch.from_numpy(piece)) for piece in pieces]
        totals = np.array([float(total) for total, _ in taken])
        deviations = np.array([float(deviation) for _, deviation in taken])
        sums = stats.sums_from_moments(totals, deviations, np.array([piece.size for piece in pieces]))
        return sums, counts, ranges
    return stats.host_segment_sums(values, segments), counts, ranges


def _moments(pieces: list, backend: str) -> np.ndarray:
    """(4, S): mean, std, norm and non-finite flag of each piece."""
    sums = _raw(pieces, 1, backend)[0]
    return stats.moments_from_sums(sums, [np.size(piece) for piece in pieces])


def _histograms(pieces: list, bins: int) -> tuple[np.ndarray, np.ndarray]:
    """Finished (counts (S, bins), ranges (S, 2)) of each piece."""
    return stats.finish_histograms(*_raw(pieces, bins)[1:])


def _histogram(values: list, bins: int) -> tuple[list, tuple[float, float]]:
    counts, ranges = _histograms([values], bins)
    return counts[0].tolist(), tuple(ranges[0].tolist())


@BACKENDS
def test_moments_match_a_hand_computation(backend):
    mean, std, norm, nonfinite = _moments([[1.0, 2.0, 3.0, 4.0]], backend)[:, 0]
    # mean 10/4; squared deviations 2.25 + 0.25 + 0.25 + 2.25 = 5, unbiased: 5/3; norm sqrt(1+4+9+16)
    assert mean == pytest.approx(2.5)
    assert std == pytest.approx(math.sqrt(5 / 3))
    assert norm == pytest.approx(math.sqrt(30))
    assert nonfinite == 0


@BACKENDS
def test_a_single_value_has_zero_std(backend):
    assert _moments([[3.0]], backend)[1, 0] == 0


@BACKENDS
def test_moments_keep_a_large_mean_with_a_tiny_spread_accurate(backend):
    values = torch.ones(1000) + torch.linspace(-1e-4, 1e-4, 1000)  # like a norm layer's gain
    expected = np.std(values.numpy().astype(np.float64), ddof=1)
    assert _moments([values.numpy()], backend)[1, 0] == pytest.approx(expected, rel=1e-4)


@BACKENDS
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_values_are_flagged(backend, bad):
    _, std, _, nonfinite = _moments([[1.0, bad, 2.0]], backend)[:, 0]
    assert nonfinite == 1
    assert not math.isfinite(std)


@BACKENDS
@settings(max_examples=25, deadline=None)
@given(
    st.lists(
        arrays(np.float32, st.integers(1, 40), elements=st.floats(-1e3, 1e3, width=32)),
        min_size=1,
        max_size=4,
    )
)
def test_segment_moments_match_numpy_per_tensor(backend, pieces):
    moments = _moments(pieces, backend)
    # float64 sums of float32 values are exact to 1e-9; torch's float32 sums to a few float32 ulps of the scale
    exact = 1e-9 if backend == "host" else 1e-6
    for (mean, std, norm, nonfinite), piece in zip(moments.T.tolist(), pieces, strict=True):
        wide = piece.astype(np.float64)
        scale = float(np.abs(wide).max())
        assert mean == pytest.approx(wide.mean(), abs=exact * scale + 1e-12, rel=exact)
        expected_std = wide.std(ddof=1) if wide.size > 1 else 0.0
        assert std == pytest.approx(expected_std, abs=1e-6 * scale + 1e-12, rel=1e-6)
        assert norm == pytest.approx(np.linalg.norm(wide), rel=exact)
        assert nonfinite == 0


def test_histogram_matches_a_hand_computation():
    counts, (lo, hi) = _histogram([0.0, 1.0, 2.0, 3.0, 4.0], 4)
    # bins [0,1) [1,2) [2,3) [3,4]: the maximum goes into the last bin, as in numpy.histogram
    assert counts == [1, 1, 1, 2] == np.histogram([0, 1, 2, 3, 4], bins=4)[0].tolist()
    assert (lo, hi) == (0.0, 4.0)


def test_histogram_of_a_range_of_a_few_denormals_spreads_over_the_bins():
    # bins / (hi - lo) overflows float32 here; the positions must not (found by hypothesis)
    tiny = float(np.finfo(np.float32).tiny)  # 1.1754944e-38
    counts, (lo, hi) = _histogram([0.0, tiny / 2, tiny], 4)
    assert counts == [1, 0, 1, 1]
    assert (lo, hi) == (0.0, tiny)


def test_histogram_of_a_range_wider_than_the_largest_float_spreads_over_the_bins():
    values = [-3e38, -2e38, 0.0, 2e38, 3e38]  # hi - lo overflows float32 to inf
    counts, (lo, hi) = _histogram(values, 3)
    # bins [-3e38, -1e38) [-1e38, 1e38) [1e38, 3e38]
    assert counts == [2, 1, 2] == np.histogram(np.array(values), bins=3)[0].tolist()
    assert (lo, hi) == (float(np.float32(-3e38)), float(np.float32(3e38)))


def test_histogram_of_a_constant_is_centred_on_it():
    counts, (lo, hi) = _histogram([2.0, 2.0, 2.0], 4)
    assert (lo, hi) == (1.5, 2.5)
    assert counts == [0, 0, 3, 0]  # bins [1.5,1.75) [1.75,2) [2,2.25) [2.25,2.5]


def _assert_exact_binning(counts: np.ndarray, piece: np.ndarray, bins: int) -> None:
    """Check counts against exact rational positions (x - lo) * bins / (hi - lo), allowing either side for
    values within 1e-5 of a bin width of an inner edge (the documented float rounding)."""
    lo, hi = Fraction(float(piece.min())), Fraction(float(piece.max()))
    positions = [(Fraction(x) - lo) * bins / (hi - lo) for x in piece.tolist()]
    tolerance = Fraction(1, 10**5)
    cumulative = np.cumsum(counts)
    assert cumulative[-1] == piece.size
    for edge in range(1, bins):
        surely_below = sum(position < edge - tolerance for position in positions)
        maybe_below = sum(position < edge + tolerance for position in positions)
        assert surely_below <= cumulative[edge - 1] <= maybe_below, (edge, counts)


@settings(max_examples=25, deadline=None)
@given(
    st.lists(
        arrays(np.float32, st.integers(1, 50), elements=st.floats(-50, 50, width=32)), min_size=1, max_size=4
    ),
    st.integers(1, 16),
)
def test_segment_histograms_match_exact_binning_per_tensor(pieces, bins):
    counts, ranges = _histograms(pieces, bins)
    for row, (lo, hi), piece in zip(counts, ranges.tolist(), pieces, strict=True):
        if piece.min() == piece.max():
            assert row.sum() == piece.size
            continue
        assert (lo, hi) == (piece.min(), piece.max())
        _assert_exact_binning(row, piece, bins)


@settings(max_examples=50, deadline=None)
@given(
    st.lists(
        arrays(np.float32, st.integers(2, 30), elements=st.floats(width=32, allow_nan=False, allow_infinity=False)),
        min_size=1,
        max_size=3,
    ),
    st.integers(1, 8),
)
def test_host_histograms_bin_any_float32_range_exactly(pieces, bins):
    # float64 positions are within 1e-12 of a bin width of the exact ones, and a value exactly on an edge
    # goes to the bin above: away from that sliver, the host's counts are the exact ones, from denormal
    # ranges to ranges wider than the largest float32
    counts, _ = _histograms(pieces, bins)
    for row, piece in zip(counts, pieces, strict=True):
        lo, hi = Fraction(float(piece.min())), Fraction(float(piece.max()))
        if lo == hi:
            continue
        positions = [(Fraction(x) - lo) * bins / (hi - lo) for x in piece.tolist()]
        assume(all(p == round(p) or abs(p - round(p)) > Fraction(1, 10**11) for p in positions))
        expected = np.bincount([min(math.floor(p), bins - 1) for p in positions], minlength=bins)
        np.testing.assert_array_equal(row, expected)


def test_histogram_of_a_segment_with_nan_is_empty_and_leaves_the_others_alone():
    counts, ranges = _histograms([[1.0, float("nan")], [0.0, 1.0]], 2)
    assert counts.tolist() == [[0, 0], [1, 1]]
    assert ranges.tolist() == [[-0.5, 0.5], [0.0, 1.0]]


def test_histogram_of_a_segment_with_inf_is_empty_and_leaves_the_others_alone():
    counts, ranges = _histograms([[1.0, float("inf"), -2.0], [3.0, 3.0], [0.0, 1.0]], 2)
    assert counts.tolist() == [[0, 0], [0, 2], [1, 1]]
    assert ranges.tolist() == [[-0.5, 0.5], [2.5, 3.5], [0.0, 1.0]]


def test_moments_of_an_empty_segment_are_undefined():
    mean, std, norm, nonfinite = stats.moments_from_sums(np.zeros((2, 1)), [0])[:, 0]
    assert math.isnan(mean) and math.isnan(std) and norm == 0 and nonfinite == 0


@BACKENDS
def test_empty_segment_gets_an_empty_histogram(backend):
    counts, ranges = _histograms([[], [5.0], [], [1.0, 2.0]], 3)
    assert counts.tolist() == [[0, 0, 0], [0, 1, 0], [0, 0, 0], [1, 0, 1]]
    assert ranges.tolist() == [[-0.5, 0.5], [4.5, 5.5], [-0.5, 0.5], [1.0, 2.0]]
    (empty_mean, mean), (empty_std, std) = _moments([[], [5.0]], backend)[:2].tolist()
    assert math.isnan(empty_mean) and math.isnan(empty_std) and (mean, std) == (5.0, 0.0)


def test_histograms_over_given_ranges_clamp_values_outside_into_the_end_bins():
    values = np.array([0.0, 1.0, 2.0, 3.0, 4.0, -10.0, 10.0])
    counts, ranges = stats.host_segment_histograms(values, stats.host_segments([7]), 4, np.array([[0.0, 4.0]]))
    assert counts.tolist() == [[2, 1, 1, 3]] and ranges.tolist() == [[0.0, 4.0]]


def test_histograms_of_two_halves_over_the_whole_range_add_up_to_the_whole():
    values = np.random.default_rng(0).normal(size=1000)
    whole, ranges = stats.host_segment_histograms(values, stats.host_segments([1000]), 16)
    halves = [stats.host_segment_histograms(half, stats.host_segments([500]), 16, ranges)[0]
              for half in (values[:500], values[500:])]
    np.testing.assert_array_equal(halves[0] + halves[1], whole)


def test_tanh_saturation_matches_a_hand_count():
    outputs = torch.tensor([0.5, -0.98, 0.99, 0.2, -0.97])  # |t| > 0.97: two of five (-0.97 is not beyond)
    assert stats.saturated_fraction(outputs, 0.97, "tanh").item() == pytest.approx(0.4)


def test_sigmoid_saturation_counts_both_tails():
    outputs = torch.tensor([0.01, 0.5, 0.995, 0.2])  # t > 0.97 or t < 0.03: two of four
    assert stats.saturated_fraction(outputs, 0.97, "sigmoid").item() == pytest.approx(0.5)


def test_dead_units_are_zero_for_the_whole_batch():
    outputs = torch.tensor([[0.0, 1.0, 0.0], [0.0, 2.0, 3.0]])  # unit 0 never fires; units 1 and 2 do
    assert stats.dead_fraction(outputs).item() == pytest.approx(1 / 3)


def test_dead_units_of_conv_outputs_are_channels():
    outputs = torch.zeros(2, 3, 4)  # (batch, channels, positions)
    outputs[1, 2, 3] = 0.5  # channel 2 fires once; channels 0 and 1 never
    assert stats.dead_fraction(outputs, unit_axis=1).item() == pytest.approx(2 / 3)
    assert stats.dead_fraction(outputs).item() == pytest.approx(3 / 4)  # along the last axis: positions


def test_dead_units_of_3d_input_count_every_position():
    outputs = torch.zeros(2, 4, 2)  # (batch, positions, units)
    outputs[1, 3, 0] = 0.5  # unit 0 fires once, at one position of one example; unit 1 never
    assert stats.dead_fraction(outputs).item() == pytest.approx(0.5)


def test_bad_arguments_name_the_value():
    with pytest.raises(ValueError, match="1.5"):
        stats.saturated_fraction(torch.zeros(2), 1.5, "tanh")
    with pytest.raises(ValueError, match="'relu'"):
        stats.saturated_fraction(torch.zeros(2), 0.97, "relu")
    with pytest.raises(ValueError, match="0-d"):
        stats.dead_fraction(torch.tensor(1.0))
    with pytest.raises(ValueError, match="bins"):
        _raw([[0.0, 1.0]], 0)
    with pytest.raises(ValueError, match="lengths"):
        stats.host_segments([])


@pytest.mark.parametrize("offset", [0.0, 0.3, 1.0, 1e4], ids=["centred", "small-mean", "mean-like-spread", "far"])
def test_array_sums_of_large_arrays_match_float64_whatever_the_mean(offset):
    values = np.random.default_rng(0).normal(size=100_000).astype(np.float32) + np.float32(offset)
    total, deviations = stats.array_sums(values)
    wide = values.astype(np.float64)
    assert total == pytest.approx(wide.sum(), rel=1e-6, abs=1e-2)
    assert deviations == pytest.approx(((wide - wide.mean()) ** 2).sum(), rel=2e-6)
