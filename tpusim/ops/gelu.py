"""GELU, as a 256-entry table (:mod:`tpusim.ops._table`): the ONNX ``Gelu`` op and the chains exporters
write for it.

The ``Gelu`` op (opset 20, ``approximate`` "none" or "tanh"), and the chains the generic one-tensor
fusion of :mod:`tpusim.ops._table` recognises in any operand order:

- Erf form, as torch exports it: ``Div(x, 1.4142) -> Erf -> Add(1) -> Mul(x) -> Mul(0.5)``;
- tanh form: ``0.5 * x * (1 + Tanh(sqrt(2/pi) * (x + 0.044715 * x^3)))`` with ``Pow(x, 3)`` or
  ``Mul(x, Mul(x, x))``.

A fused layer keeps the model's own expression; the ``Gelu`` op's function is the Erf / tanh chain
below, which is also what it exports (the exporter's opset 17 has no Gelu). Integers: the table
lookup; vector unit: one pass per vector (one lookup per element).
"""
from __future__ import annotations

import math

from tpusim.frontend.context import node_attrs
from tpusim.ops import register
from tpusim.ops._expr import X, const
from tpusim.ops._table import TableOp


@register
class Gelu(TableOp):
    name = "gelu"
    onnx_types = ("Gelu",)

    def lowered_attrs(self, ctx, node):
        approximate = node_attrs(node).get("approximate", "none")
        if approximate not in ("none", "tanh"):
            raise ctx.fail(node, f"unknown approximate={approximate!r} (expected 'none' or 'tanh')")
        return (("approximate", approximate),)

    def expression(self, layer):
        half_x = ("mul", X, const(0.5))
        if layer.attr("approximate", "none") == "tanh":
            cubic = ("add", X, ("mul", const(0.044715), ("pow", X, const(3.0))))
            inner = ("fn", "tanh", (), ("mul", const(math.sqrt(2.0 / math.pi)), cubic))
        else:
            inner = ("fn", "erf", (), ("div", X, const(math.sqrt(2.0))))
        return ("mul", half_x, ("add", const(1.0), inner))
