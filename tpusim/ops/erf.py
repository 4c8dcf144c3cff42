"""Erf, as a 256-entry table (:mod:`tpusim.ops._table`); also a step of GELU's Erf form.

numpy has no erf (and scipy is not a dependency): :func:`erf` is one compiled pass of the C library's
``erf`` in float64 (Python's ``math.erf``; for a few thousand values, ``math.erf`` itself), rounded to the
input's float dtype. Its oracle,
:func:`erf_reference`, sums the series ``erf(x) = 2/sqrt(pi) exp(-x^2) sum_n 2^n x^(2n+1) / (1 * 3 * ...
* (2n+1))`` in numpy, whose terms are all positive (no cancellation), to double precision for |x| < 6;
beyond, erf is +-1 to double precision; it took BERT-base's FP32 evaluator about a second per sample.
The float32 result is the correctly rounded value up to one ulp. Integers: the table lookup; vector unit:
one pass per vector (one lookup per element).
"""
from __future__ import annotations

import math

import numpy as np

from tpusim import jit
from tpusim.ops import register
from tpusim.ops._table import TableOp

_SATURATED = 6.0  # 1 - erf(6) = 2e-17: below float64's resolution at 1


_BANDS = ((0.0, 1.0), (1.0, 3.0), (3.0, _SATURATED))


def _series(a: np.ndarray) -> np.ndarray:
    a2 = a * a
    term = a.copy()
    total = a.copy()
    n = 0
    while np.any(term > 1e-17 * total):
        n += 1
        term *= 2.0 * a2 / (2 * n + 1)
        total += term
    return np.minimum(2.0 / math.sqrt(math.pi) * np.exp(-a2) * total, 1.0)


@jit.kernel(cache=True, nogil=True)
def _erf_kernel(x, out):
    for i in range(x.size):
        out[i] = math.erf(np.float64(x[i]))


# Below this many values Python's own math.erf (the same C function, the same bits) computes them, in under
# a millisecond: the kernel's first call sets Numba up (0.2-0.5 s), which a lowering that identifies GELU on
# its 4,801 probe points would pay, though it runs no kernel otherwise.
_KERNEL_VALUES = 2**13


def erf(x: np.ndarray) -> np.ndarray:
    """erf of ``x`` in float64, returned in ``x``'s float dtype."""
    x = np.asarray(x)
    dtype = x.dtype if x.dtype in (np.float32, np.float64) else np.dtype(np.float64)
    flat = np.ascontiguousarray(x, dtype).reshape(-1)
    if flat.size < _KERNEL_VALUES:
        out = np.fromiter(map(math.erf, flat.tolist()), np.float64, flat.size).astype(dtype)
    else:
        out = np.empty(flat.size, dtype)
        _erf_kernel(flat, out)
    return out.reshape(x.shape)


def erf_reference(x: np.ndarray) -> np.ndarray:
    """Numpy oracle of :func:`erf`: the series, in float64, returned in ``x``'s float dtype."""
    x = np.asarray(x)
    dtype = x.dtype if x.dtype in (np.float32, np.float64) else np.dtype(np.float64)
    v = np.abs(x.astype(np.float64))
    out = np.ones_like(v)
    # Small arguments converge in far fewer terms: sum each magnitude band on its own.
    for lo, hi in _BANDS:
        band = (v >= lo) & (v < hi)
        if np.any(band):
            out[band] = _series(v[band])
    return (np.sign(x) * out).astype(dtype)


@register
class Erf(TableOp):
    name = "erf"
    onnx_types = ("Erf",)

    def function(self, layer, x):
        return erf(x)

    def export_function(self, b, layer, x, y):
        b.node("Erf", [x], y, layer.name)
