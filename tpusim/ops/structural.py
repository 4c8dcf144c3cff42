"""Nodes that compute nothing: Identity and Dropout (inference) alias their input; Constant adds a
constant. Canonicalisation removes the ones a file brings; these lower the ones written after it: the
QDQ split keeps a graph output's name with an Identity, and op rewrites (the batch-first LSTM) leave
them between renamed tensors."""
from __future__ import annotations

from onnx import numpy_helper

from tpusim.frontend.context import node_attrs
from tpusim.ops import register
from tpusim.ops.base import Op


@register
class Structural(Op):
    name = ""
    onnx_types = ("Identity", "Dropout", "Constant")

    def lower(self, ctx, node):
        if node.op_type == "Constant":
            attrs = node_attrs(node)
            if "value" not in attrs:
                raise ctx.fail(node, f"only the 'value' form of Constant is supported (got {sorted(attrs)})")
            ctx.constants[node.output[0]] = numpy_helper.to_array(attrs["value"])
            return
        if ctx.is_constant(node, 0):
            ctx.constants[node.output[0]] = ctx.constants[ctx.resolve(node.input[0])]
            return
        name, _ = ctx.activation_input(node)
        ctx.alias[node.output[0]] = name
        ctx.consumers[name] -= 1  # an alias is not a reader: its own readers are counted when they resolve it
        if node.output[0] in ctx.graph_outputs:
            ctx.graph_outputs.add(name)
        for extra in node.output[1:]:
            if extra and ctx.consumers.get(extra, 0):
                raise ctx.fail(node, f"output {extra!r} (the dropout mask) is read; only inference graphs are supported")
