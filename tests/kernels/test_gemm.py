import threading
import time
import warnings

import numba
import numpy as np
import pytest
from numba import njit

from tpusim.kernels.amx import amx_ready
from tpusim.kernels.gemm import (
    HAS_AVX2,
    HAS_VNNI,
    RequantizedGemm,
    _finish_words_strip,
    _load_value,
    _sums_fit,
    _word_constants,
    claim_task,
    finish_task,
    grouped_int8_gemm,
    int8_gemm,
    int8_gemm_reference,
    requantized_int8_gemm,
    run_tasks,
    thread_count,
    vnni_depth,
    wrap_reference,
    wrap_to_bits,
)
from tpusim.quant.fixed_point import quantize_multiplier, requantize_reference

# The vpdpbusd kernel runs only on CPUs with AVX-512 VNNI; the portable kernel runs everywhere.
_NEEDS_VNNI = pytest.mark.skipif(not HAS_VNNI, reason="CPU lacks AVX-512 VNNI")
KERNELS = [pytest.param(True, marks=_NEEDS_VNNI, id="vnni"), pytest.param(False, id="portable")]
# The fused GEMM has two more kernels: AMX tiles (tdpbusd) where the CPU has them and the process may use them,
# and vpmaddwd tiles for CPUs with AVX2 where vpdpbusd does not run.
_NEEDS_AMX = pytest.mark.skipif(not amx_ready(), reason="CPU lacks AMX int8, or Linux refuses this process its tiles")
FUSED_KERNELS = [pytest.param({"use_amx": True, "use_vnni": True, "use_avx2": False}, marks=_NEEDS_AMX, id="amx"),
                 pytest.param({"use_amx": False, "use_vnni": True, "use_avx2": False}, marks=_NEEDS_VNNI, id="vnni"),
                 pytest.param({"use_vnni": False, "use_avx2": True},
                              marks=pytest.mark.skipif(not HAS_AVX2, reason="CPU lacks AVX2"), id="avx2"),
                 pytest.param({"use_vnni": False, "use_avx2": False}, id="portable")]


def random_operands(rng, m, k, n, unsigned=False):
    x = rng.integers(0, 256, (m, k)).astype(np.uint8) if unsigned else rng.integers(-128, 128, (m, k)).astype(np.int8)
    return x, rng.integers(-128, 128, (k, n)).astype(np.int8)


def assert_same(got, want):
    assert got.result.dtype == want.result.dtype
    np.testing.assert_array_equal(got.result, want.result)
    assert got.wrapped_count == want.wrapped_count


def test_hand_computed_values_with_bias():
    x = np.array([[1, 2], [3, -4]], np.int8)
    w = np.array([[5, 6], [7, -8]], np.int8)
    bias = np.array([100, -1], np.int32)
    got = int8_gemm(x, w, bias=bias)
    np.testing.assert_array_equal(got.result, [[119, -11], [87, 49]])
    assert got.result.dtype == np.int32 and got.wrapped_count == 0


@pytest.mark.parametrize("unsigned", [False, True])
@pytest.mark.parametrize("shape", [(1, 1, 1), (1, 300, 7), (5, 3, 130), (13, 147, 64), (64, 576, 33)])
def test_kernel_equals_oracle(shape, unsigned):
    rng = np.random.default_rng(sum(shape) + unsigned)
    x, w = random_operands(rng, *shape, unsigned=unsigned)
    bias = rng.integers(-2**31, 2**31, shape[2]).astype(np.int32)
    assert_same(int8_gemm(x, w), int8_gemm_reference(x, w))
    assert_same(int8_gemm(x, w, bias=bias), int8_gemm_reference(x, w, bias=bias))


def test_worst_case_fills_the_int32_accumulator_and_wraps_once_past_it():
    # (-128) * (-128) = 2**14; 2**17 terms sum to exactly 2**31, one past int32's top
    x = np.full((2, 2**17), -128, np.int8)
    w = np.full((2**17, 3), -128, np.int8)
    w[-1, 1] = 0  # column 1 sums to 2**31 - 2**14: just fits
    got = int8_gemm(x, w)
    np.testing.assert_array_equal(got.result, [[-2**31, 2**31 - 2**14, -2**31]] * 2)
    assert got.wrapped_count == 4
    assert_same(got, int8_gemm_reference(x, w))
    # a 40-bit accumulator holds it exactly, in an int64 array
    wide = int8_gemm(x, w, acc_bits=40)
    assert wide.result.dtype == np.int64 and wide.wrapped_count == 0
    assert wide.result[0, 0] == 2**31


def test_uint8_extreme_products():
    x = np.full((3, 4), 255, np.uint8)
    w = np.full((4, 2), -128, np.int8)
    np.testing.assert_array_equal(int8_gemm(x, w).result, np.full((3, 2), 4 * 255 * -128))


def test_small_accumulator_wraps_and_counts_like_the_oracle():
    rng = np.random.default_rng(7)
    x, w = random_operands(rng, 31, 200, 17)
    got = int8_gemm(x, w, acc_bits=16)
    want = int8_gemm_reference(x, w, acc_bits=16)
    assert_same(got, want)
    assert 0 < got.wrapped_count < x.shape[0] * w.shape[1]
    assert got.result.min() >= -2**15 and got.result.max() < 2**15


def test_bias_can_push_a_sum_out_of_range():
    x = np.ones((1, 1), np.int8)
    w = np.ones((1, 2), np.int8)
    got = int8_gemm(x, w, bias=np.array([2**31 - 1, 2**31 - 2], np.int32))
    np.testing.assert_array_equal(got.result, [[-2**31, 2**31 - 1]])
    assert got.wrapped_count == 1


