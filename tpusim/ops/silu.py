"""SiLU (swish), ``x * sigmoid(x)``, as a 256-entry table (:mod:`tpusim.ops._table`).

ONNX has no SiLU op before opset 24's Swish: exporters write ``Mul(x, Sigmoid(x))``. The Sigmoid is
lowered as its own table first; when the Mul's inputs are ``x`` and that sigmoid (in either order) and
nothing else reads the sigmoid's output, the generic one-tensor fusion of :mod:`tpusim.ops._table`
replaces both with one ``silu`` layer holding the model's expression. Integers: the table lookup;
vector unit: one pass per vector (one lookup per element).
"""
from __future__ import annotations

from tpusim.ops import register
from tpusim.ops._expr import X
from tpusim.ops._table import TableOp


@register
class Silu(TableOp):
    name = "silu"
    onnx_types = ()

    def expression(self, layer):
        return ("mul", X, ("fn", "sigmoid", (), X))

    def lower(self, ctx, node):  # made by fusion only
        raise ctx.fail(node, "silu layers are made by fusing Mul(x, Sigmoid(x)), not lowered from a node")
