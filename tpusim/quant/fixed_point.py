"""Integer-only requantization of int32 accumulators (dyadic multipliers, gemmlowp style).

A real multiplier ``M = s_w * s_x / s_y`` is represented as ``M ~= m0 * 2**(-31 - shift)`` with
``m0`` in [2**30, 2**31) (a Q0.31 fraction in [0.5, 1)), so the activation unit needs one 32x32-bit
multiply and one rounding right shift by ``31 + shift`` per value. The relative error of ``m0``
is at most 2**-31, so for ``M < 1`` the product ``acc * M`` moves by less than 1 and the result
differs from ``round(acc * M)`` by at most one LSB.

Rounding is a single int64 rounding shift, round half away from zero:
``sign(p) * ((|p| + 2**(r - 1)) >> r)`` with ``p = acc * m0`` and ``r = 31 + shift``. (ONNX
Runtime's float requantization rounds half to even; the two only disagree on exact ties.)
The result plus the output zero point saturates to [qmin, qmax]; a fused ReLU or ReLU6 is just a
tighter [qmin, qmax] chosen by the caller.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from tpusim.kernels.rounding import requantize_constants, requantize_value
from tpusim.quant.arithmetic import storage_dtype

# Total right shift 31 + shift must stay in [1, 63]: at least one bit so the rounding term is an
# integer, at most 63 so that |acc * m0| + 2**62 still fits an int64.
MIN_SHIFT = -30
MAX_SHIFT = 32
_MULTIPLIER_LIMIT = 2.0**30
# Below this every int32 accumulator (|acc| <= 2**31) times the multiplier rounds to 0.
_NEGLIGIBLE_MULTIPLIER = 2.0**-33


class MultiplierRangeError(ValueError):
    """A requantization multiplier that no (m0, shift) pair holds: the model's values are absurd."""


