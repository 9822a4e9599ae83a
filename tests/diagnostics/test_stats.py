"""The statistics in normlab.diagnostics.stats against hand computations and numpy."""

import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from normlab.diagnostics import stats


def test_summary_matches_a_hand_computation():
    mean, std, norm, nonfinite = stats.summary(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    # mean 10/4; squared deviations 2.25 + 0.25 + 0.25 + 2.25 = 5, unbiased: 5/3; norm sqrt(1+4+9+16)
    assert mean == pytest.approx(2.5)
    assert std == pytest.approx(math.sqrt(5 / 3))
    assert norm == pytest.approx(math.sqrt(30))
    assert nonfinite == 0


def test_summary_of_a_single_value_has_zero_std():
    assert stats.summary(torch.tensor([3.0]))[1] == 0


def test_summary_keeps_a_large_mean_with_a_tiny_spread_accurate():
    values = torch.ones(1000) + torch.linspace(-1e-4, 1e-4, 1000)  # like a norm layer's gain
    expected = np.std(values.numpy().astype(np.float64), ddof=1)
    assert stats.summary(values)[1] == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_summary_flags_non_finite_values(bad):
    _, std, _, nonfinite = stats.summary(torch.tensor([1.0, bad, 2.0]))
    assert nonfinite == 1
    assert not math.isfinite(std)


@settings(max_examples=25, deadline=None)
@given(
    st.lists(
        arrays(np.float32, st.integers(1, 40), elements=st.floats(-1e3, 1e3, width=32)),
        min_size=1,
        max_size=4,
    )
)
def test_segment_moments_match_numpy_per_tensor(pieces):
    values, segments = stats.concat([torch.from_numpy(piece) for piece in pieces])
    sums = stats.segment_sums(values, segments).numpy()
    for (total, total_of_squares), piece in zip(sums.T.tolist(), pieces, strict=True):
        row = stats.moments_from_sums(total, total_of_squares, piece.size)
        wide = piece.astype(np.float64)
        assert row[0] == pytest.approx(wide.mean(), abs=1e-9, rel=1e-9)
        expected_std = wide.std(ddof=1) if wide.size > 1 else 0.0
        assert row[1] == pytest.approx(expected_std, abs=1e-6, rel=1e-6)
        assert row[2] == pytest.approx(np.linalg.norm(wide), rel=1e-9)


def test_histogram_matches_a_hand_computation():
    counts, lo, hi = stats.histogram(torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0]), bins=4)
    # bins [0,1) [1,2) [2,3) [3,4]: the maximum goes into the last bin, as in numpy.histogram
    assert counts.tolist() == [1, 1, 1, 2]
    assert (lo, hi) == (0.0, 4.0)
    np.testing.assert_array_equal(counts, np.histogram([0, 1, 2, 3, 4], bins=4)[0])


def test_histogram_of_a_range_of_a_few_denormals_spreads_over_the_bins():
    # bins / (hi - lo) overflows float32 here; the positions must not (found by hypothesis)
    tiny = float(np.finfo(np.float32).tiny)  # 1.1754944e-38
    counts, lo, hi = stats.histogram(torch.tensor([0.0, tiny / 2, tiny], dtype=torch.float32), bins=4)
    assert counts.tolist() == [1, 0, 1, 1]
    assert (lo, hi) == (0.0, tiny)


def test_histogram_of_a_range_wider_than_the_largest_float_spreads_over_the_bins():
    values = [-3e38, -2e38, 0.0, 2e38, 3e38]  # hi - lo overflows float32 to inf
    counts, lo, hi = stats.histogram(torch.tensor(values, dtype=torch.float32), bins=3)
    # bins [-3e38, -1e38) [-1e38, 1e38) [1e38, 3e38]
    assert counts.tolist() == [2, 1, 2] == np.histogram(np.array(values), bins=3)[0].tolist()
    assert (lo, hi) == (float(np.float32(-3e38)), float(np.float32(3e38)))


def test_histogram_of_a_constant_is_centred_on_it():
    counts, lo, hi = stats.histogram(torch.full((3,), 2.0), bins=4)
    assert (lo, hi) == (1.5, 2.5)
    assert counts.tolist() == [0, 0, 3, 0]  # bins [1.5,1.75) [1.75,2) [2,2.25) [2.25,2.5]


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
    values, segments = stats.concat([torch.from_numpy(piece) for piece in pieces])
    counts, ranges = stats.segment_histograms(values, segments, bins)
    for row, (lo, hi), piece in zip(counts.numpy(), ranges.tolist(), pieces, strict=True):
        row, lo, hi = stats.finish_histogram(row, lo, hi)
        if piece.min() == piece.max():
            assert row.sum() == piece.size
            continue
        assert (lo, hi) == (piece.min(), piece.max())
        _assert_exact_binning(row, piece, bins)


def test_histogram_of_a_segment_with_nan_is_empty_and_leaves_the_others_alone():
    values, segments = stats.concat([torch.tensor([1.0, float("nan")]), torch.tensor([0.0, 1.0])])
    counts, ranges = stats.segment_histograms(values, segments, bins=2)
    finished = [stats.finish_histogram(row, *bounds) for row, bounds in zip(counts.numpy(), ranges.tolist())]
    assert finished[0][0].tolist() == [0, 0] and finished[0][1:] == (-0.5, 0.5)
    assert finished[1][0].tolist() == [1, 1] and finished[1][1:] == (0.0, 1.0)


def test_moments_of_an_empty_segment_are_undefined():
    mean, std, norm, nonfinite = stats.moments_from_sums(0.0, 0.0, 0)
    assert math.isnan(mean) and math.isnan(std) and norm == 0 and nonfinite == 0


def test_empty_segment_gets_an_empty_histogram():
    values, segments = stats.concat([torch.zeros(0), torch.tensor([5.0])])
    counts, ranges = stats.segment_histograms(values, segments, bins=3)
    empty, constant = (
        stats.finish_histogram(row, *bounds) for row, bounds in zip(counts.numpy(), ranges.tolist())
    )
    assert empty[0].sum() == 0 and empty[1:] == (-0.5, 0.5)
    assert constant[0].tolist() == [0, 1, 0] and constant[1:] == (4.5, 5.5)


def test_bincount_and_scatter_counting_agree():
    index = torch.tensor([0, 3, 3, 5, 0, 0])
    expected = np.bincount(index.numpy(), minlength=7)
    np.testing.assert_array_equal(stats._count(index, 7).numpy(), expected)
    np.testing.assert_array_equal(stats._scatter_count(index, 7).numpy(), expected)


def test_tanh_saturation_matches_a_hand_count():
    outputs = torch.tensor([0.5, -0.98, 0.99, 0.2, -0.97])  # |t| > 0.97: two of five (-0.97 is not beyond)
    assert stats.saturated_fraction(outputs, 0.97, "tanh").item() == pytest.approx(0.4)


def test_sigmoid_saturation_counts_both_tails():
    outputs = torch.tensor([0.01, 0.5, 0.995, 0.2])  # t > 0.97 or t < 0.03: two of four
    assert stats.saturated_fraction(outputs, 0.97, "sigmoid").item() == pytest.approx(0.5)


def test_dead_units_are_zero_for_the_whole_batch():
    outputs = torch.tensor([[0.0, 1.0, 0.0], [0.0, 2.0, 3.0]])  # unit 0 never fires; units 1 and 2 do
    assert stats.dead_fraction(outputs).item() == pytest.approx(1 / 3)


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
        stats.histogram(torch.zeros(2), bins=0)