@pytest.mark.parametrize("bits", [2, 8, 16, 31, 32, 40, 63, 64])
def test_wrap_kernel_equals_oracle(bits):
    values = np.array([0, 1, -1, 2**15, -2**15 - 1, 2**31, -2**31 - 1, 3 * 2**40 + 5, -2**62, 2**62], np.int64)
    got = np.array([wrap_to_bits(v, bits) for v in values])
    np.testing.assert_array_equal(got, wrap_reference(values, bits))


@pytest.mark.parametrize(
    "x, w, bias, bits",
    [
        (np.zeros((2, 3), np.int16), np.zeros((3, 1), np.int8), None, 32),
        (np.zeros((2, 3), np.int8), np.zeros((3, 1), np.uint8), None, 32),
        (np.zeros((2, 3), np.int8), np.zeros((4, 1), np.int8), None, 32),
        (np.zeros((2, 3), np.int8), np.zeros((3, 2), np.int8), np.zeros(2, np.int64), 32),
        (np.zeros((2, 3), np.int8), np.zeros((3, 2), np.int8), None, 1),
    ],
)
def test_rejects_bad_operands(x, w, bias, bits):
    with pytest.raises(ValueError):
        int8_gemm(x, w, acc_bits=bits, bias=bias)


def grouped_reference(x, w_nk, acc_bits, bias):
    """Oracle per group: the (M, K) x (K, N) reference on each group's slice."""
    n_g = w_nk.shape[1]
    results = [int8_gemm_reference(x[g], w_nk[g].T, acc_bits, None if bias is None else bias[g * n_g : (g + 1) * n_g])
               for g in range(x.shape[0])]
    return np.stack([r.result for r in results]), sum(r.wrapped_count for r in results)


@pytest.mark.parametrize("use_vnni", KERNELS)
@pytest.mark.parametrize("acc_bits", [32, 16, 40])
@pytest.mark.parametrize(
    "groups, m, k, n",
    [
        (1, 8, 64, 8),      # whole 4 x 4 tiles, one 64-byte block
        (1, 13, 147, 10),   # K zero-padded to 192, edge rows and columns
        (3, 9, 128, 4),     # grouped conv
        (5, 7, 9, 1),       # depthwise: one weight row per group
        (2, 5, 300, 7),
        (1, 6, 37, 12),     # K too short to pad: the portable kernel takes it
    ],
)
@pytest.mark.parametrize("unsigned", [True, False])
def test_grouped_kernel_equals_oracle(groups, m, k, n, acc_bits, use_vnni, unsigned):
    rng = np.random.default_rng(groups * 1000 + m * 100 + k + n + acc_bits + unsigned)
    x = rng.integers(0, 256, (groups, m, k)).astype(np.uint8) if unsigned else \
        rng.integers(-128, 128, (groups, m, k)).astype(np.int8)
    w = rng.integers(-128, 128, (groups, n, k)).astype(np.int8)
    bias = rng.integers(-2**31, 2**31, groups * n).astype(np.int32)
    got = grouped_int8_gemm(x, w, acc_bits, bias, use_vnni=use_vnni)
    want, wrapped = grouped_reference(x, w, acc_bits, bias)
    assert got.result.shape == (groups, m, n) and got.result.dtype == want.dtype
    np.testing.assert_array_equal(got.result, want)
    assert got.wrapped_count == wrapped
    if acc_bits == 16:
        assert wrapped > 0


@pytest.mark.parametrize("use_vnni", KERNELS)
def test_grouped_result_is_channel_major(use_vnni):
    rng = np.random.default_rng(3)
    x = rng.integers(0, 256, (2, 8, 64)).astype(np.uint8)
    w = rng.integers(-128, 128, (2, 4, 64)).astype(np.int8)
    result = grouped_int8_gemm(x, w, use_vnni=use_vnni).result
    # (groups, M, N) values over (groups, N, M) memory: a batch-1 conv output is NCHW with no copy
    assert result.transpose(0, 2, 1).flags.c_contiguous
    np.testing.assert_array_equal(result, grouped_reference(x, w, 32, None)[0])


@pytest.mark.parametrize("use_vnni", KERNELS)
@pytest.mark.parametrize("x_value, k, wraps", [
    # 255 * -128 * 65792 = -(2**31 - 2**15) still fits int32; 2**17 terms wrap (past the int32-safe
    # chunk both kernels fold int32 chunk sums into int64).
    (255, 65792, 0), (255, 2**17, 16),
    # int8 -128 becomes 0 on the way into vpdpbusd; the bias carries all of 2**14 * K.
    (-128, 65792, 0), (-128, 2**17, 16), (127, 65792, 0),
])
def test_full_tiles_at_the_int32_chunk_limit(x_value, k, wraps, use_vnni):
    x = np.full((4, k), x_value, np.uint8 if x_value > 127 else np.int8)
    w = np.full((4, k), -128, np.int8)
    got = grouped_int8_gemm(x[None], w[None], use_vnni=use_vnni)
    want = int8_gemm_reference(x, w.T)
    np.testing.assert_array_equal(got.result[0], want.result)
    assert got.wrapped_count == want.wrapped_count == wraps


@pytest.mark.parametrize(
    "x, w, bias",
    [
        (np.zeros((2, 3), np.uint8), np.zeros((1, 2, 3), np.int8), None),
        (np.zeros((1, 2, 3), np.uint8), np.zeros((2, 2, 3), np.int8), None),
        (np.zeros((1, 2, 3), np.uint8), np.zeros((1, 2, 4), np.int8), None),
        (np.zeros((1, 2, 3), np.uint8), np.zeros((1, 2, 3), np.uint8), None),
        (np.zeros((2, 2, 3), np.uint8), np.zeros((2, 2, 3), np.int8), np.zeros(2, np.int32)),
    ],
)
def test_grouped_rejects_bad_operands(x, w, bias):
    with pytest.raises(ValueError):
        grouped_int8_gemm(x, w, bias=bias)


