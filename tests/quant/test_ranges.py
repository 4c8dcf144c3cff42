import numpy as np
import pytest

from tpusim.quant.arithmetic import activation_qparams, asymmetric_grid, dequantize, quantize
from tpusim.quant.histogram import observe
from tpusim.quant.ranges import (
    _expected_sq_errors,
    _kl_divergences,
    entropy_range,
    expected_sq_errors_reference,
    kl_divergences_reference,
    magnitude_histogram,
    magnitude_without_zero_spike,
    minmax_range,
    mse_range,
    percentile_range,
    select_range,
)

METHODS = ["minmax", "percentile", "entropy", "mse"]


def _measured_mse(x: np.ndarray, lo: float, hi: float, symmetric: bool) -> float:
    qp = activation_qparams(lo, hi, "symmetric-int8" if symmetric else "asymmetric-uint8")
    return float(np.mean((dequantize(quantize(x, qp), qp).astype(np.float64) - x) ** 2))


@pytest.fixture(scope="module")
def heavy_tailed() -> np.ndarray:
    # 8-bit rounding error is small: clipping a few outliers only pays off on a large sample.
    x = np.random.default_rng(0).laplace(0.0, 1.0, 1_000_000)
    x[:4] = [60.0, -50.0, 80.0, -70.0]
    return x


def test_minmax_exact():
    s = observe(np.array([-2.0, 0.5, 3.0]))
    assert minmax_range(s, symmetric=False) == (-2.0, 3.0)
    assert minmax_range(s, symmetric=True) == (-3.0, 3.0)
    positive = observe(np.array([1.0, 5.0]))
    assert minmax_range(positive, symmetric=False) == (0.0, 5.0)
    assert minmax_range(observe(np.array([-4.0, -1.0])), symmetric=False) == (-4.0, 0.0)


def test_magnitude_histogram_folds_signs_exactly():
    x = np.array([-3.2, -0.1, 0.0, 0.1, 0.2, 2.9, -1.45, 1.45])
    s = observe(x, bins=64)
    expected = np.bincount(np.floor(np.abs(x) / s.bin_width).astype(int))
    np.testing.assert_array_equal(magnitude_histogram(s), expected)
    # On an edge, a negative's magnitude bin is half-open at the bottom: |-1.5| = 12 w -> bin 11.
    edge = observe(np.array([-1.5, 1.5, -3.2]), bins=64)
    assert edge.bin_width == 0.125
    assert magnitude_histogram(edge)[11] == 1 and magnitude_histogram(edge)[12] == 1


def test_percentile_on_evenly_spread_data():
    x = (np.arange(8192) + 0.5) / 8192  # two values per bin of width 2**-12
    s = observe(x)
    lo, hi = percentile_range(s, symmetric=False, percentile=99.0)
    assert lo == 0.0 and hi == pytest.approx(0.995, abs=s.bin_width)
    assert percentile_range(s, symmetric=False, percentile=100.0) == (0.0, x.max())
    lo, hi = percentile_range(s, symmetric=True, percentile=90.0)
    assert hi == pytest.approx(0.9, abs=s.bin_width) and lo == -hi


def test_percentile_matches_numpy_quantiles_within_a_bin(heavy_tailed):
    s = observe(heavy_tailed)
    lo, hi = percentile_range(s, symmetric=False, percentile=99.9)
    ref_lo, ref_hi = np.quantile(heavy_tailed, [0.0005, 0.9995])
    assert abs(lo - ref_lo) <= s.bin_width and abs(hi - ref_hi) <= s.bin_width
    t = percentile_range(s, symmetric=True, percentile=99.9)[1]
    assert abs(t - np.quantile(np.abs(heavy_tailed), 0.999)) <= s.bin_width


@pytest.mark.parametrize("symmetric", [True, False])
def test_percentile_is_monotonic(heavy_tailed, symmetric):
    s = observe(heavy_tailed)
    ranges = [percentile_range(s, symmetric, p) for p in (50.0, 90.0, 99.0, 99.9, 99.99, 99.999, 100.0)]
    widths = [hi - lo for lo, hi in ranges]
    assert all(a < b for a, b in zip(widths, widths[1:]))
    assert ranges[-1] == minmax_range(s, symmetric)


