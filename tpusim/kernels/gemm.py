"""int8 x int8 GEMM with a finite-width two's-complement accumulator.

This is the functional model of the matrix unit's arithmetic: 8-bit operands (activations
signed or unsigned, weights signed), exact products, sums wrapped modulo ``2**acc_bits`` as
the TPU's 32-bit accumulators would. ``int8_gemm`` is the fast Numba kernel;
``int8_gemm_reference`` is the naive numpy oracle it is tested against.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numba import njit

# |uint8 x int8| <= 255 * 128, so this many products always fit an int32 partial sum.
_INT32_SAFE_TERMS = (2**31 - 1) // (255 * 128)
_ROW_BLOCK = 4  # rows of x sharing one pass over w: w stays in L1, four accumulator rows in flight


class GemmResult(NamedTuple):
    """Accumulator contents after the GEMM, and how many of them wrapped."""

    result: np.ndarray  # (M, N), int32 when acc_bits <= 32 else int64
    wrapped_count: int  # outputs whose exact sum lies outside the acc_bits range


def check_operands(x: np.ndarray, w: np.ndarray, bias: np.ndarray | None, acc_bits: int) -> None:
    """Raise ValueError unless x is (M,K) int8/uint8, w is (K,N) int8, bias is (N,) int32."""
    if x.ndim != 2 or x.dtype not in (np.int8, np.uint8):
        raise ValueError(f"x must be a 2-D int8 or uint8 array, got {x.dtype} {x.shape}")
    if w.ndim != 2 or w.dtype != np.int8:
        raise ValueError(f"w must be a 2-D int8 array, got {w.dtype} {w.shape}")
    if x.shape[1] != w.shape[0]:
        raise ValueError(f"inner dimensions differ: x {x.shape} vs w {w.shape}")
    if bias is not None and (bias.dtype != np.int32 or bias.shape != (w.shape[1],)):
        raise ValueError(f"bias must be int32 of shape ({w.shape[1]},), got {bias.dtype} {bias.shape}")
    if not 2 <= acc_bits <= 64:
        raise ValueError(f"acc_bits must be in [2, 64], got {acc_bits}")


def result_dtype(acc_bits: int) -> type[np.signedinteger]:
    return np.int32 if acc_bits <= 32 else np.int64


@njit(cache=True)
def wrap_to_bits(value: np.int64, acc_bits: int) -> np.int64:
    """Two's-complement wrap of an int64 to acc_bits (the accumulator's modulo arithmetic)."""
    if acc_bits >= 64:
        return value
    half = np.int64(1) << (acc_bits - 1)
    mask = (np.int64(1) << acc_bits) - 1
    return ((value + half) & mask) - half


@njit(cache=True)
def _gemm_kernel(x, w32, bias64, acc_bits, out):
    """out = wrap(x @ w + bias); returns the number of wrapped outputs.

    x is zero-padded to a multiple of four rows, taken four at a time: each row of w is loaded
    once per block and added, scaled, into four int32 row buffers (vectorised along N; the
    kernel hard-codes _ROW_BLOCK = 4 buffers). int32 is exact for up to
    _INT32_SAFE_TERMS products, so K is cut into chunks of that length and each chunk's sums
    are folded into int64 row buffers, which hold the exact sum used to detect wrapping.
    """
    k_total = x.shape[1]
    m_total, n_total = out.shape
    p0 = np.zeros(n_total, np.int32)
    p1 = np.zeros(n_total, np.int32)
    p2 = np.zeros(n_total, np.int32)
    p3 = np.zeros(n_total, np.int32)
    exact = np.zeros((_ROW_BLOCK, n_total), np.int64)
    wrapped = 0
    for m0 in range(0, m_total, _ROW_BLOCK):
        rows_here = min(_ROW_BLOCK, m_total - m0)
        for i in range(_ROW_BLOCK):
            for n in range(n_total):
                exact[i, n] = bias64[n]
        for k0 in range(0, k_total, _INT32_SAFE_TERMS):
            p0[:] = 0
            p1[:] = 0
            p2[:] = 0
            p3[:] = 0
            for k in range(k0, min(k0 + _INT32_SAFE_TERMS, k_total)):
                a0 = np.int32(x[m0, k])
                a1 = np.int32(x[m0 + 1, k])
                a2 = np.int32(x[m0 + 2, k])
                a3 = np.int32(x[m0 + 3, k])
                for n in range(n_total):
                    wv = w32[k, n]
                    p0[n] += a0 * wv
                    p1[n] += a1 * wv
                    p2[n] += a2 * wv
                    p3[n] += a3 * wv
            for n in range(n_total):
                exact[0, n] += p0[n]
                exact[1, n] += p1[n]
                exact[2, n] += p2[n]
                exact[3, n] += p3[n]
        for i in range(rows_here):
            out_row = out[m0 + i]
            exact_row = exact[i]
            for n in range(n_total):
                stored = wrap_to_bits(exact_row[n], acc_bits)
                wrapped += stored != exact_row[n]
                out_row[n] = stored
    return wrapped


def int8_gemm(x: np.ndarray, w: np.ndarray, acc_bits: int = 32, bias: np.ndarray | None = None) -> GemmResult:
    """x (M,K) int8/uint8 times w (K,N) int8, plus optional int32 bias, in an acc_bits accumulator."""
    check_operands(x, w, bias, acc_bits)
    n_total = w.shape[1]
    bias64 = np.zeros(n_total, np.int64) if bias is None else bias.astype(np.int64)
    out = np.empty((x.shape[0], n_total), result_dtype(acc_bits))
    m_total = x.shape[0]
    x_padded = np.zeros((-(-m_total // _ROW_BLOCK) * _ROW_BLOCK, x.shape[1]), x.dtype)
    x_padded[:m_total] = x
    wrapped = _gemm_kernel(x_padded, np.ascontiguousarray(w, dtype=np.int32), bias64, acc_bits, out)
    return GemmResult(out, int(wrapped))


def wrap_reference(exact: np.ndarray, acc_bits: int) -> np.ndarray:
    """numpy oracle of the accumulator wrap: int64 -> acc_bits two's complement."""
    if acc_bits == 64:
        return exact.copy()
    modulus = 1 << acc_bits
    half = 1 << (acc_bits - 1)
    shifted = exact.astype(object) + half  # python ints: no int64 overflow near acc_bits = 63
    return np.array(shifted % modulus - half, dtype=np.int64).reshape(exact.shape)


def int8_gemm_reference(x: np.ndarray, w: np.ndarray, acc_bits: int = 32, bias: np.ndarray | None = None) -> GemmResult:
    """Naive oracle: exact int64 matmul, then wrap and count."""
    check_operands(x, w, bias, acc_bits)
    exact = x.astype(np.int64) @ w.astype(np.int64)
    if bias is not None:
        exact = exact + bias.astype(np.int64)
    stored = wrap_reference(exact, acc_bits)
    return GemmResult(stored.astype(result_dtype(acc_bits)), int(np.count_nonzero(stored != exact)))