def refused_kernel(monkeypatch, kernel: str, compiles_flag: str):
    """tpusim.kernels.gemm with ``kernel`` failing as an intrinsic this LLVM rejects would, its flag still set."""
    from tpusim.kernels import gemm as gemm_module

    def refuse(*args):
        raise numba.core.errors.TypingError("intrinsic signature rejected by this LLVM")

    monkeypatch.setattr(gemm_module, kernel, refuse)
    monkeypatch.setattr(gemm_module, compiles_flag, [True])
    return gemm_module


@pytest.mark.skipif(not HAS_AVX2, reason="CPU lacks AVX2")
def test_an_avx2_kernel_that_does_not_compile_falls_back_to_the_portable_one(monkeypatch):
    gemm_module = refused_kernel(monkeypatch, "_requantized_pair_kernel", "_pairs_compile")
    rng = np.random.default_rng(6)
    x = rng.integers(0, 256, (1, 9, 70)).astype(np.uint8)
    w = rng.integers(-128, 128, (1, 16, 70)).astype(np.int8)
    m0, shift = quantize_multiplier(np.full(16, 2.0**-10))
    with pytest.warns(UserWarning, match="AVX2 int8 kernel unavailable"):
        got, wrapped = requantized_int8_gemm(x, w, None, 32, m0, shift, 0, 0, 255, np.uint8, use_vnni=False,
                                             use_avx2=True)
    want, want_wrapped = requantized_reference(x, w, None, 32, m0, shift, 0, 0, 255)
    np.testing.assert_array_equal(got, want)
    assert gemm_module._pairs_compile == [False] and wrapped == want_wrapped


@pytest.mark.parametrize("k, n, acc_bits, pairs", [(147, 16, 32, True), (9, 1000, 32, True), (64, 13, 16, True),
                                                   (64, 10, 32, False), (64, 36, 32, False), (65794, 16, 32, False)])
def test_the_avx2_kernel_is_prepared_where_whole_16_channel_tiles_fit_and_int32_sums_are_exact(k, n, acc_bits, pairs):
    def prepared(use_avx2):
        return RequantizedGemm(np.zeros((1, n, k), np.int8), None, acc_bits, np.array([2**30]), np.array([0]), 0, 0,
                               255, np.uint8, np.uint8, use_vnni=False, use_avx2=use_avx2)._pairs is not None

    assert prepared(use_avx2=True) == pairs
    assert not prepared(use_avx2=False)


def test_a_vnni_kernel_that_does_not_compile_falls_back_to_the_portable_one(monkeypatch):
    gemm_module = refused_kernel(monkeypatch, "_grouped_gemm_vnni_kernel", "_vnni_compiles")
    rng = np.random.default_rng(5)
    x = rng.integers(-128, 128, (1, 9, 70)).astype(np.int8)
    w = rng.integers(-127, 128, (1, 8, 70)).astype(np.int8)
    with pytest.warns(UserWarning, match="portable kernel"):
        got = gemm_module.grouped_int8_gemm(x, w, use_vnni=True)
    want = gemm_module.int8_gemm_reference(x[0], np.ascontiguousarray(w[0].T))
    np.testing.assert_array_equal(got.result[0], want.result)
    assert gemm_module._vnni_compiles == [False]


@pytest.mark.skipif(not amx_ready(), reason="CPU lacks AMX int8, or Linux refuses this process its tiles")
def test_the_amx_kernel_runs_where_the_cpu_has_it(monkeypatch):
    # With the VNNI broadcast kernel refused, a right answer and no warning can only come from the AMX tiles.
    gemm_module = refused_kernel(monkeypatch, "_requantized_broadcast_kernel", "_vnni_compiles")
    monkeypatch.setattr(gemm_module, "_amx_compiles", [True])
    rng = np.random.default_rng(8)
    x = rng.integers(0, 256, (1, 45, 128)).astype(np.uint8)
    w = rng.integers(-128, 128, (1, 64, 128)).astype(np.int8)
    m0, shift = quantize_multiplier(np.full(64, 2.0**-12))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got, wrapped = requantized_int8_gemm(x, w, None, 32, m0, shift, 0, 0, 255, np.uint8, use_amx=True)
    want, want_wrapped = requantized_reference(x, w, None, 32, m0, shift, 0, 0, 255)
    np.testing.assert_array_equal(got, want)
    assert wrapped == want_wrapped == 0 and gemm_module._vnni_compiles == gemm_module._amx_compiles == [True]


@pytest.mark.skipif(not amx_ready(), reason="CPU lacks AMX int8, or Linux refuses this process its tiles")
def test_an_amx_kernel_that_does_not_compile_falls_back_to_the_vnni_one(monkeypatch):
    gemm_module = refused_kernel(monkeypatch, "_requantized_amx_kernel", "_amx_compiles")
    monkeypatch.setattr(gemm_module, "_vnni_compiles", [True])
    rng = np.random.default_rng(9)
    x = rng.integers(-128, 128, (1, 40, 70)).astype(np.int8)
    w = rng.integers(-128, 128, (1, 64, 70)).astype(np.int8)
    m0, shift = quantize_multiplier(np.full(64, 2.0**-10))
    with pytest.warns(UserWarning, match="AMX int8 kernel unavailable"):
        got, wrapped = requantized_int8_gemm(x, w, None, 32, m0, shift, 0, -128, 127, np.int8, use_amx=True)
    want, want_wrapped = requantized_reference(x, w, None, 32, m0, shift, 0, -128, 127)
    np.testing.assert_array_equal(got, want)
    assert wrapped == want_wrapped and gemm_module._amx_compiles == [False] and gemm_module._vnni_compiles == [True]


