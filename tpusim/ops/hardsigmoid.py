"""HardSigmoid, ``max(0, min(1, alpha x + beta))`` (ONNX defaults alpha 0.2, beta 0.5; torch's
``hardsigmoid`` exports alpha 1/6), as a 256-entry table (:mod:`tpusim.ops._table`).

A fused chain
``Clip(x + 3, 0, 6) / 6`` is recognised as this op too. Integers: the table lookup; vector unit: one
pass per vector (one lookup per element).
"""
from __future__ import annotations

import numpy as np

from tpusim.frontend.context import node_attrs
from tpusim.ops import register
from tpusim.ops._table import TableOp


def hard_sigmoid(x: np.ndarray, alpha: float, beta: float) -> np.ndarray:
    """As ONNX Runtime computes it, in the dtype of ``x``."""
    t = x.dtype.type
    return np.clip(t(alpha) * x + t(beta), t(0), t(1))


@register
class HardSigmoid(TableOp):
    name = "hardsigmoid"
    onnx_types = ("HardSigmoid",)

    def lowered_attrs(self, ctx, node):
        attrs = node_attrs(node)
        return (("alpha", float(np.float32(attrs.get("alpha", 0.2)))),
                ("beta", float(np.float32(attrs.get("beta", 0.5)))))

    def function(self, layer, x):
        return hard_sigmoid(x, layer.attr("alpha", 0.2), layer.attr("beta", 0.5))

    def export_function(self, b, layer, x, y):
        b.node("HardSigmoid", [x], y, layer.name, alpha=layer.attr("alpha", 0.2), beta=layer.attr("beta", 0.5))