def test_kl_kernel_matches_oracle():
    rng = np.random.default_rng(1)
    smooth = np.bincount(np.minimum(np.abs(rng.normal(0, 60, 20000)).astype(int), 299), minlength=300)
    sparse = smooth * (rng.uniform(size=300) < 0.3)
    gap = smooth.copy()
    gap[150:290] = 0  # candidates whose last bin is empty must take the outliers
    spike = smooth.copy()
    spike[0] += 50000
    for hist in (smooth, sparse, gap, spike):
        for levels, start in [(128, 128), (256, 128), (8, 10)]:
            kernel = _kl_divergences(hist.astype(np.float64), start, levels)
            np.testing.assert_allclose(kernel, kl_divergences_reference(hist, start, levels), rtol=1e-9)


def test_kl_divergence_is_zero_when_nothing_is_lost():
    # 20 bins of data, 4 levels of 5 equal bins each: every candidate from 20 bins on is exact.
    hist = np.array([7.0] * 20 + [0.0] * 10)
    divergences = _kl_divergences(hist, 20, 4)
    assert divergences[0] == 0.0 and np.all(divergences >= 0.0)


def test_entropy_clips_outliers_but_keeps_uniform_data(heavy_tailed):
    s = observe(heavy_tailed)
    for symmetric in (True, False):
        lo, hi = entropy_range(s, symmetric)
        assert 4.0 < hi < 0.5 * s.max and lo < 0.0
    uniform = observe(np.random.default_rng(2).uniform(-1.0, 1.0, 100_000))
    lo, hi = entropy_range(uniform, symmetric=True)
    assert hi > 0.97 and lo == -hi


def test_entropy_of_one_sided_data_on_an_asymmetric_grid_starts_at_zero():
    relu = np.maximum(np.random.default_rng(3).normal(size=100_000), 0.0)
    lo, hi = entropy_range(observe(relu), symmetric=False)
    assert lo == 0.0 and np.quantile(relu, 0.9999) < hi <= relu.max()


def test_zero_spike_is_capped_at_the_next_bin():
    np.testing.assert_array_equal(magnitude_without_zero_spike(np.array([900, 40, 7])), [40.0, 40.0, 7.0])
    np.testing.assert_array_equal(magnitude_without_zero_spike(np.array([3, 40, 7])), [3.0, 40.0, 7.0])
    np.testing.assert_array_equal(magnitude_without_zero_spike(np.array([5])), [5.0])


@pytest.mark.parametrize("symmetric", [True, False])
def test_entropy_of_relu_outputs_ignores_the_exact_zeros(symmetric):
    # Exact zeros are exact on every grid: however many a ReLU emits, the threshold must stay at
    # the tail of the positives (it fell to 2.0 with half zeros and 1.0 with 80 % before).
    positives = np.abs(np.random.default_rng(4).normal(size=50_000))
    tail = np.quantile(positives, 0.999)
    thresholds = set()
    for zeros in (50_000, 200_000):
        lo, hi = entropy_range(observe(np.concatenate([positives, np.zeros(zeros)])), symmetric)
        assert hi >= tail and lo == (-hi if symmetric else 0.0)
        thresholds.add(hi)
    assert len(thresholds) == 1


def test_mse_kernel_matches_numerical_integration():
    lower = np.array([-3.0, -0.4, 0.0, 0.3, 1.1, 2.0])
    upper = np.array([-2.5, 0.0, 0.0, 0.9, 1.3, 4.0])  # one point mass at 0
    counts = np.array([2.0, 30.0, 50.0, 40.0, 9.0, 3.0])
    scales, zero_points = asymmetric_grid(np.array([-3.0, -1.0, -0.2, 0.0]), np.array([4.0, 1.0, 0.5, 2.0]), 0, 255)
    scales = np.append(scales, [0.05, 0.7])  # symmetric grids too
    zero_points = np.append(zero_points, [0, 0]).astype(np.float64)
    for qmin, qmax in [(0, 255), (-127, 127)]:
        zp = zero_points if qmin == 0 else np.zeros_like(zero_points)
        kernel = _expected_sq_errors(lower, upper, counts, scales, zp, qmin, qmax)
        reference = expected_sq_errors_reference(lower, upper, counts, scales, zp, qmin, qmax)
        np.testing.assert_allclose(kernel, reference, rtol=2e-3)