@pytest.mark.parametrize("k, x_dtype, acc_bits, fits", [
    # uint8 x int8 products span -32640 .. 32385: 65793 of them fit an int32, 65794 can pass -2**31.
    (65793, np.uint8, 32, True), (65794, np.uint8, 32, False),
    # int8 x int8 span -16256 .. 16384: 131071 stay below 2**31, 131072 can reach it.
    (131071, np.int8, 32, True), (131072, np.int8, 32, False),
    # A 16-bit accumulator holds one uint8 product, not two.
    (1, np.uint8, 16, True), (2, np.uint8, 16, False),
])
def test_sums_fit_exactly_where_no_sum_can_leave_the_accumulator(k, x_dtype, acc_bits, fits):
    assert _sums_fit(np.zeros(3, np.int64), k, np.dtype(x_dtype), acc_bits, np.array([2**30])) == fits


@pytest.mark.parametrize("bias, multiplier, fits", [
    ([2**31 - 1 - 32385], [2**30], True), ([2**31 - 32385], [2**30], False),  # one uint8 x int8 product
    ([-2**31 + 32640], [2**30], True), ([-2**31 + 32639], [2**30], False),
    ([0, 5], [0, 2**31 - 1], True), ([0], [2**31], False), ([0], [-1], False),  # the multiplier must be an int32
])
def test_sums_fit_counts_the_bias_and_needs_int32_multipliers(bias, multiplier, fits):
    assert _sums_fit(np.array(bias, np.int64), 1, np.dtype(np.uint8), 32, np.array(multiplier)) == fits


@pytest.mark.parametrize("kernel", FUSED_KERNELS)
@pytest.mark.parametrize("w_value, bias, fits", [(-128, -32768, True), (-128, -32769, False),
                                                 (127, 16809727, True), (127, 16809728, False)])
def test_sums_at_the_edge_of_the_accumulator_requantize_alike_on_both_sides_of_it(kernel, w_value, bias, fits):
    # 65792 products of 255 and -128 sum to 32768 above -2**31, of 255 and 127 to 16809728 below 2**31: with
    # the bias the sums end on the accumulator's last value (the epilogue's int32 shortcut) or one past it
    # (the general epilogue, every output wrapping).
    k = 65792
    x = np.full((1, 6, k), 255, np.uint8)
    w = np.full((1, 64, k), w_value, np.int8)
    biases = np.full(64, bias, np.int32)
    m0, shift = quantize_multiplier(np.array([2.0**-24]))
    gemm = RequantizedGemm(w, biases, 32, m0, shift, 0, -128, 127, np.int8, np.uint8, **kernel)
    prepared = gemm._broadcast or gemm._pairs
    if prepared is not None:
        assert prepared[-1] == fits
    want, wrapped = requantized_reference(x, w, biases, 32, m0, shift, 0, -128, 127)
    got, got_wrapped = gemm(x)
    np.testing.assert_array_equal(got, want)
    assert got_wrapped == wrapped == (0 if fits else 6 * 64)


def requantized_reference(x, w_nk, bias, acc_bits, m0, shift, zero_point, qmin, qmax):
    """Oracle of the fused kernel: the grouped reference's accumulators, channels-last, through requantize_reference."""
    acc, wrapped = grouped_reference(x, w_nk, acc_bits, bias)
    rows = np.ascontiguousarray(acc.transpose(1, 0, 2).reshape(x.shape[1], -1)).astype(np.int32)
    return requantize_reference(rows, m0, shift, zero_point, qmin, qmax, channel_axis=-1), wrapped


@pytest.mark.parametrize("kernel", FUSED_KERNELS)
@pytest.mark.parametrize("acc_bits", [32, 16])
@pytest.mark.parametrize("groups, m, k, n", [
    (1, 8, 64, 8), (1, 13, 147, 10), (3, 9, 128, 4), (5, 7, 9, 1), (2, 70, 300, 7), (1, 6, 37, 12), (1, 97, 4608, 36),
    # Broadcast tiles (whole 64-channel tiles waste little): pixels past a 6-row strip, K and channels padded.
    (1, 70, 192, 64), (2, 13, 147, 250), (1, 301, 64, 256), (1, 6, 4608, 64),
    # vpmaddwd tiles (whole 16-channel tiles): odd K ending in a zero pair, K of one, channels padded.
    (1, 37, 147, 16), (3, 11, 9, 30), (1, 6, 1, 48), (2, 61, 10, 1000),
])
@pytest.mark.parametrize("unsigned, per_channel", [(True, True), (False, False)])
def test_requantized_kernel_equals_gemm_then_requantize(groups, m, k, n, acc_bits, kernel, unsigned, per_channel):
    rng = np.random.default_rng(groups * 1000 + m * 100 + k + n + acc_bits + unsigned)
    x = rng.integers(0, 256, (groups, m, k)).astype(np.uint8) if unsigned else \
        rng.integers(-128, 128, (groups, m, k)).astype(np.int8)
    w = rng.integers(-128, 128, (groups, n, k)).astype(np.int8)
    bias = rng.integers(-2**24, 2**24, groups * n).astype(np.int32)
    # Multipliers from 2**-20 to 4 (negative shifts too): outputs clamp at both ends as well as land inside.
    m0, shift = quantize_multiplier(2.0 ** rng.uniform(-20, 2, groups * n if per_channel else 1))
    want, wrapped = requantized_reference(x, w, bias, acc_bits, m0, shift, 3, -128, 127)
    got, got_wrapped = requantized_int8_gemm(x, w, bias, acc_bits, m0, shift, 3, -128, 127, np.int8, **kernel)
    assert got.shape == (m, groups * n) and got.dtype == np.int8
    np.testing.assert_array_equal(got, want)
    assert got_wrapped == wrapped
    if per_channel and got.size >= 500:  # multipliers spread enough that both clamps and the range between occur
        assert np.count_nonzero(got == -128) and np.count_nonzero(got == 127) and np.count_nonzero(np.abs(got) < 100)
    if acc_bits == 16:
        assert wrapped > 0


