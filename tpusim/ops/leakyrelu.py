"""LeakyRelu, ``x`` for ``x >= 0`` else ``alpha x`` (ONNX default alpha 0.01), as a 256-entry table
(:mod:`tpusim.ops._table`).

PRelu with one slope lowers here too (:mod:`tpusim.ops.prelu`). Integers: the table lookup (exact: the
table is built with ORT's float steps); vector unit: one pass per vector (one lookup per element).
"""
from __future__ import annotations

import numpy as np

from tpusim.frontend.context import node_attrs
from tpusim.ops import register
from tpusim.ops._table import TableOp


@register
class LeakyRelu(TableOp):
    name = "leakyrelu"
    onnx_types = ("LeakyRelu",)

    def lowered_attrs(self, ctx, node):
        return (("alpha", float(np.float32(node_attrs(node).get("alpha", 0.01)))),)

    def function(self, layer, x):
        return np.where(x >= 0, x, x.dtype.type(layer.attr("alpha", 0.01)) * x)

    def export_function(self, b, layer, x, y):
        b.node("LeakyRelu", [x], y, layer.name, alpha=layer.attr("alpha", 0.01))
