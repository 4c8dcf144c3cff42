"""Mish, ``x * tanh(softplus(x))``, as a 256-entry table (:mod:`tpusim.ops._table`).

The ONNX ``Mish`` op (opset 18) and the ``Mul(x, Tanh(Softplus(x)))`` chain, which the one-tensor fusion
recognises. Exported as that chain (the exporter's opset 17 has no Mish). Integers: the table lookup;
vector unit: one pass per vector (one lookup per element).
"""
from __future__ import annotations

from tpusim.ops import register
from tpusim.ops._expr import X
from tpusim.ops._table import TableOp


@register
class Mish(TableOp):
    name = "mish"
    onnx_types = ("Mish",)

    def expression(self, layer):
        return ("mul", X, ("fn", "tanh", (), ("fn", "softplus", (), X)))