@pytest.mark.parametrize("kernel", FUSED_KERNELS)
@pytest.mark.parametrize("out_dtype, qmin, qmax", [(np.int32, -2**20, 2**20 - 1), (np.uint8, 0, 255)])
def test_the_epilogue_stores_each_output_width_whole_and_partial_vectors_alike(kernel, out_dtype, qmin, qmax):
    # 16-channel vectors and a 9-channel remainder; int32 outputs (grids wider than 8 bits) and bytes.
    rng = np.random.default_rng(17)
    x = rng.integers(0, 256, (1, 30, 128)).astype(np.uint8)
    w = rng.integers(-128, 128, (1, 57, 128)).astype(np.int8)
    bias = rng.integers(-2**20, 2**20, 57).astype(np.int32)
    m0, shift = quantize_multiplier(2.0 ** rng.uniform(-12, 4, 57))
    want, wrapped = requantized_reference(x, w, bias, 32, m0, shift, 5, qmin, qmax)
    got, got_wrapped = requantized_int8_gemm(x, w, bias, 32, m0, shift, 5, qmin, qmax, out_dtype, **kernel)
    assert got.dtype == out_dtype and got_wrapped == wrapped == 0
    np.testing.assert_array_equal(got, want)
    inside = (got > qmin) & (got < qmax)
    assert np.count_nonzero(got == qmin) and np.count_nonzero(got == qmax) and np.count_nonzero(inside)


@pytest.mark.parametrize("out_dtype, zero_point, qmin, qmax", [(np.uint8, 7, 0, 255), (np.int8, -3, -128, 127),
                                                              (np.int32, 5, -2**20, 2**20 - 1)])
def test_the_word_epilogue_equals_requantize_at_every_right_shift_it_takes(out_dtype, zero_point, qmin, qmax):
    # Right shifts 32..63 (shift 1..32), 8-channel vectors and a 5-channel tail; the sums include the int32
    # extremes, ties at both signs (with multiplier 2**30, s * 2**30 / 2**right is s / 2**(right - 30): a
    # half for s an odd multiple of 2**(right - 31)), and random sums with random multipliers.
    rng = np.random.default_rng(3)
    right = np.arange(32, 64)
    width = right.size + 5
    right = np.concatenate([right, [32, 40, 50, 60, 63]])
    rows = 6
    ties = (2 * rng.integers(-40, 40, (2, width)) + 1) << np.minimum(right - 31, 24)  # ties up to right 55
    acc = np.concatenate([ties, rng.integers(-2**31, 2**31, (2, width)),
                          np.full((1, width), -2**31), np.full((1, width), 2**31 - 1)]).astype(np.int32)[:rows]
    bias = np.zeros(width, np.int64)
    bias[::3] = rng.integers(-1000, 1000, bias[::3].size)
    acc[4:, ::3] -= np.sign(acc[4:, ::3]) * 1000  # the extremes stay int32 with their bias
    multiplier = np.where(np.arange(width) % 2 == 0, 2**30, rng.integers(2**30, 2**31, width)).astype(np.int64)
    constants = _word_constants(bias, multiplier, right)
    assert constants is not None
    half = np.int64(1) << (right - 1)
    out = np.zeros((rows, width), out_dtype)
    _finish_words_strip(acc, rows, width, *constants[:1], constants[1], constants[2], half, zero_point, qmin, qmax,
                        out, 0, 0)
    want = requantize_reference((acc + bias).astype(np.int32), multiplier, right - 31, zero_point, qmin, qmax)
    np.testing.assert_array_equal(out, want)
    assert np.count_nonzero(out[:2] != zero_point)  # the ties land on both sides, not all on zero


@pytest.mark.parametrize("right, words", [([31, 40], False), ([32, 63], True), ([40, 64], False)])
def test_word_constants_only_for_right_shifts_of_32_to_63(right, words):
    constants = _word_constants(np.zeros((1, 2), np.int64), np.full(2, 2**30, np.int64), np.array(right, np.int64))
    assert (constants is not None) == words
    if words:
        assert [c.dtype for c in constants] == [np.int32] * 3 and constants[2].tolist() == [0, 31]


