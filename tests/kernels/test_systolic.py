import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tpusim.kernels.gemm import int8_gemm, int8_gemm_reference
from tpusim.kernels.systolic import (
    pe_array_reference,
    pe_array_run,
    pe_gemm,
    stream_starts,
    tile_sequence_cycles,
)

FAST = settings(derandomize=True, max_examples=40, deadline=None)


def random_x(rng, m, k, unsigned=False):
    if unsigned:
        return rng.integers(0, 256, (m, k)).astype(np.uint8)
    return rng.integers(-128, 128, (m, k)).astype(np.int8)


def random_w(rng, k, n):
    return rng.integers(-128, 128, (k, n)).astype(np.int8)


def random_tiles(rng, n_tiles, rows, cols, m_rows=None):
    x_tiles, w_tiles = [], []
    for _ in range(n_tiles):
        m = m_rows or int(rng.integers(1, 12))
        k, n = int(rng.integers(1, rows + 1)), int(rng.integers(1, cols + 1))
        x_tiles.append(random_x(rng, m, k, unsigned=bool(rng.integers(2))))
        w_tiles.append(random_w(rng, k, n))
    return x_tiles, w_tiles


def expected_outputs(x, w, cols):
    out = np.zeros((x.shape[0], cols), np.int64)
    out[:, : w.shape[1]] = x.astype(np.int64) @ w.astype(np.int64)
    return out


# --- closed form --------------------------------------------------------------------------


def test_closed_form_hand_values():
    assert tile_sequence_cycles(256, 1, 256, 256) == 256 + 766
    assert tile_sequence_cycles(1, 1, 1, 1) == 1 + 1
    # M < R: each further tile waits for its R-cycle shift
    assert tile_sequence_cycles(10, 3, 4, 5) == 4 + 2 * 10 + 17
    assert tile_sequence_cycles(2, 3, 4, 5) == 4 + 2 * 4 + 9
    assert list(stream_starts([2, 9, 1], 4)) == [4, 8, 17]
    with pytest.raises(ValueError):
        tile_sequence_cycles(0, 1, 4, 4)


def test_closed_form_without_double_buffering_hand_values():
    # every fold shifts (R), streams and drains (M + R + C - 2) alone: 2R + C + M - 2
    assert tile_sequence_cycles(10, 3, 4, 5, weight_double_buffering=False) == 3 * (8 + 5 + 10 - 2)
    assert tile_sequence_cycles(49, 2, 256, 256, weight_double_buffering=False) == 2 * 815
    # one tile: nothing to overlap, both modes agree
    assert tile_sequence_cycles(7, 1, 4, 5, weight_double_buffering=False) == tile_sequence_cycles(7, 1, 4, 5)
    assert list(stream_starts([2, 9, 1], 4, 5, weight_double_buffering=False)) == [4, 4 + 2 + 11, 17 + 9 + 11]
    with pytest.raises(ValueError):
        stream_starts([2], 4, weight_double_buffering=False)


# --- the fast kernel against the register-transfer reference ---------------------------------


@FAST
@given(st.integers(1, 7), st.integers(1, 7), st.integers(1, 4), st.booleans(), st.integers(0, 2**32 - 1))
def test_kernel_equals_register_transfer_reference(rows, cols, n_tiles, double_buffered, seed):
    rng = np.random.default_rng(seed)
    x_tiles, w_tiles = random_tiles(rng, n_tiles, rows, cols)
    fast = pe_array_run(x_tiles, w_tiles, rows, cols, weight_double_buffering=double_buffered)
    slow = pe_array_reference(x_tiles, w_tiles, rows, cols, weight_double_buffering=double_buffered)
    assert fast.cycles == slow.cycles
    assert fast.stream_starts == slow.stream_starts
    for got, want, x, w in zip(fast.outputs, slow.outputs, x_tiles, w_tiles):
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(got, expected_outputs(x, w, cols))


@pytest.mark.parametrize("double_buffered", [True, False])
def test_reference_16x16_with_mixed_tiles(double_buffered):
    rng = np.random.default_rng(3)
    x_tiles, w_tiles = random_tiles(rng, 3, 16, 16)
    x_tiles.append(random_x(rng, 20, 16))
    w_tiles.append(random_w(rng, 16, 16))
    fast = pe_array_run(x_tiles, w_tiles, 16, 16, weight_double_buffering=double_buffered)
    slow = pe_array_reference(x_tiles, w_tiles, 16, 16, weight_double_buffering=double_buffered)
    assert (fast.cycles, fast.stream_starts) == (slow.cycles, slow.stream_starts)
    for got, want in zip(fast.outputs, slow.outputs):
        np.testing.assert_array_equal(got, want)


