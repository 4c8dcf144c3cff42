"""Elu, ``x`` for ``x >= 0`` else ``alpha (exp(x) - 1)`` (default alpha 1), as a 256-entry table
(:mod:`tpusim.ops._table`).

Integers: the table lookup; vector unit: one pass per vector (one lookup per element).
"""
from __future__ import annotations

import numpy as np

from tpusim.frontend.context import node_attrs
from tpusim.ops import register
from tpusim.ops._table import TableOp


@register
class Elu(TableOp):
    name = "elu"
    onnx_types = ("Elu",)

    def lowered_attrs(self, ctx, node):
        return (("alpha", float(np.float32(node_attrs(node).get("alpha", 1.0)))),)

    def function(self, layer, x):
        t = x.dtype.type
        with np.errstate(over="ignore"):
            return np.where(x >= 0, x, t(layer.attr("alpha", 1.0)) * (np.exp(x) - t(1)))

    def export_function(self, b, layer, x, y):
        b.node("Elu", [x], y, layer.name, alpha=layer.attr("alpha", 1.0))