@pytest.mark.skipif(not HAS_AVX2, reason="CPU lacks AVX2")
@pytest.mark.parametrize("first_shift, words", [(0, False), (1, True), (31, True)])
def test_the_avx2_kernel_takes_the_word_epilogue_where_every_shift_allows_it(first_shift, words):
    # Channel 0's multiplier is 2**30 / 2**(31 + first_shift); the others lie in [2**-6, 2**-5). Shift 0 (a
    # multiplier of 1/2, right shift 31) keeps the layer on the 64-bit epilogue; same integers either way.
    rng = np.random.default_rng(12)
    x = rng.integers(0, 256, (1, 40, 96)).astype(np.uint8)
    w = rng.integers(-128, 128, (1, 30, 96)).astype(np.int8)
    bias = rng.integers(-2**12, 2**12, 30).astype(np.int32)
    m0, shift = quantize_multiplier(2.0 ** -rng.uniform(5, 6, 30))
    m0[0], shift[0] = 2**30, first_shift
    gemm = RequantizedGemm(w, bias, 32, m0, shift, 4, 0, 255, np.uint8, np.uint8, use_vnni=False, use_avx2=True)
    assert gemm._pairs is not None and gemm._pairs[-1] and (gemm._pairs[3] is not None) == words
    want, wrapped = requantized_reference(x, w, bias, 32, m0, shift, 4, 0, 255)
    got, got_wrapped = gemm(x)
    np.testing.assert_array_equal(got, want)
    assert got_wrapped == wrapped == 0 and np.count_nonzero((got > 0) & (got < 255))


def test_requantized_kernel_rounds_half_away_from_zero_and_clamps():
    # acc = x * 1 + bias; multiplier 2**-2 (m0 = 2**30, shift 1): 6/4 -> 2, -6/4 -> -2, 5/4 -> 1, -2/4 -> -1 (ties away)
    x = np.array([[[6], [0], [5], [0], [255]]], np.uint8)
    w = np.ones((1, 1, 1), np.int8)
    bias = np.zeros(1, np.int32)
    got, wrapped = requantized_int8_gemm(x, w, bias, 32, np.array([2**30]), np.array([1]), 10, 0, 70, np.uint8)
    np.testing.assert_array_equal(got[:, 0], [12, 10, 11, 10, 70])
    got, _ = requantized_int8_gemm(-np.ones((1, 2, 1), np.int8) * np.array([6, 2], np.int8).reshape(1, 2, 1), w, bias,
                                   32, np.array([2**30]), np.array([1]), 10, 0, 70, np.uint8)
    np.testing.assert_array_equal(got[:, 0], [8, 9])
    assert wrapped == 0


@pytest.mark.parametrize("kernel", FUSED_KERNELS)
@pytest.mark.parametrize("x_value, k, wraps", [(255, 65792, 0), (255, 2**17, 64 * 6), (-128, 2**17, 64 * 6)])
def test_requantized_kernel_at_the_int32_chunk_limit(x_value, k, wraps, kernel):
    # The broadcast tile's raw int32 sums hold K * 255 * 128 exactly up to the chunk limit; past it
    # the portable kernel's int64 chunks take over and the 32-bit accumulator wraps every output.
    x = np.full((1, 6, k), x_value, np.uint8 if x_value > 127 else np.int8)
    w = np.full((1, 64, k), -128, np.int8)
    m0, shift = quantize_multiplier(np.array([2.0**-24]))
    want, wrapped = requantized_reference(x, w, None, 32, m0, shift, 0, -128, 127)
    got, got_wrapped = requantized_int8_gemm(x, w, None, 32, m0, shift, 0, -128, 127, np.int8, **kernel)
    np.testing.assert_array_equal(got, want)
    assert got_wrapped == wrapped == wraps


@pytest.mark.parametrize("kernel", FUSED_KERNELS)
def test_threads_change_no_integer(kernel):
    # Enough rows for one task per thread: the split must not change a value or the wrap count.
    rng = np.random.default_rng(11)
    x = rng.integers(0, 256, (1, 301, 256)).astype(np.uint8)
    w = rng.integers(-128, 128, (1, 64, 256)).astype(np.int8)
    m0, shift = quantize_multiplier(np.full(64, 2.0**-14))
    previous = numba.get_num_threads()
    try:
        results = []
        for threads in (1, numba.config.NUMBA_NUM_THREADS):
            numba.set_num_threads(threads)
            results.append((grouped_int8_gemm(x, w, 16, use_vnni=kernel["use_vnni"]),
                            requantized_int8_gemm(x, w, None, 16, m0, shift, 0, 0, 255, np.uint8, **kernel)))
    finally:
        numba.set_num_threads(previous)
    (plain_1, fused_1), (plain_n, fused_n) = results
    np.testing.assert_array_equal(plain_1.result, plain_n.result)
    np.testing.assert_array_equal(fused_1[0], fused_n[0])
    assert plain_1.wrapped_count == plain_n.wrapped_count == fused_1[1] == fused_n[1] > 0


@pytest.mark.parametrize("kernel", FUSED_KERNELS)
@pytest.mark.parametrize("unsigned", [True, False])
def test_a_prepared_gemm_equals_the_reference_on_activations_of_any_row_count(kernel, unsigned):
    # Built once, run on several x: M = 3 is below a broadcast strip (the 4 x 4 tile kernel takes it), the rest not.
    rng = np.random.default_rng(5 + unsigned)
    w = rng.integers(-128, 128, (1, 64, 192)).astype(np.int8)
    bias = rng.integers(-2**20, 2**20, 64).astype(np.int32)
    m0, shift = quantize_multiplier(2.0 ** rng.uniform(-16, -8, 64))
    x_dtype = np.uint8 if unsigned else np.int8
    gemm = RequantizedGemm(w, bias, 32, m0, shift, 4, 0, 255, np.uint8, x_dtype, **kernel)
    for m in (3, 6, 301, 3):
        x = rng.integers(0, 256, (1, m, 192)).astype(np.uint8) if unsigned else \
            rng.integers(-128, 128, (1, m, 192)).astype(np.int8)
        want, wrapped = requantized_reference(x, w, bias, 32, m0, shift, 4, 0, 255)
        got, got_wrapped = gemm(x)
        np.testing.assert_array_equal(got, want)
        assert got_wrapped == wrapped
        assert np.count_nonzero(got == 0) and np.count_nonzero(got == 255) and np.count_nonzero((got > 0) & (got < 255))


