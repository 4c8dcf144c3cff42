"""Sigmoid, as a 256-entry table (:mod:`tpusim.ops._table`)."""
from __future__ import annotations

import numpy as np

from tpusim.ops import register
from tpusim.ops._table import TableOp


@register
class Sigmoid(TableOp):
    name = "sigmoid"
    onnx_types = ("Sigmoid",)

    def function(self, layer, x):
        return 1.0 / (1.0 + np.exp(-x))

    def export(self, b, layer, inputs, weight, bias, y):
        b.node("Sigmoid", inputs, y, layer.name)
