"""Pow: only as a step of an elementwise function of one tensor (GELU's tanh form has ``Pow(x, 3)``).

``Pow(x, c)`` and ``Pow(c, x)`` with a scalar constant are steps of a table (:mod:`tpusim.ops._table`);
``Pow(f(x), g(x))`` of one tensor is one table; any other Pow is refused at lowering. It has no layer
of its own, so no quantization rule, kernel or cost: the table op's are used. As ONNX Runtime does, an
exponent of 2 or 3 is evaluated as repeated products.
"""
from __future__ import annotations

from tpusim.ops import register
from tpusim.ops._binary import lower_binary
from tpusim.ops.base import Op


@register
class Pow(Op):
    name = ""
    onnx_types = ("Pow",)

    def lower(self, ctx, node):
        lower_binary(ctx, node, "pow", None)