def test_reference_without_double_buffering_runs_each_fold_alone():
    # 24x20 array, tiles of 30, 3 and 21 rows: the second and third wait for the previous drain
    rng = np.random.default_rng(8)
    x_tiles = [random_x(rng, 30, 24), random_x(rng, 3, 17), random_x(rng, 21, 24)]
    w_tiles = [random_w(rng, 24, 20), random_w(rng, 17, 9), random_w(rng, 24, 20)]
    slow = pe_array_reference(x_tiles, w_tiles, 24, 20, weight_double_buffering=False)
    assert slow.stream_starts == (24, 24 + 30 + 66, 120 + 3 + 66)
    assert slow.cycles == (30 + 66) + (3 + 66) + (21 + 66)
    for got, x, w in zip(slow.outputs, x_tiles, w_tiles):
        np.testing.assert_array_equal(got, expected_outputs(x, w, 20))


# --- timing contract --------------------------------------------------------------------------


@FAST
@given(st.integers(1, 40), st.integers(1, 40), st.integers(1, 40))
def test_one_tile_takes_m_plus_r_plus_c_minus_2_from_first_input_to_last_output(m, rows, cols):
    rng = np.random.default_rng(m * rows * cols)
    x, w = random_x(rng, m, rows), random_w(rng, rows, cols)
    run = pe_array_run([x], [w], rows, cols)
    assert run.stream_starts == (rows,)  # the first shift is exposed
    assert run.cycles - run.stream_starts[0] == m + rows + cols - 2
    assert run.cycles == tile_sequence_cycles(m, 1, rows, cols)


@FAST
@given(st.integers(1, 300), st.integers(1, 6), st.integers(1, 64), st.integers(1, 64), st.integers(0, 2**32 - 1))
def test_tile_sequence_formula_equals_stepped_kernel(m, n_tiles, rows, cols, seed):
    rng = np.random.default_rng(seed)
    x_tiles, w_tiles = random_tiles(rng, n_tiles, rows, cols, m_rows=m)
    run = pe_array_run(x_tiles, w_tiles, rows, cols)
    assert run.cycles == tile_sequence_cycles(m, n_tiles, rows, cols)
    assert run.stream_starts == tuple(rows + i * max(m, rows) for i in range(n_tiles))
    for got, x, w in zip(run.outputs, x_tiles, w_tiles):
        np.testing.assert_array_equal(got, expected_outputs(x, w, cols))


@FAST
@given(st.lists(st.integers(1, 300), min_size=1, max_size=5), st.integers(1, 64), st.integers(1, 64),
       st.integers(0, 2**32 - 1))
def test_without_double_buffering_each_fold_takes_2r_plus_c_plus_m_minus_2(m_rows, rows, cols, seed):
    rng = np.random.default_rng(seed)
    x_tiles, w_tiles = [], []
    for m in m_rows:
        tiles = random_tiles(rng, 1, rows, cols, m_rows=m)
        x_tiles += tiles[0]
        w_tiles += tiles[1]
    run = pe_array_run(x_tiles, w_tiles, rows, cols, weight_double_buffering=False)
    assert run.cycles == sum(2 * rows + cols + m - 2 for m in m_rows)
    assert run.stream_starts == tuple(stream_starts(m_rows, rows, cols, weight_double_buffering=False))
    if len(set(m_rows)) == 1:
        assert run.cycles == tile_sequence_cycles(m_rows[0], len(m_rows), rows, cols, weight_double_buffering=False)
    for got, x, w in zip(run.outputs, x_tiles, w_tiles):
        np.testing.assert_array_equal(got, expected_outputs(x, w, cols))


def test_256x256_tile_sequence_back_to_back():
    rng = np.random.default_rng(11)
    x_tiles, w_tiles = random_tiles(rng, 3, 256, 256, m_rows=300)
    run = pe_array_run(x_tiles, w_tiles, 256, 256)
    assert run.cycles == 256 + 2 * 300 + (300 + 510)
    for got, x, w in zip(run.outputs, x_tiles, w_tiles):
        np.testing.assert_array_equal(got, expected_outputs(x, w, 256))


