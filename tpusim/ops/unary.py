"""Unary: any elementwise function of one tensor that a fused chain of nodes computes and that is not
one of the named functions (:data:`tpusim.ops._table.KNOWN`), e.g. ``x * 0.5`` or ``sigmoid(x) + 1``.

Its ``attrs`` hold the expression (:mod:`tpusim.ops._expr`), which the FP32 reference evaluates, the
quantizer turns into the 256-entry table and the export writes as the model's own float nodes.
Integers: the table lookup; vector unit: one pass per vector (one lookup per element), as every
table op (:mod:`tpusim.ops._table`).
"""
from __future__ import annotations

from tpusim.ops import register
from tpusim.ops._table import TableOp


@register
class Unary(TableOp):
    name = "unary"
    onnx_types = ()

    def lower(self, ctx, node):  # made by fusion only
        raise ctx.fail(node, "unary layers are made by fusing elementwise nodes, not lowered from a node")
