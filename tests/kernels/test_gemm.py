import numpy as np
import pytest

from tpusim.kernels.gemm import int8_gemm, int8_gemm_reference, wrap_reference, wrap_to_bits


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
