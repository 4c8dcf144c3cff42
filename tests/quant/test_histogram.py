import math
import re
import time

import numpy as np
import pytest

from tpusim.errors import DataError
from tpusim.quant import histogram
from tpusim.quant.histogram import (
    NonFiniteError,
    TensorStats,
    _bin_counts,
    _bin_counts_and_extremes,
    _coarsened,
    _extremes,
    bin_counts_and_extremes_reference,
    bin_counts_reference,
    extremes_reference,
    merge,
    observe,
    observe_merged,
    rebin_reference,
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


def _bins(data: np.ndarray, level: int, first_bin: int, bins: int) -> tuple[bool, np.ndarray]:
    return _bin_counts(data, histogram._grid(np.asarray(data).dtype, level, first_bin, bins), first_bin, bins)


def test_bin_kernel_matches_oracle():
    rng = np.random.default_rng(2)
    for level, first_bin, data in [
        (-2, -20, rng.uniform(-4.6, 27.0, 5000)),
        (3, 0, rng.uniform(0, 8 * 100, 5000).astype(np.float32)),
        (-20, -64, np.concatenate([rng.uniform(-64, 0, 100) * 2.0**-20, [0.0, -0.0]])),
    ]:
        inside, counts = _bins(data, level, first_bin, 128)
        assert inside
        np.testing.assert_array_equal(counts, bin_counts_reference(data, level, first_bin, 128))


def test_bin_kernel_reports_values_outside_window():
    inside, _ = _bins(np.array([0.5, 9.0]), 0, 0, 8)
    assert not inside


def test_min_max_kernel_flags_non_finite():
    assert _extremes(np.array([2.0, -1.0, 5.0])) == (True, -1.0, 5.0)
    for dtype in (np.float32, np.float64):
        for bad in (np.nan, np.inf, -np.inf, -np.nan):
            for where in range(3):
                x = np.array([2.0, -1.0, 5.0], dtype=dtype)
                x[where] = bad
                assert not _extremes(x)[0]
    # the largest finite values and the smallest subnormals are finite
    for dtype in (np.float32, np.float64):
        info = np.finfo(dtype)
        x = np.array([info.max, -info.max, info.smallest_subnormal, -info.smallest_subnormal], dtype=dtype)
        assert _extremes(x) == (True, float(-info.max), float(info.max))


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


# ------------------------------------------------- the implementation before the compiled kernels, as oracle
#
# observe and merge as they were (a scan keeping the first of equal values for the extremes, one counted
# value at a time, numpy's add.at for merging), in plain Python: every statistic must match it bit for bit.

def _old_min_max(flat: np.ndarray) -> tuple[float, float]:
    lo = hi = flat[0]
    for v in flat.tolist():
        if v < lo:
            lo = v
        elif v > hi:
            hi = v
    return float(lo), float(hi)


def _old_observe(x: np.ndarray, bins: int) -> TensorStats:
    x = np.asarray(x)
    if x.dtype not in (np.float32, np.float64):
        x = x.astype(np.float64)
    flat = np.ascontiguousarray(x).reshape(-1)
    data_min, data_max = _old_min_max(flat)
    level, first_bin = histogram._window(data_min, data_max, bins, histogram._MIN_LEVEL)
    inv_width = math.ldexp(1.0, -level)
    counts = np.zeros(bins, dtype=np.int64)
    for v in flat.tolist():
        g = math.floor(v * inv_width)
        if g == 0 and v < 0.0:
            g = -1
        counts[g - first_bin] += 1
    return histogram._stats(data_min, data_max, counts, level, first_bin, "tensor")


def _old_merge(a: TensorStats, b: TensorStats) -> TensorStats:
    data_min, data_max = min(a.min, b.min), max(a.max, b.max)
    level, first_bin = histogram._window(data_min, data_max, a.bins, max(a.level, b.level))
    counts = sum(rebin_reference(s.counts, s.first_bin, level - s.level, first_bin) for s in (a, b))
    return histogram._stats(data_min, data_max, counts, level, first_bin, "merged tensor")


def _assert_bit_identical(a: TensorStats, b: TensorStats) -> None:
    _assert_same(a, b)
    assert [math.copysign(1.0, v) for v in (a.min, a.max)] == [math.copysign(1.0, v) for v in (b.min, b.max)]
    assert a.counts.dtype == b.counts.dtype == np.int64


def _edge_cases() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(11)
    relu = np.maximum(rng.normal(size=5000), 0.0).astype(np.float32)
    signed_zeros = relu.copy()
    signed_zeros[rng.choice(signed_zeros.size, 300, replace=False)] = -0.0
    info32, info64 = np.finfo(np.float32), np.finfo(np.float64)
    return {
        "normal float32": rng.normal(0.3, 2.0, 20_000).astype(np.float32),
        "normal float64": rng.normal(-1.0, 1e-3, 3001),
        "relu (half exact zeros)": relu,
        "relu with -0.0 mixed in": signed_zeros,
        "-0.0 first, then +0.0": np.array([-0.0, 0.0, 1.5, 0.0], dtype=np.float32),
        "+0.0 first, then -0.0": np.array([0.0, -0.0, -1.5, -0.0]),
        "zeros only": np.zeros(4099, dtype=np.float32),
        "-0.0 only": np.full(33, -0.0),
        "mixed signed zeros only": np.array([-0.0, 0.0, -0.0, 0.0]),
        "negative only": -rng.uniform(0.5, 7.0, 2500).astype(np.float32),
        "negative only, float64 far from 0": -rng.uniform(1e6, 1e6 + 1, 1000),
        "positive only, one decade": rng.uniform(10.0, 100.0, 1500),
        "one value": np.array([3.25], dtype=np.float32),
        "one negative value": np.array([-1e-30]),
        "one zero": np.array([0.0], dtype=np.float32),
        "a scalar": np.array(-2.5),
        "constant": np.full(5000, 6.0, dtype=np.float32),
        "constant tiny negative": np.full(100, -1e-310),
        "huge range float64": np.array([-1e300, 1e-300, -1e-310, 0.0, 1e300, 5e-324, -5e-324]),
        "huge range float32": np.array([info32.max, -info32.max, info32.smallest_subnormal, 0.0], dtype=np.float32),
        "largest float64": np.array([info64.max / 4, -info64.max / 4, 1.0]),
        "tiny subnormals": np.array([5e-324, -5e-324, 1e-323, 0.0]),
        "on bin edges": np.arange(-64, 64, dtype=np.float64) / 8.0,
        "int8": rng.integers(-128, 128, 3000).astype(np.int8),
        "uint8 image": rng.integers(0, 256, (3, 32, 32)).astype(np.uint8),
        "int64 huge": np.array([-(2**62), 2**62, 7], dtype=np.int64),
        "int32 negative": rng.integers(-1000, -1, 777).astype(np.int32),
        "bool": rng.random(100) > 0.5,
        "float16": rng.normal(size=500).astype(np.float16),
        "transposed (not contiguous)": rng.normal(size=(64, 33)).astype(np.float32).T,
        "chunk-sized": rng.normal(size=1024).astype(np.float32),
        "chunk plus one": rng.normal(size=1025).astype(np.float32),
        "not a multiple of the ways": rng.normal(size=4 * 1024 + 3).astype(np.float32),
    }


@pytest.mark.parametrize("case", list(_edge_cases()))
@pytest.mark.parametrize("bins", [2, 7, 64, 2048])
def test_observe_matches_the_previous_implementation_bit_for_bit(case, bins):
    x = _edge_cases()[case]
    _assert_bit_identical(observe(x, bins), _old_observe(x, bins))


def test_observe_matches_the_previous_implementation_on_random_tensors():
    rng = np.random.default_rng(12)
    for trial in range(40):
        size = int(rng.integers(1, 30_000))
        scale = 10.0 ** rng.uniform(-30, 30)
        x = rng.standard_normal(size) * scale + rng.choice([0.0, scale, -scale * 3])
        if trial % 3 == 0:
            x = np.maximum(x, 0.0)
        if trial % 4 == 1:
            x = x.astype(np.float32)
        if trial % 5 == 2:
            x = np.round(x / scale * 4) * scale  # few distinct values: long runs in a bin
        bins = int(rng.choice([16, 100, 2048, 4096]))
        _assert_bit_identical(observe(x, bins), _old_observe(x, bins))


def test_merge_matches_the_previous_implementation_bit_for_bit():
    rng = np.random.default_rng(13)
    cases = list(_edge_cases().values())
    for trial in range(60):
        a, b = (cases[i] for i in rng.integers(0, len(cases), 2))
        bins = int(rng.choice([7, 64, 2048]))
        sa, sb = observe(a, bins), observe(b, bins)
        _assert_bit_identical(merge(sa, sb), _old_merge(sa, sb))
    # a sequence across wildly different levels, running and against the whole
    for bins in (16, 2048):
        running = old = None
        for x in cases[:12]:
            s = observe(x, bins)
            running = s if running is None else merge(running, s)
            old = s if old is None else _old_merge(old, s)
        _assert_bit_identical(running, old)


def test_extremes_kernel_matches_its_oracle():
    for case, x in _edge_cases().items():
        flat = np.ascontiguousarray(x).reshape(-1)
        if flat.dtype not in (np.float32, np.float64):
            flat = flat.astype(np.float64)
        got, want = _extremes(flat), extremes_reference(flat)
        assert got == want, case
        assert [math.copysign(1.0, v) for v in got[1:]] == [math.copysign(1.0, v) for v in want[1:]], case
        assert got[1:] == _old_min_max(flat), case


def test_bin_kernel_matches_oracle_on_zero_heavy_and_constant_data():
    rng = np.random.default_rng(14)
    for level, first_bin, data in [
        (-2, 0, np.maximum(rng.normal(size=9000), 0.0)),  # the bin of 0 spread over slots
        (-5, -32, np.where(rng.random(9000) < 0.7, 0.0, rng.normal(size=9000) * 0.1)),
        (0, -3, np.full(5000, 2.0, dtype=np.float32)),  # one bin, all ways
        (2, 5, rng.uniform(20, 40, 3000)),  # a window that does not hold 0
        (3, -10, np.zeros(17)),  # fewer values than the ways times the spread
    ]:
        inside, counts = _bins(data, level, first_bin, 64)
        assert inside
        np.testing.assert_array_equal(counts, bin_counts_reference(data, level, first_bin, 64))


def test_bin_kernel_reports_any_value_outside_the_window():
    for data, first_bin in [([0.5, 9.0], 0), ([1e300], 0), ([-1e300], 0), ([-0.5], 0), ([-1e-310], 0),
                            ([3.0] * 5000 + [-4.0], -3)]:
        inside, _ = _bins(np.array(data), 0, first_bin, 8)
        assert not inside, data
    assert _bins(np.array([-0.5]), 0, -1, 8)[0]


def _float64_grid(level: int, first_bin: int, bins: int) -> tuple:
    return histogram._grid(np.dtype(np.float64), level, first_bin, bins)


def test_float32_data_is_binned_in_float32_where_that_is_exact():
    f32, f64 = np.dtype(np.float32), np.dtype(np.float64)
    assert {type(v) for v in histogram._grid(f32, -5, -100, 2048)} == {np.float32}
    assert {type(v) for v in histogram._grid(f64, -5, -100, 2048)} == {np.float64}
    for level, first_bin, bins in [(-128, 0, 8), (127, 0, 8), (-1000, -1, 2048), (0, 2**24 - 7, 8),
                                   (0, -(2**24), 8), (0, 2**24 - 2047, 2048)]:
        assert {type(v) for v in histogram._grid(f32, level, first_bin, bins)} == {np.float64}, (level, first_bin)
    for level, first_bin, bins in [(-127, 0, 8), (126, -1, 8), (0, 2**24 - 8, 8), (0, 1 - 2**24, 8)]:
        assert {type(v) for v in histogram._grid(f32, level, first_bin, bins)} == {np.float32}, (level, first_bin)


def _float32_cases(rng: np.random.Generator) -> list[tuple[int, int, int, np.ndarray]]:
    """(level, first bin, bins, float32 values) where float32 arithmetic could go wrong if it were not exact:
    bin edges and the floats either side of them, values whose scaled value is subnormal or -0.0, the ends of
    float32's range of bin widths and of its integers, values just outside the window and far beyond it."""
    def around(values: np.ndarray) -> np.ndarray:
        with np.errstate(over="ignore"):  # (edges past float32's largest value become inf: outside too)
            values = values.astype(np.float32)
        return np.concatenate([values, np.nextafter(values, np.float32(-np.inf)),
                               np.nextafter(values, np.float32(np.inf))])

    cases = []
    for level, first_bin, bins in [(-2, -8, 32), (-20, -64, 128), (3, 0, 64), (-127, -4, 16), (126, -1, 4),
                                   (0, 2**24 - 8, 8), (0, 1 - 2**24, 8), (-10, -1024, 2048)]:
        edges = np.ldexp(np.arange(first_bin - 1, first_bin + bins + 2, dtype=np.float64), level)
        inside = np.ldexp(rng.uniform(first_bin, first_bin + bins, 4000), level)
        special = np.array([0.0, -0.0, 1e-45, -1e-45, 1e-40, -1e-40, 1e-38, -1e-38, 3e38, -3e38])
        cases.append((level, first_bin, bins, around(np.concatenate([edges, inside, special]))))
    return cases


def test_float32_binning_equals_float64_binning_and_the_oracle():
    rng = np.random.default_rng(30)
    for level, first_bin, bins, data in _float32_cases(rng):
        assert {type(v) for v in histogram._grid(data.dtype, level, first_bin, bins)} == {np.float32}
        data = rng.permutation(data)
        fits = np.array([math.isfinite(v) and first_bin <= histogram.grid_index(float(v), level) < first_bin + bins
                         for v in data])
        assert not fits.all()
        for x in (data, np.ascontiguousarray(data[fits])):
            ok32, counts32 = _bins(x, level, first_bin, bins)
            ok64, counts64 = _bin_counts(x, _float64_grid(level, first_bin, bins), first_bin, bins)
            assert ok32 == ok64 == (x.size == fits.sum()), (level, first_bin)
        np.testing.assert_array_equal(counts32, counts64)
        np.testing.assert_array_equal(counts32, bin_counts_reference(x, level, first_bin, bins))
        int_type, magnitude, _ = histogram._FLOAT_BITS[x.dtype]
        one_pass = _bin_counts_and_extremes(x, x.view(int_type), int_type, magnitude,
                                            histogram._grid(x.dtype, level, first_bin, bins), first_bin, bins)
        assert one_pass[0] and np.array_equal(one_pass[3], counts64), (level, first_bin)


def test_coarsening_kernel_matches_its_oracle():
    rng = np.random.default_rng(15)
    for _ in range(200):
        bins = int(rng.integers(2, 300))
        counts = rng.integers(0, 5, bins) * (rng.random(bins) < 0.5)
        first_bin = int(rng.integers(-bins, 1))
        shift = int(rng.choice([0, 1, 2, 5, 30, 63, 64, 200, 2000]))
        new_first = int(first_bin >> min(shift, 63))
        inside, got = _coarsened(counts.astype(np.int64), first_bin, shift, new_first)
        assert inside
        np.testing.assert_array_equal(got, rebin_reference(counts.astype(np.int64), first_bin, shift, new_first))
    assert not _coarsened(np.array([0, 0, 1], dtype=np.int64), 0, 0, 3)[0]  # an occupied bin outside
    assert _coarsened(np.array([0, 0, 0], dtype=np.int64), 0, 0, 3)[0]  # empty bins may fall anywhere


def test_a_merge_is_the_statistics_its_checked_constructor_gives():
    rng = np.random.default_rng(8)
    total = observe(rng.standard_normal(5000).astype(np.float32))
    for scale in (1.0, 0.5, 3.0, 3.0, 1e-3):  # wider, narrower and equal windows
        total = merge(total, observe(scale * rng.standard_normal(3000).astype(np.float32)))
        checked = TensorStats(total.min, total.max, total.counts, total.lo, total.hi, total.count)
        assert repr((total.min, total.max, total.lo, total.hi, total.count)) == \
            repr((checked.min, checked.max, checked.lo, checked.hi, checked.count))
        assert np.array_equal(total.counts, checked.counts) and total.counts.dtype == np.int64
        assert not total.counts.flags.writeable


# ------------------------------------------------------- one pass over a batch that fits the running window

def _one_pass(x: np.ndarray, level: int, first_bin: int, bins: int) -> tuple[bool, int, int, np.ndarray]:
    int_type, magnitude, _ = histogram._FLOAT_BITS[x.dtype]
    return _bin_counts_and_extremes(x, x.view(int_type), int_type, magnitude,
                                    histogram._grid(x.dtype, level, first_bin, bins), first_bin, bins)


def _assert_one_pass_matches_oracle(x: np.ndarray, level: int, first_bin: int, bins: int) -> bool:
    got, want = _one_pass(x, level, first_bin, bins), bin_counts_and_extremes_reference(x, level, first_bin, bins)
    assert got[0] == want[0], (level, first_bin, bins)
    if want[0]:  # (outside, the kernel stops early: its keys and counts are of the values before)
        assert got[1:3] == want[1:3]
        np.testing.assert_array_equal(got[3], want[3])
        assert got[3].dtype == np.int64
    return want[0]


def _one_pass_cases() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(21)
    cases = {}
    for case, x in _edge_cases().items():
        flat = np.ascontiguousarray(x).reshape(-1)
        cases[case] = flat if flat.dtype in (np.float32, np.float64) else flat.astype(np.float64)
    cases.update({
        "tiny negatives (-0.0 once scaled)": np.concatenate([-rng.uniform(1, 2, 3000) * 1e-300, [5.0, 0.0, -0.0]]),
        "tiny negatives float32": np.concatenate([-rng.uniform(1, 2, 2000) * 1e-44, [1e30, -0.0]]).astype(np.float32),
        "-0.0 extreme before +0.0": np.array([-0.0, 3.0, 0.0, 1.0] * 700, dtype=np.float32),
        "+0.0 extreme before -0.0": np.array([0.0, -3.0, -0.0, -1.0] * 700),
        "relu float64, odd size": np.maximum(rng.normal(size=3 * 1024 + 5), 0.0),
        "uniform float32, odd size": rng.uniform(-5, 100, 7 * 1024 - 1).astype(np.float32),
    })
    return cases


def test_one_pass_kernel_matches_its_oracle():
    for case, x in _one_pass_cases().items():
        for bins in (2, 7, 64, 2048):
            s = observe(x, bins)
            windows = [(s.level, s.first_bin), (s.level, s.first_bin + 1), (s.level - 1, s.first_bin)]
            if s.hi - s.lo < 1e300:
                wider = merge(s, observe(np.array([-3.0, 5.0]) * (s.hi - s.lo), bins))
                windows.append((wider.level, wider.first_bin))
            fits = [_assert_one_pass_matches_oracle(x, level, first, bins) for level, first in windows]
            assert fits[0] and fits[3:] in ([], [True]), case  # (shifted or finer windows may not fit)


def test_one_pass_kernel_on_window_edges_and_just_outside():
    for dtype in (np.float32, np.float64):
        lo, hi = -2.0, 6.0  # level -2 (width 1/4), first bin -8, 32 bins
        edges = np.arange(lo, hi, 0.25).astype(dtype)
        assert _assert_one_pass_matches_oracle(edges, -2, -8, 32)
        assert _assert_one_pass_matches_oracle(np.append(edges, np.nextafter(dtype(hi), dtype(0))), -2, -8, 32)
        for outside in (hi, np.nextafter(dtype(lo), dtype(-10)), 1e30, -1e30):
            for where in (0, 1500, 2999):  # first value, in a later chunk, last value
                x = np.resize(edges, 3000)
                x[where] = outside
                assert not _assert_one_pass_matches_oracle(x, -2, -8, 32), (dtype, outside, where)


def test_one_pass_kernel_finds_nan_and_inf_outside():
    for dtype in (np.float32, np.float64):
        for bad in (np.nan, -np.nan, np.inf, -np.inf):
            for where in (0, 1023, 1024, 4100):
                x = np.zeros(4101, dtype=dtype)
                x[where] = bad
                assert not _one_pass(x, -2, -8, 32)[0], (dtype, bad, where)


def _merge_of_observe(running: TensorStats, x: np.ndarray, name: str) -> TensorStats:
    return merge(running, observe(x, running.bins, name=name))


@pytest.fixture
def fallbacks(monkeypatch) -> list[int]:
    """Counts the calls of observe_merged that take merge instead of its one pass."""
    calls = []
    real_merge = histogram.merge

    def counted(a, b):
        calls.append(1)
        return real_merge(a, b)

    monkeypatch.setattr(histogram, "merge", counted)
    return calls


def test_observe_merged_equals_merge_of_observe_on_random_batches(fallbacks):
    rng = np.random.default_rng(22)
    cases = list(_edge_cases().values())
    fits = 0
    for trial in range(300):
        bins = int(rng.choice([2, 7, 64, 2048]))
        scale = 10.0 ** rng.uniform(-20, 20)
        running = observe(rng.standard_normal(int(rng.integers(1, 5000))) * scale, bins)
        if trial % 4 == 0:
            running = merge(running, observe(cases[trial % len(cases)], bins))
        size = int(rng.integers(1, 5000))
        x = rng.standard_normal(size) * scale * float(rng.choice([0.01, 0.3, 1.0, 1.5, 4.0]))
        if trial % 3 == 0:
            x = np.maximum(x, 0.0)
        if trial % 5 == 1:
            x[rng.random(size) < 0.2] = -0.0
        if trial % 2 == 0:
            x = x.astype(np.float32)
        fit = running.lo <= float(x.min()) and float(x.max()) < running.hi
        fits += fit
        before = len(fallbacks)
        got = observe_merged(running, x, name="t")
        assert len(fallbacks) - before == (not fit)
        _assert_bit_identical(got, _merge_of_observe(running, x, "t"))
    assert 60 < fits < 240 and 60 < len(fallbacks)  # both paths, many times each


def test_observe_merged_equals_merge_of_observe_on_edge_cases():
    cases = _edge_cases()
    names = list(cases)
    for bins in (2, 7, 2048):
        for i, running_case in enumerate(names):
            running = observe(cases[running_case], bins)
            for x_case in names[i % 3 :: 3]:
                _assert_bit_identical(observe_merged(running, cases[x_case]), _merge_of_observe(running, cases[x_case],
                                                                                                  "tensor"))


def test_observe_merged_keeps_the_sign_of_zero_extremes(fallbacks):
    positive = observe(np.array([1.0, 2.0, 3.0]))  # min > 0: a batch's zero becomes the minimum
    relu_plus, relu_minus = observe(np.array([0.0, 2.5])), observe(np.array([-0.0, 2.5]))
    negative = observe(np.array([-3.0, -1.0]))  # max < 0: a batch's zero becomes the maximum
    batches = [np.array(b, dtype=dtype) for dtype in (np.float32, np.float64) for b in
               ([-0.0, 0.0, 1.0], [0.0, -0.0, 1.0], [1.5, -0.0, 0.0], [-0.0] * 5, [0.0] * 1030 + [-0.0],
                [-0.5, -0.0, 0.0], [-0.5, 0.0, -0.0])]
    for running in (positive, relu_plus, relu_minus, negative):
        for x in batches:
            got, want = observe_merged(running, x), _merge_of_observe(running, x, "tensor")
            _assert_bit_identical(got, want)
    assert len(fallbacks) < len(batches) * 4 / 2  # mostly the one pass


def test_observe_merged_raises_as_observe_does():
    running = observe(np.linspace(-1.0, 1.0, 100))
    for bad in (np.nan, np.inf, -np.inf):
        for dtype in (np.float32, np.float64):
            x = np.zeros(2000, dtype=dtype)
            x[1500] = bad
            with pytest.raises(NonFiniteError) as expected:
                observe(x, name="layer3.relu")
            with pytest.raises(NonFiniteError) as got:
                observe_merged(running, x, name="layer3.relu")
            assert str(got.value) == str(expected.value) == "layer3.relu: tensor contains NaN or inf"
    with pytest.raises(DataError, match="^conv1: empty tensor$"):
        observe_merged(running, np.zeros((3, 0), dtype=np.float32), name="conv1")


def test_observe_merged_falls_back_where_its_window_is_not_the_merged_one(fallbacks):
    # a window looser than any observe or merge makes: a merge moves it to the data's own first bin
    loose = TensorStats(1.0, 2.0, np.array([0, 0, 0, 0, 1, 1, 0, 0]), -2.0, 6.0, 2)
    x = np.array([1.5, 1.75])
    _assert_bit_identical(observe_merged(loose, x), _merge_of_observe(loose, x, "tensor"))
    assert merge(loose, observe(x, 8)).lo == 0.0 and len(fallbacks) == 1
    # near the largest float: a batch inside a merged window, whose own observe fails
    huge = merge(observe(np.array([8e307])), observe(np.array([-8e307])))
    x = np.array([-8e307, 8.9e307])
    assert huge.lo <= x.min() and x.max() < huge.hi
    with pytest.raises(Exception) as expected:
        observe(x)
    with pytest.raises(type(expected.value), match=re.escape(str(expected.value))):
        observe_merged(huge, x)


def test_observe_merged_over_batches_equals_the_concatenated_data_exactly(fallbacks):
    rng = np.random.default_rng(23)
    surprises = [
        rng.uniform(0.0, 1.0, 3000),
        np.zeros(50),
        rng.normal(0.0, 0.1, 2000),
        rng.uniform(-3.0, 40.0, 1000),
        np.array([-1e-3, 1e-4]),
        rng.laplace(0.0, 5.0, 4000).astype(np.float32),
    ]
    settled = [np.maximum(rng.normal(0.0, 1.0, 10_000), 0.0).astype(np.float32) for _ in range(12)]
    for batches in (surprises, settled, settled[:4] + surprises + settled[4:]):
        for bins in (2048, 64, 7):
            running = observe(batches[0], bins)
            for batch in batches[1:]:
                running = observe_merged(running, batch)
            whole = observe(np.concatenate([b.astype(np.float64) for b in batches]), bins)
            _assert_bit_identical(running, whole)
    assert len(fallbacks) < 3 * (len(surprises) - 1) + 3 * 12  # the settled batches mostly fit