def test_a_prepared_gemm_rejects_activations_it_was_not_built_for():
    gemm = RequantizedGemm(np.zeros((1, 8, 64), np.int8), None, 32, np.array([2**30]), np.array([0]), 0, 0, 255,
                           np.uint8, np.uint8)
    for x in (np.zeros((1, 6, 64), np.int8), np.zeros((1, 6, 65), np.uint8), np.zeros((2, 6, 64), np.uint8)):
        with pytest.raises(ValueError, match="w_nk"):
            gemm(x)


def test_requantized_kernel_rejects_wide_accumulators_and_bad_multipliers():
    x, w = np.zeros((1, 2, 3), np.uint8), np.zeros((1, 2, 3), np.int8)
    with pytest.raises(ValueError, match="int32"):
        requantized_int8_gemm(x, w, None, 40, np.array([2**30]), np.array([0]), 0, 0, 255, np.uint8)
    with pytest.raises(ValueError, match="entries"):
        requantized_int8_gemm(x, w, None, 32, np.array([2**30] * 3), np.array([0] * 3), 0, 0, 255, np.uint8)


@pytest.mark.parametrize("k, n, acc_bits, depth", [(147, 64, 32, 192), (576, 64, 32, 576), (37, 64, 32, 64),
                                                   (30, 64, 32, 30),
                                                   (147, 2, 32, 147), (147, 64, 40, 147)])
def test_vnni_depth_is_the_padded_k_only_where_the_vnni_kernel_runs(k, n, acc_bits, depth):
    assert vnni_depth(k, n, acc_bits, use_vnni=True) == depth
    assert vnni_depth(k, n, acc_bits, use_vnni=False) == k


@njit(nogil=True)
def _count_runs(runs, counters):
    task = claim_task(counters)
    while task < runs.size:
        runs[task] += 1
        finish_task(counters)
        task = claim_task(counters)


@pytest.mark.parametrize("tasks", [0, 1, 7, 1000])
def test_every_task_runs_exactly_once(tasks):
    previous = numba.get_num_threads()
    try:
        for threads in sorted({1, numba.config.NUMBA_NUM_THREADS}):
            numba.set_num_threads(threads)
            for _ in range(20):  # helpers waking late, early or not at all
                runs = np.zeros(tasks, np.int64)
                run_tasks(_count_runs, tasks, runs)
                np.testing.assert_array_equal(runs, np.ones(tasks, np.int64))
    finally:
        numba.set_num_threads(previous)


@pytest.mark.parametrize("kernel", FUSED_KERNELS)
def test_broadcast_tasks_split_both_rows_and_weight_panels(kernel):
    # K = 4608 holds four 16-channel vectors per L2 panel, so 192 channels are three panels; on two or
    # more threads the 150 rows are cut into chunks too. Every (panel, chunk) task must land in place.
    rng = np.random.default_rng(13)
    x = rng.integers(0, 256, (1, 150, 4608)).astype(np.uint8)
    w = rng.integers(-128, 128, (1, 192, 4608)).astype(np.int8)
    bias = rng.integers(-2**20, 2**20, 192).astype(np.int32)
    m0, shift = quantize_multiplier(2.0 ** rng.uniform(-16, -10, 192))
    want, wrapped = requantized_reference(x, w, bias, 32, m0, shift, 5, 0, 255)
    previous = numba.get_num_threads()
    try:
        for threads in sorted({1, numba.config.NUMBA_NUM_THREADS}):
            numba.set_num_threads(threads)
            got, got_wrapped = requantized_int8_gemm(x, w, bias, 32, m0, shift, 5, 0, 255, np.uint8, **kernel)
            np.testing.assert_array_equal(got, want)
            assert got_wrapped == wrapped
    finally:
        numba.set_num_threads(previous)
    assert np.count_nonzero(want == 0) and np.count_nonzero(want == 255) and np.count_nonzero((want > 0) & (want < 255))


@njit(nogil=True)
def _first_task_waits_for_the_second(seen, polls, counters):
    # task 0 (the caller's: it claims first) polls until another thread has claimed task 1, up to polls times
    task = claim_task(counters)
    while task < 2:
        if task == 0:
            for _ in range(polls):
                if _load_value(counters, 0) >= 2:
                    seen[0] = 1
                    break
        finish_task(counters)
        task = claim_task(counters)


@pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="one CPU: no helper threads")
def test_a_helper_joins_each_of_many_jobs_in_a_row():
    # a job posted while a helper polls or sleeps: either way it takes the other task while the caller waits in
    # the first (up to about a second: a helper the OS runs late still counts)
    previous = numba.get_num_threads()
    try:
        numba.set_num_threads(2)
        joined = []
        for _ in range(50):
            seen = np.zeros(1, np.int64)
            run_tasks(_first_task_waits_for_the_second, 2, seen, 10**9)
            joined.append(int(seen[0]))
        assert joined == [1] * 50
    finally:
        numba.set_num_threads(previous)


@pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="one CPU: no helper threads")
def test_helpers_sleep_once_jobs_stop_coming():
    previous = numba.get_num_threads()
    try:
        numba.set_num_threads(2)
        for _ in range(20):
            run_tasks(_count_runs, 100, np.zeros(100, np.int64))
        time.sleep(0.05)  # far past the polling
        cpu, wall = time.process_time(), time.perf_counter()
        time.sleep(0.2)
        assert time.process_time() - cpu < 0.02 * (time.perf_counter() - wall) + 0.002
    finally:
        numba.set_num_threads(previous)


