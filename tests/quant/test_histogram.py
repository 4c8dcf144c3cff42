import math
import time

import numpy as np
import pytest

from tpusim.errors import DataError
from tpusim.quant.histogram import (
    TensorStats,
    _bin_counts,
    _finite_min_max,
    bin_counts_reference,
    merge,
    observe,
)


def _assert_same(a: TensorStats, b: TensorStats) -> None:
    assert (a.min, a.max, a.count, a.lo, a.hi) == (b.min, b.max, b.count, b.lo, b.hi)
    np.testing.assert_array_equal(a.counts, b.counts)


def test_observe_exact_extremes_count_and_grid():
    x = np.random.default_rng(1).normal(0.3, 2.0, size=(7, 11, 13)).astype(np.float32)
    s = observe(x)
    assert s.min == float(x.min()) and s.max == float(x.max()) and s.count == x.size
    assert s.bins == 2048 and s.counts.dtype == np.int64 and int(s.counts.sum()) == x.size
    assert math.frexp(s.bin_width)[0] == 0.5
    assert s.lo <= s.min and s.max < s.hi and s.lo <= 0.0 < s.hi
    # The window is the finest power-of-two grid that fits: half the width would not.
    assert (math.floor(s.max / (s.bin_width / 2)) - math.floor(s.min / (s.bin_width / 2))) >= s.bins
    np.testing.assert_array_equal(s.counts, np.histogram(x.astype(np.float64), bins=s.edges)[0])


def test_bin_kernel_matches_oracle():
    rng = np.random.default_rng(2)
    for level, first_bin, data in [
        (-2, -20, rng.uniform(-4.6, 27.0, 5000)),
        (3, 0, rng.uniform(0, 8 * 100, 5000).astype(np.float32)),
        (-20, -64, np.concatenate([rng.uniform(-64, 0, 100) * 2.0**-20, [0.0, -0.0]])),
    ]:
        inside, counts = _bin_counts(data, math.ldexp(1.0, -level), first_bin, 128)
        assert inside
        np.testing.assert_array_equal(counts, bin_counts_reference(data, level, first_bin, 128))


def test_bin_kernel_reports_values_outside_window():
    inside, _ = _bin_counts(np.array([0.5, 9.0]), 1.0, 0, 8)
    assert not inside


def test_min_max_kernel_flags_non_finite():
    assert _finite_min_max(np.array([2.0, -1.0, 5.0])) == (True, -1.0, 5.0)
    assert not _finite_min_max(np.array([2.0, np.nan]))[0]
    assert not _finite_min_max(np.array([np.inf, 1.0], dtype=np.float32))[0]


def test_histogram_always_contains_zero_as_an_edge():
    positive = observe(np.array([5.0, 6.0, 7.5]))
    assert positive.lo == 0.0 and positive.first_bin == 0
    negative = observe(np.array([-7.5, -5.0]))
    assert negative.hi > 0.0 and negative.max < 0.0
    zero_bin = -negative.first_bin
    assert negative.edges[zero_bin] == 0.0 and negative.counts[zero_bin:].sum() == 0


def test_tiny_negative_value_is_not_counted_in_the_zero_bin():
    # x / width underflows to -0.0 here; the value still belongs below 0.
    s = observe(np.array([-1e-310, 1e300, 0.0]))
    zero_bin = -s.first_bin
    assert s.counts[zero_bin - 1] == 1 and s.counts[zero_bin] == 1


def test_all_zero_tensor():
    s = observe(np.zeros(10, dtype=np.float32))
    assert (s.min, s.max, s.count) == (0.0, 0.0, 10)
    assert s.counts[-s.first_bin] == 10


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values_raise_data_error_naming_the_tensor(bad):
    with pytest.raises(DataError, match="conv1_out"):
        observe(np.array([1.0, bad, 2.0], dtype=np.float32), name="conv1_out")


def test_empty_tensor_raises_data_error():
    with pytest.raises(DataError, match="empty"):
        observe(np.zeros((0, 3)))


def test_merged_batches_equal_the_concatenated_data_exactly():
    rng = np.random.default_rng(3)
    batches = [
        rng.uniform(0.0, 1.0, 3000),  # one-sided, fine grid
        np.zeros(50),
        rng.normal(0.0, 0.1, 2000),  # introduces negatives
        rng.uniform(-3.0, 40.0, 1000),  # widens the range ~40x: several doublings
        np.array([-1e-3, 1e-4]),
        rng.laplace(0.0, 5.0, 4000).astype(np.float32),
    ]
    for bins in (2048, 64, 7):
        running = observe(batches[0], bins)
        for batch in batches[1:]:
            running = merge(running, observe(batch, bins))
        whole = observe(np.concatenate([b.astype(np.float64) for b in batches]), bins)
        _assert_same(running, whole)


def test_merge_is_commutative_and_associative():
    rng = np.random.default_rng(4)
    a, b, c = (observe(rng.normal(m, s, 500)) for m, s in [(0, 1), (10, 0.1), (-100, 3)])
    _assert_same(merge(a, b), merge(b, a))
    _assert_same(merge(merge(a, b), c), merge(a, merge(b, c)))


def test_widening_sums_pairs_of_bins_exactly():
    a = observe(np.arange(16) / 16.0 + 1 / 64, bins=16)  # [0, 1): width 1/16, one value per bin
    assert a.bin_width == 1 / 16 and np.all(a.counts == 1)
    b = observe(np.array([3.5]), bins=16)  # forces width 1/4
    merged = merge(a, b)
    assert merged.bin_width == 1 / 4 and merged.lo == 0.0
    expected = np.zeros(16, dtype=np.int64)
    expected[:4] = 4  # each coarse bin holds four fine bins
    expected[14] = 1  # 3.5 in [3.5, 3.75)
    np.testing.assert_array_equal(merged.counts, expected)


def test_merge_rejects_different_bin_counts():
    with pytest.raises(ValueError, match="bins"):
        merge(observe(np.ones(3), bins=16), observe(np.ones(3), bins=32))


def test_stats_are_validated_and_read_only():
    s = observe(np.array([1.0, 2.0]), bins=4)
    with pytest.raises(ValueError):
        s.counts[0] = 5
    with pytest.raises(ValueError, match="power-of-two"):
        TensorStats(0.0, 1.0, np.array([1, 1, 0]), 0.0, 1.2, 2)
    with pytest.raises(ValueError, match="cover"):
        TensorStats(0.0, 5.0, np.array([1, 1]), 0.0, 2.0, 2)
    with pytest.raises(ValueError, match="sum"):
        TensorStats(0.0, 1.0, np.array([1, 1]), 0.0, 2.0, 3)


def test_observe_is_fast_on_a_large_activation():
    x = np.random.default_rng(5).normal(size=1_600_000).astype(np.float32)
    observe(x[:10])  # compile / load the cached kernels
    start = time.perf_counter()
    s = observe(x)
    elapsed = time.perf_counter() - start
    assert s.count == x.size
    assert elapsed < 0.25, f"observe took {elapsed:.3f} s"
