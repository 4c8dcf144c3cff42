"""HardSwish, ``x * HardSigmoid(x; 1/6, 1/2)`` (MobileNet-v3), as a 256-entry table
(:mod:`tpusim.ops._table`).

The ONNX ``HardSwish`` op, and the chains exporters write for it (``x * HardSigmoid(x)``, ``x * Clip(x +
3, 0, 6) / 6``), recognised by the one-tensor fusion. Integers: the table lookup; vector unit: one pass
per vector (one lookup per element).
"""
from __future__ import annotations

import numpy as np

from tpusim.ops import register
from tpusim.ops._table import TableOp
from tpusim.ops.hardsigmoid import hard_sigmoid


@register
class HardSwish(TableOp):
    name = "hardswish"
    onnx_types = ("HardSwish",)

    def function(self, layer, x):
        return x * hard_sigmoid(x, float(np.float32(1 / 6)), 0.5)

    def export_function(self, b, layer, x, y):
        b.node("HardSwish", [x], y, layer.name)
