"""Softplus, ``log(1 + exp(x))``, as a 256-entry table (:mod:`tpusim.ops._table`).

Computed as ``logaddexp(0, x)``, which neither overflows nor loses the small values of very negative
``x``. Integers: the table lookup; vector unit: one pass per vector (one lookup per element).
"""
from __future__ import annotations

import numpy as np

from tpusim.ops import register
from tpusim.ops._table import TableOp


@register
class Softplus(TableOp):
    name = "softplus"
    onnx_types = ("Softplus",)

    def function(self, layer, x):
        return np.logaddexp(x.dtype.type(0), x)

    def export_function(self, b, layer, x, y):
        b.node("Softplus", [x], y, layer.name)