def quantize_multiplier(real: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(m0, shift) int32 arrays with ``real ~= m0 * 2**(-31 - shift)``, m0 in [2**30, 2**31).

    ``shift`` is negative for multipliers >= 1. Multipliers below 2**-33 (including 0) give
    ``m0 = 0, shift = 0``: they map every int32 accumulator to 0 anyway. Multipliers must be
    finite, non-negative and below 2**30.
    """
    real = np.asarray(real, dtype=np.float64)
    if not np.all(np.isfinite(real)) or np.any(real < 0) or np.any(real >= _MULTIPLIER_LIMIT):
        bad = real[~(np.isfinite(real) & (real >= 0) & (real < _MULTIPLIER_LIMIT))].reshape(-1)
        raise MultiplierRangeError(f"requantization multipliers must be finite and in [0, 2**30), got {bad[0]:.3g}")
    fraction, exponent = np.frexp(real)
    m0 = np.rint(np.ldexp(fraction, 31)).astype(np.int64)
    carried = m0 == (1 << 31)
    m0 = np.where(carried, 1 << 30, m0)
    exponent = exponent + carried
    negligible = real < _NEGLIGIBLE_MULTIPLIER
    m0 = np.where(negligible, 0, m0)
    shift = np.where(negligible, 0, -exponent)
    return m0.astype(np.int32), shift.astype(np.int32)


def multiplier_value(m0: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """The real multiplier ``m0 * 2**(-31 - shift)`` that a (m0, shift) pair represents (exact)."""
    return np.ldexp(np.asarray(m0, dtype=np.float64), -31 - np.asarray(shift, dtype=np.int64))


@njit(cache=True)
def _requantize_kernel(acc, multiplier, right, half, zero_point, qmin, qmax, out):
    """acc, out: (outer, channels, inner) C-contiguous; multiplier, right, half: one entry per channel.
    Every inner loop runs from 0 over a contiguous row, which LLVM vectorises: along the channels when
    they are the last axis (inner == 1, a GEMM's output), else along each channel's run."""
    outer, channels, inner = acc.shape
    if inner == 1:
        rows, targets = acc.reshape(outer, channels), out.reshape(outer, channels)
        for o in range(outer):
            src, dst = rows[o], targets[o]
            for c in range(channels):
                dst[c] = requantize_value(src[c], multiplier[c], right[c], half[c], zero_point, qmin, qmax)
        return
    for o in range(outer):
        for c in range(channels):
            src, dst = acc[o, c], out[o, c]
            m, r, h = multiplier[c], right[c], half[c]
            for i in range(inner):
                dst[i] = requantize_value(src[i], m, r, h, zero_point, qmin, qmax)


def _validated(acc, m0, shift, zero_point, qmin, qmax, channel_axis):
    acc = np.asarray(acc)
    if acc.dtype != np.int32:
        raise TypeError(f"accumulators must be int32, got {acc.dtype}")
    if acc.ndim == 0:
        raise ValueError("accumulators must have at least one dimension")
    axis = channel_axis % acc.ndim
    channels = acc.shape[axis]
    m0 = np.ascontiguousarray(np.asarray(m0, dtype=np.int32).reshape(-1))
    shift = np.ascontiguousarray(np.asarray(shift, dtype=np.int32).reshape(-1))
    if m0.shape != shift.shape or m0.size not in (1, channels):
        raise ValueError(f"m0 {m0.shape} and shift {shift.shape} must have 1 or {channels} entries")
    if np.any(m0 < 0) or np.any(shift < MIN_SHIFT) or np.any(shift > MAX_SHIFT):
        raise ValueError(f"m0 must be >= 0 and shift in [{MIN_SHIFT}, {MAX_SHIFT}]")
    if not qmin <= zero_point <= qmax:
        raise ValueError(f"zero point {zero_point} outside [{qmin}, {qmax}]")
    outer = int(np.prod(acc.shape[:axis], dtype=np.int64))
    inner = int(np.prod(acc.shape[axis + 1 :], dtype=np.int64))
    return acc.reshape(outer, channels, inner), m0, shift


def requantize(
    acc: np.ndarray,
    m0: np.ndarray,
    shift: np.ndarray,
    zero_point: int,
    qmin: int,
    qmax: int,
    channel_axis: int = -1,
) -> np.ndarray:
    """``clamp(round(acc * m0 * 2**(-31 - shift)) + zero_point, qmin, qmax)`` with integers only.

    ``acc`` is an int32 tensor of any shape whose channels lie along ``channel_axis`` (the last
    axis of a GEMM output, axis 1 of NCHW); ``m0`` and ``shift`` hold one entry per channel or a
    single entry for the whole tensor. The result is uint8 or int8 when [qmin, qmax] fits one,
    else int32, and has the shape of ``acc``.
    """
    blocks, m0, shift = _validated(acc, m0, shift, zero_point, qmin, qmax, channel_axis)
    out = np.empty(blocks.shape, dtype=storage_dtype(qmin, qmax))
    _requantize_kernel(np.ascontiguousarray(blocks), *requantize_constants(m0, shift, blocks.shape[1]),
                       np.int64(zero_point), np.int64(qmin), np.int64(qmax), out)
    return out.reshape(np.shape(acc))


def requantize_reference(
    acc: np.ndarray,
    m0: np.ndarray,
    shift: np.ndarray,
    zero_point: int,
    qmin: int,
    qmax: int,
    channel_axis: int = -1,
) -> np.ndarray:
    """Numpy int64 oracle of :func:`requantize` (exact: |acc * m0| + 2**62 < 2**63)."""
    blocks, m0, shift = _validated(acc, m0, shift, zero_point, qmin, qmax, channel_axis)
    product = blocks.astype(np.int64) * m0.astype(np.int64)[None, :, None]
    right = (31 + shift.astype(np.int64))[None, :, None]
    magnitude = (np.abs(product) + (np.int64(1) << (right - 1))) >> right
    value = np.sign(product) * magnitude + zero_point
    return np.clip(value, qmin, qmax).astype(storage_dtype(qmin, qmax)).reshape(np.shape(acc))
