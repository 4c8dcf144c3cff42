"""The rounding of requantization, in one place for every kernel that requantizes an accumulator
(:mod:`tpusim.quant.fixed_point`, the fused GEMMs of :mod:`tpusim.kernels.gemm`, the depthwise conv), and the
per-channel constants those kernels take."""
from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True)
def requantize_value(value, multiplier, right, half, zero_point, qmin, qmax):
    """One accumulator requantized: round(value * multiplier / 2**right), half away from zero without a branch
    (for p < 0, -floor((|p| + h) / n) = floor((p + h - 1) / n) with n = 2**right, h = n / 2; right >= 1), plus
    the zero point, clamped."""
    product = np.int64(value) * multiplier
    rounded = (product + half + (product >> 63)) >> right
    return min(max(rounded + zero_point, qmin), qmax)


def requantize_constants(m0: np.ndarray, shift: np.ndarray,
                         channels: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per output channel, as int64 arrays: the multiplier, the right shift 31 + shift and half its weight (the
    rounding term), from one (m0, shift) pair for all channels or one per channel."""
    multiplier = np.ascontiguousarray(np.broadcast_to(np.asarray(m0, np.int64).reshape(-1), channels))
    right = np.ascontiguousarray(31 + np.broadcast_to(np.asarray(shift, np.int64).reshape(-1), channels))
    return multiplier, right, np.int64(1) << (right - 1)
