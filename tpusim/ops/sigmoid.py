"""Sigmoid, as a 256-entry table (:mod:`tpusim.ops._table`)."""
from __future__ import annotations

from tpusim.ops import register
from tpusim.ops._table import TableOp


@register
class Sigmoid(TableOp):
    name = "sigmoid"
    onnx_types = ("Sigmoid",)

    def function(self, layer, x):
        from tpusim import tensor_ops
        return tensor_ops.sigmoid(x)

    def export(self, b, layer, inputs, weight, bias, y):
        b.node("Sigmoid", inputs, y, layer.name)
