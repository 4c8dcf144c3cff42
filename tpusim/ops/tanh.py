"""Tanh, as a 256-entry table (:mod:`tpusim.ops._table`)."""
from __future__ import annotations

import numpy as np

from tpusim.ops import register
from tpusim.ops._table import TableOp


@register
class Tanh(TableOp):
    name = "tanh"
    onnx_types = ("Tanh",)

    def function(self, layer, x):
        return np.tanh(x)

    def export(self, b, layer, inputs, weight, bias, y):
        b.node("Tanh", inputs, y, layer.name)