def test_mse_kernel_exact_for_uniform_data():
    scale = 1.0 / 255
    one = np.ones(1)
    inside = _expected_sq_errors(np.zeros(1), one, one, np.array([scale]), np.zeros(1), 0, 255)
    assert inside[0] == pytest.approx(scale**2 / 12, rel=1e-9)
    # Uniform on [0, 2] on the grid [0, 1]: rounding over [0, 1] plus clipping (t - 1)^2 over [1, 2].
    clipped = _expected_sq_errors(np.zeros(1), 2 * one, one, np.array([scale]), np.zeros(1), 0, 255)
    assert clipped[0] == pytest.approx((scale**2 / 12 + 1 / 3) / 2, rel=1e-9)


@pytest.mark.parametrize("symmetric", [True, False])
def test_mse_on_uniform_data_is_the_data_range(symmetric):
    x = np.random.default_rng(4).uniform(-1.0, 1.0, 200_000)
    s = observe(x)
    lo, hi = mse_range(s, symmetric)
    ref_lo, ref_hi = minmax_range(s, symmetric)
    step = (ref_hi - ref_lo) / (254 if symmetric else 255)
    assert ref_hi - step <= hi <= ref_hi and ref_lo <= lo <= ref_lo + step


@pytest.mark.parametrize("symmetric", [True, False])
def test_mse_clips_outliers_and_beats_minmax_on_the_data(heavy_tailed, symmetric):
    s = observe(heavy_tailed)
    lo, hi = mse_range(s, symmetric)
    assert hi < 0.75 * s.max and lo > 0.75 * s.min
    measured = _measured_mse(heavy_tailed, lo, hi, symmetric)
    assert measured < 0.8 * _measured_mse(heavy_tailed, *minmax_range(s, symmetric), symmetric)
    # A local optimum of the real error too, not only of the histogram model.
    for factor in (0.8, 1.25):
        assert measured < _measured_mse(heavy_tailed, lo * factor, hi * factor, symmetric)


def test_mse_asymmetric_searches_both_sides_of_skewed_data():
    rng = np.random.default_rng(5)
    x = np.concatenate([rng.uniform(-0.5, 0.0, 500_000), rng.exponential(1.0, 500_000), [200.0]])
    s = observe(x)
    lo, hi = mse_range(s, symmetric=False)
    assert lo == pytest.approx(x.min(), abs=0.02)  # the bounded side is kept
    # Clipping the outlier to t costs (200 - t)^2 / n against coarser rounding; a sweep of the
    # measured error over t puts the optimum near 95.
    assert 80.0 < hi < 100.0
    measured = _measured_mse(x, lo, hi, False)
    assert measured < 0.6 * _measured_mse(x, *minmax_range(s, False), False)
    for other_hi in (0.8 * hi, 1.25 * hi):
        assert measured < _measured_mse(x, lo, other_hi, False)


@pytest.mark.parametrize("method", METHODS)
def test_asymmetric_ranges_contain_zero_and_symmetric_ones_are_symmetric(method):
    relu = np.maximum(np.random.default_rng(6).normal(1.0, 2.0, 50_000), 0.0)
    s = observe(relu)
    lo, hi = select_range(method, s, symmetric=False)
    assert lo == 0.0 and 0.0 < hi <= relu.max()
    lo, hi = select_range(method, s, symmetric=True)
    assert lo == -hi and 0.0 < hi <= relu.max()
    negative = observe(-relu)
    lo, hi = select_range(method, negative, symmetric=False)
    assert hi == 0.0 and -relu.max() <= lo < 0.0


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("symmetric", [True, False])
def test_all_zero_tensor_gives_a_usable_range(method, symmetric):
    lo, hi = select_range(method, observe(np.zeros(100)), symmetric)
    assert lo == 0.0 and hi == 0.0
    activation_qparams(lo, hi, "symmetric-int8" if symmetric else "asymmetric-uint8")


def test_select_range_dispatches_and_rejects_unknown_methods(heavy_tailed):
    s = observe(heavy_tailed)
    assert select_range("percentile", s, True, 99.9) == percentile_range(s, True, 99.9)
    assert select_range("mse", s, False) == mse_range(s, False)
    with pytest.raises(ValueError, match="kl"):
        select_range("kl", s, True)
    with pytest.raises(ValueError, match="percentile"):
        percentile_range(s, True, 0.0)
