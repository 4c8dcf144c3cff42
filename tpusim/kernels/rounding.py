"""The rounding of requantization, in one place for every kernel that requantizes an accumulator
(:mod:`tpusim.quant.fixed_point`, the fused GEMMs of :mod:`tpusim.kernels.gemm`, the depthwise conv)."""
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