# --- whole GEMMs --------------------------------------------------------------------------------


def check_pe_gemm(x, w, rows, cols, acc_bits=32, bias=None, double_buffered=True):
    got = pe_gemm(x, w, rows, cols, acc_bits, bias, weight_double_buffering=double_buffered)
    want = int8_gemm_reference(x, w, acc_bits, bias)
    fast = int8_gemm(x, w, acc_bits, bias)
    assert got.result.dtype == want.result.dtype
    np.testing.assert_array_equal(got.result, want.result)
    np.testing.assert_array_equal(got.result, fast.result)
    assert got.wrapped_count == want.wrapped_count == fast.wrapped_count
    n_tiles = -(-x.shape[1] // rows) * -(-w.shape[1] // cols)
    assert got.cycles == tile_sequence_cycles(x.shape[0], n_tiles, rows, cols, weight_double_buffering=double_buffered)
    return got


@FAST
@given(
    st.integers(1, 8), st.integers(1, 8), st.integers(1, 30), st.integers(1, 40), st.integers(1, 20),
    st.booleans(), st.booleans(), st.booleans(), st.integers(0, 2**32 - 1),
)
def test_pe_gemm_tiny_arrays_equal_oracle(rows, cols, m, k, n, unsigned, with_bias, double_buffered, seed):
    rng = np.random.default_rng(seed)
    bias = rng.integers(-2**31, 2**31, n).astype(np.int32) if with_bias else None
    check_pe_gemm(random_x(rng, m, k, unsigned), random_w(rng, k, n), rows, cols, bias=bias,
                  double_buffered=double_buffered)


@pytest.mark.parametrize("rows, cols", [(16, 16), (32, 32), (16, 32)])
@pytest.mark.parametrize("m, k, n", [(1, 1, 1), (1, 70, 40), (37, 100, 33), (64, 16, 16), (5, 97, 65)])
def test_pe_gemm_equals_oracle(rows, cols, m, k, n):
    rng = np.random.default_rng(m + k + n + rows)
    check_pe_gemm(random_x(rng, m, k, unsigned=m % 2 == 1), random_w(rng, k, n), rows, cols)


def test_pe_gemm_256x256_without_double_buffering():
    # a ResNet-50 7x7 layer's shape in miniature: 2 K folds x 2 column blocks, each fold alone
    rng = np.random.default_rng(12)
    got = check_pe_gemm(random_x(rng, 49, 300, unsigned=True), random_w(rng, 300, 300), 256, 256,
                        double_buffered=False)
    assert got.cycles == 4 * (2 * 256 + 256 + 49 - 2)


def test_pe_gemm_worst_case_values():
    x = np.full((5, 40), -128, np.int8)
    w = np.full((40, 20), -128, np.int8)
    got = check_pe_gemm(x, w, 16, 16)
    assert np.all(got.result == 40 * 16384)


def test_pe_gemm_wraps_a_16_bit_accumulator_like_the_oracle():
    rng = np.random.default_rng(5)
    got = check_pe_gemm(random_x(rng, 23, 90, unsigned=True), random_w(rng, 90, 21), 8, 8, acc_bits=16)
    assert 0 < got.wrapped_count < 23 * 21


def test_pe_gemm_wraps_int32_over_many_k_folds():
    # 2**17 products of (-128) * (-128) sum to 2**31: the 32-bit accumulators wrap to -2**31
    x = np.full((1, 2**17), -128, np.int8)
    w = np.full((2**17, 2), -128, np.int8)
    w[0, 1] = 0
    got = pe_gemm(x, w, 256, 2)
    np.testing.assert_array_equal(got.result, [[-2**31, 2**31 - 2**14]])
    assert got.wrapped_count == 1
    assert got.cycles == tile_sequence_cycles(1, 2**17 // 256, 256, 2)


def test_rejects_tiles_that_do_not_fit():
    x, w = np.zeros((2, 5), np.int8), np.zeros((5, 3), np.int8)
    with pytest.raises(ValueError):
        pe_array_run([x], [w], 4, 4)
    with pytest.raises(ValueError):
        pe_array_run([x], [], 8, 8)
    with pytest.raises(ValueError):
        pe_gemm(x, w, 0, 4)
