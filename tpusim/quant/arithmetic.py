"""Uniform affine quantization (white paper eq. 4-8): scales, zero points, quantize, dequantize.

Integer grids:

- ``asymmetric-uint8`` activations: [0, 255], integer zero point inside the grid so that real
  zero is exact (padding and ReLU add no error).
- symmetric int8 (all weights, ``symmetric-int8`` activations): [-127, 127], zero point 0.
  The grid is kept symmetric, as TensorRT and ONNX Runtime's symmetric int8 do: w and -w then
  quantize to opposite integers and the scale is simply amax / 127. Using -128 would add one
  level that only a value beyond -amax could reach.

The arithmetic follows ONNX ``QuantizeLinear`` / ``DequantizeLinear`` so that results can be
compared bit for bit with ONNX Runtime: a scale is a float32 value (held in a float64 array,
exactly representable in float32), ``x / scale`` is computed in float32, rounded half to even,
offset by the zero point and saturated; dequantization is ``(q - z) * scale`` in float32.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
from numba import njit

from tpusim.errors import ModelError

ActivationScheme = Literal["asymmetric-uint8", "symmetric-int8"]
WeightGranularity = Literal["per-tensor", "per-channel"]

_FLOAT32_TINY = float(np.finfo(np.float32).tiny)
_INT32_MIN = int(np.iinfo(np.int32).min)
_INT32_MAX = int(np.iinfo(np.int32).max)


def integer_range(symmetric: bool, num_bits: int = 8) -> tuple[int, int]:
    """(qmin, qmax) of the integer grid: restricted signed for symmetric, unsigned otherwise."""
    if not 2 <= num_bits <= 16:
        raise ValueError(f"num_bits must be in [2, 16], got {num_bits}")
    if symmetric:
        qmax = (1 << (num_bits - 1)) - 1
        return -qmax, qmax
    return 0, (1 << num_bits) - 1


def storage_dtype(qmin: int, qmax: int) -> np.dtype:
    """Smallest integer dtype holding [qmin, qmax] (uint8 or int8 for 8-bit grids)."""
    if 0 <= qmin and qmax <= 255:
        return np.dtype(np.uint8)
    if -128 <= qmin and qmax <= 127:
        return np.dtype(np.int8)
    return np.dtype(np.int32)


@dataclass(frozen=True, eq=False)
class QParams:
    """Quantization parameters of one tensor: ``x ~ scale * (q - zero_point)``, q in [qmin, qmax].

    ``scale`` and ``zero_point`` are 0-d arrays for per-tensor quantization, or 1-d arrays of one
    entry per slice along ``axis`` for per-channel quantization.
    """

    scale: np.ndarray
    zero_point: np.ndarray
    qmin: int
    qmax: int
    axis: int | None = None

    def __post_init__(self) -> None:
        scale = np.array(self.scale, dtype=np.float64)
        zero_point = np.array(self.zero_point, dtype=np.int32)
        if scale.shape != zero_point.shape or scale.ndim > 1:
            raise ValueError(f"scale {scale.shape} and zero_point {zero_point.shape} must share a 0-d or 1-d shape")
        if (self.axis is None) != (scale.ndim == 0):
            raise ValueError("axis must be given exactly when scale is per channel (1-d)")
        if not np.all(np.isfinite(scale) & (scale > 0)):
            raise ValueError("scales must be finite and positive")
        if not np.array_equal(scale, scale.astype(np.float32)):
            raise ValueError("scales must be exactly representable in float32")
        if not self.qmin < self.qmax:
            raise ValueError(f"qmin {self.qmin} must be below qmax {self.qmax}")
        if np.any(zero_point < self.qmin) or np.any(zero_point > self.qmax):
            raise ValueError(f"zero points must lie in [{self.qmin}, {self.qmax}]")
        scale.setflags(write=False)
        zero_point.setflags(write=False)
        object.__setattr__(self, "scale", scale)
        object.__setattr__(self, "zero_point", zero_point)
        object.__setattr__(self, "qmin", int(self.qmin))
        object.__setattr__(self, "qmax", int(self.qmax))

    @property
    def storage_dtype(self) -> np.dtype:
        """Smallest integer dtype holding [qmin, qmax] (uint8 or int8 for 8-bit grids)."""
        return storage_dtype(self.qmin, self.qmax)

    def broadcast(self, values: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        """``values`` (shaped like ``scale``) reshaped to broadcast against a tensor of ``shape``."""
        if self.axis is None:
            return values
        if not -len(shape) <= self.axis < len(shape) or shape[self.axis] != values.shape[0]:
            raise ValueError(f"{values.shape[0]} channel parameters do not fit axis {self.axis} of shape {shape}")
        target = [1] * len(shape)
        target[self.axis] = values.shape[0]
        return values.reshape(target)

    def channel_block(self, shape: tuple[int, ...]) -> int:
        """Elements that share one scale in a row-major tensor of ``shape``: all of them per tensor, else the
        product of the dims after ``axis`` (the tensor is then blocks of ``len(scale)`` such runs), which is
        what the compiled per-element kernels walk."""
        if self.axis is None:
            return max(math.prod(shape), 1)
        self.broadcast(self.scale, shape)  # (checks the axis and the channel count)
        return math.prod(shape[self.axis % len(shape) + 1:])


def _as_float32_scale(scale: np.ndarray) -> np.ndarray:
    """Round scales to float32 (as stored in an ONNX model); too small ones become 1.0.

    A zero range (an all-zero tensor or channel) has no natural scale; every scale quantizes it
    exactly, and 1.0 is what ONNX Runtime picks too.
    """
    stored = np.asarray(scale, dtype=np.float64).astype(np.float32).astype(np.float64)
    return np.where(stored < _FLOAT32_TINY, 1.0, stored)


def asymmetric_grid(lo: np.ndarray, hi: np.ndarray, qmin: int, qmax: int) -> tuple[np.ndarray, np.ndarray]:
    """(scale, zero_point) arrays of the asymmetric grids covering [min(lo, 0), max(hi, 0)].

    Vectorized over candidate ranges. The zero point is rounded from the unrounded scale and
    then the scale is rounded to float32, in the same order as ONNX Runtime's quantizer.
    """
    lo = np.minimum(np.asarray(lo, dtype=np.float64), 0.0)
    hi = np.maximum(np.asarray(hi, dtype=np.float64), 0.0)
    exact_scale = (hi - lo) / float(qmax - qmin)
    degenerate = exact_scale.astype(np.float32) < _FLOAT32_TINY
    safe_scale = np.where(degenerate, 1.0, exact_scale)
    zero_point = np.where(degenerate, qmin, np.clip(np.rint(qmin - lo / safe_scale), qmin, qmax))
    return _as_float32_scale(exact_scale), zero_point.astype(np.int32)


def symmetric_scale(amax: np.ndarray, qmax: int) -> np.ndarray:
    """Scales of the symmetric grids [-amax, amax] with integer range [-qmax, qmax]."""
    return _as_float32_scale(np.abs(np.asarray(amax, dtype=np.float64)) / float(qmax))


def activation_qparams(lo: float, hi: float, scheme: ActivationScheme) -> QParams:
    """Per-tensor parameters for an activation whose clipping range is [lo, hi].

    ``asymmetric-uint8`` widens the range to contain 0; ``symmetric-int8`` uses
    ``max(|lo|, |hi|)``. The scale is positive even for the degenerate range [0, 0].
    """
    if not (np.isfinite(lo) and np.isfinite(hi)) or lo > hi:
        raise ValueError(f"invalid clipping range [{lo}, {hi}]")
    if scheme == "asymmetric-uint8":
        qmin, qmax = integer_range(symmetric=False)
        scale, zero_point = asymmetric_grid(np.array(lo), np.array(hi), qmin, qmax)
        return QParams(scale, zero_point, qmin, qmax)
    if scheme == "symmetric-int8":
        qmin, qmax = integer_range(symmetric=True)
        amax = max(abs(lo), abs(hi))
        return QParams(symmetric_scale(np.array(amax), qmax), np.array(0), qmin, qmax)
    raise ValueError(f"unknown activation scheme {scheme!r}")


def weight_qparams(
    w: np.ndarray, granularity: WeightGranularity, axis: int = 0, *, name: str = "weight"
) -> QParams:
    """Symmetric int8 ([-127, 127]) parameters for a weight tensor.

    ``per-channel`` gives one scale per slice along ``axis`` (the output channel: axis 0 of OIHW
    conv weights and of (N, K) GEMM weights).
    """
    w = np.asarray(w)
    if w.size == 0:
        raise ModelError(f"{name}: empty weight tensor")
    if granularity not in ("per-tensor", "per-channel"):
        raise ValueError(f"unknown weight granularity {granularity!r}")
    qmin, qmax = integer_range(symmetric=True)
    # max |w| as max(max w, -min w): the same value without a copy of |w| (VGG's first FC layer: 400 MB); a
    # NaN or inf anywhere reaches the extremes, so they also tell whether every weight is finite.
    rows = w.reshape(1, -1) if granularity == "per-tensor" else \
        np.moveaxis(w, axis % w.ndim, 0).reshape(w.shape[axis % w.ndim], -1)
    highest, lowest = rows.max(axis=1), rows.min(axis=1)
    if not (np.all(np.isfinite(highest)) and np.all(np.isfinite(lowest))):
        raise ModelError(f"{name}: weight tensor contains NaN or inf")
    amax = np.maximum(highest, -lowest).astype(np.float64)
    if granularity == "per-tensor":
        return QParams(symmetric_scale(np.array(amax[0]), qmax), np.array(0), qmin, qmax)
    scale = symmetric_scale(amax, qmax)
    return QParams(scale, np.zeros(scale.shape, dtype=np.int32), qmin, qmax, axis % w.ndim)


@njit(cache=True, nogil=True)
def _quantize_kernel(x, scale, zero_point, inner, qmin, qmax, out):
    """out = clamp(rint(x / scale[c]) + zero_point[c], qmin, qmax), all in float32, one pass: the tensor is
    blocks of ``len(scale)`` channels of ``inner`` elements each."""
    channels = scale.size
    for block in range(x.size // (channels * inner)):
        for c in range(channels):
            s = scale[c]
            z = zero_point[c]
            start = (block * channels + c) * inner
            # over slices from 0, as in tpusim.quant.fidelity._signal_and_noise: the loop vectorises
            values = x[start : start + inner]
            quantized = out[start : start + inner]
            for i in range(inner):
                quantized[i] = min(max(np.rint(values[i] / s) + z, qmin), qmax)


def quantize(x: np.ndarray, qp: QParams) -> np.ndarray:
    """``clamp(round_half_even(x / scale) + zero_point, qmin, qmax)`` in float32, as ONNX QuantizeLinear
    (:func:`quantize_reference`, in one compiled pass without its four temporaries)."""
    x = np.asarray(x, dtype=np.float32, order="C")
    inner = qp.channel_block(x.shape)
    out = np.empty(x.shape, qp.storage_dtype)
    if x.size:
        _quantize_kernel(x.reshape(-1), np.atleast_1d(qp.scale.astype(np.float32)),
                         np.atleast_1d(qp.zero_point.astype(np.float32)), inner, np.float32(qp.qmin),
                         np.float32(qp.qmax), out.reshape(-1))
    return out


def quantize_reference(x: np.ndarray, qp: QParams) -> np.ndarray:
    """Numpy oracle of :func:`quantize`."""
    x = np.asarray(x)
    scale = qp.broadcast(qp.scale.astype(np.float32), x.shape)
    zero_point = qp.broadcast(qp.zero_point.astype(np.float32), x.shape)
    rounded = np.rint(x.astype(np.float32, copy=False) / scale) + zero_point
    return np.clip(rounded, qp.qmin, qp.qmax).astype(qp.storage_dtype)


def dequantize(q: np.ndarray, qp: QParams) -> np.ndarray:
    """``(q - zero_point) * scale`` in float32, as ONNX DequantizeLinear."""
    q = np.asarray(q)
    scale = qp.broadcast(qp.scale.astype(np.float32), q.shape)
    zero_point = qp.broadcast(qp.zero_point, q.shape)
    return (q.astype(np.int32) - zero_point).astype(np.float32) * scale


def bias_to_int32(b: np.ndarray, s_w: np.ndarray, s_x: float) -> np.ndarray:
    """Bias as int32 on the accumulator's grid (scale ``s_w * s_x``), rounded half to even.

    Computed in float64 (the bias never passes through a float32 QuantizeLinear: the int32 is
    what the accelerator adds). Values beyond the int32 range saturate, as in ONNX Runtime's
    quantizer; that only happens for absurdly small weight or input scales.
    """
    b = np.asarray(b, dtype=np.float64)
    if not np.all(np.isfinite(b)):
        raise ModelError("bias contains NaN or inf")
    bias_scale = np.asarray(s_w, dtype=np.float64) * float(s_x)
    if not np.all(bias_scale > 0):
        raise ValueError("bias scales must be positive")
    return np.clip(np.rint(b / bias_scale), _INT32_MIN, _INT32_MAX).astype(np.int32)