def test_a_helper_takes_a_posted_job_once_its_caller_has_claimed_a_task_and_some_are_left():
    from tpusim.kernels.gemm import _await_job

    counters, inside = np.zeros((4, 2), np.int64), np.array([0, 1, 0, 0], np.int64)
    posted = np.array([7, 2, 10, 1], np.int64)  # job 7, in slot 2, of 10 tasks, one helper wanted
    assert _await_job(posted, counters.reshape(-1), inside, 0, 1, 6, 100) == (False, 6)  # the caller not in it yet
    assert list(inside) == [0, 0, 0, 0]  # (counted out of slot 1's job first)
    counters[2] = (3, 1)
    assert _await_job(posted, counters.reshape(-1), inside, 0, -1, 6, 100) == (True, 7)
    assert _await_job(posted, counters.reshape(-1), inside, 1, -1, 6, 100) == (False, 7)  # a second helper: unwanted
    counters[2] = (10, 4)
    assert _await_job(posted, counters.reshape(-1), inside, 0, -1, 6, 100) == (False, 7)  # every task claimed


def test_a_slot_is_not_taken_while_its_caller_or_a_helper_is_in_its_job():
    from tpusim.kernels.gemm import _SLOTS, _Helpers

    helpers = _Helpers()
    first = helpers.take_slot()
    helpers.counters[first] = (5, 3)
    helpers.stop(first)  # its caller is done...
    helpers.inside[first] = 1  # ...but a helper is still in the job (it may yet claim from these counters)
    others = [helpers.take_slot() for _ in range(_SLOTS - 1)]  # callers on other threads, each still in its job
    assert first not in others and len(set(others)) == _SLOTS - 1
    assert helpers.take_slot() is None  # (run_tasks then runs the job on the caller alone)
    for slot in others:
        helpers.stop(slot)
    helpers.inside[first] = 0
    again = []
    for _ in range(_SLOTS):
        again.append(helpers.take_slot())
        helpers.stop(again[-1])
    assert sorted(again) == list(range(_SLOTS)) and list(helpers.counters[first]) == [0, 0]


@pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="one CPU: no helper threads")
def test_callers_on_several_threads_at_once_each_get_every_task_done_once():
    # each thread's jobs have counters of their own, however many jobs the others post meanwhile
    previous = numba.get_num_threads()
    failures = []

    def calls(tasks):
        numba.set_num_threads(2)  # (this thread's own setting)
        for _ in range(300):
            runs = np.zeros(tasks, np.int64)
            run_tasks(_count_runs, tasks, runs)
            if not (runs == 1).all():
                failures.append(tasks)

    try:
        callers = [threading.Thread(target=calls, args=(tasks,), daemon=True) for tasks in (7, 37, 53, 64)]
        for caller in callers:
            caller.start()
        deadline = time.monotonic() + 60
        for caller in callers:
            caller.join(timeout=max(0.0, deadline - time.monotonic()))  # a lost task leaves its caller waiting
        assert not any(caller.is_alive() for caller in callers) and failures == []
    finally:
        numba.set_num_threads(previous)


@njit(nogil=True)
def _fail_on_task(bad, runs, counters):
    task = claim_task(counters)
    while task < runs.size:
        if task == bad:
            raise ValueError("task failed")
        runs[task] += 1
        finish_task(counters)
        task = claim_task(counters)


@pytest.mark.parametrize("bad", [0, 1, 5])
def test_a_task_that_raises_on_any_thread_raises_in_the_caller_instead_of_hanging(bad):
    raised = []

    def attempts():
        numba.set_num_threads(min(2, numba.config.NUMBA_NUM_THREADS))  # (this thread's own setting)
        for _ in range(20):  # on either thread: whichever claims the bad task
            try:
                run_tasks(_fail_on_task, 8, bad, np.zeros(8, np.int64))
            except ValueError as exc:
                raised.append(str(exc))

    caller = threading.Thread(target=attempts, daemon=True)  # a caller left waiting must fail the test, not hang it
    caller.start()
    caller.join(timeout=60)
    assert not caller.is_alive() and raised == ["task failed"] * 20


def test_thread_count_is_numbas_count_for_each_thread_as_set():
    seen = {}

    def on_a_new_thread():
        seen["default"] = (thread_count(), numba.get_num_threads())
        numba.set_num_threads(1)
        seen["one"] = (thread_count(), numba.get_num_threads())

    previous = numba.get_num_threads()
    try:
        numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
        assert thread_count() == numba.get_num_threads() == numba.config.NUMBA_NUM_THREADS
        other = threading.Thread(target=on_a_new_thread)
        other.start()
        other.join()
        assert seen == {"default": (numba.config.NUMBA_NUM_THREADS,) * 2, "one": (1, 1)}
        assert thread_count() == numba.config.NUMBA_NUM_THREADS  # the other thread's setting was its own
        numba.set_num_threads(1)
        assert thread_count() == 1
    finally:
        numba.set_num_threads(previous)


@pytest.mark.parametrize("groups, channels, k, k_padded", [(1, 64, 64, 64), (1, 3, 27, 64), (2, 70, 130, 192),
                                                           (8, 1, 9, 64)])
def test_packed_weights_are_the_numpy_packing(groups, channels, k, k_padded):
    w_nk = np.random.default_rng(channels).integers(-128, 128, (groups, channels, k)).astype(np.int8)
    from tpusim.kernels import gemm

    packed, shift = gemm._broadcast_operands(w_nk, k_padded)
    np.testing.assert_array_equal(packed, gemm.pack_broadcast_weights_reference(w_nk, k_padded))
    np.testing.assert_array_equal(shift, -128 * w_nk.astype(np.int64).sum(axis=2))
