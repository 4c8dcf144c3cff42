"""Concat of activations on any axis.

Integers: the output has its own grid; each input on a different grid is requantized into it, the
others are copied. Vector unit: one pass per input vector (every element is read and written once).
"""
from __future__ import annotations

import numpy as np

from tpusim.frontend.context import node_attrs
from tpusim.ops import register
from tpusim.ops.base import Op, VectorCost, vectors


@register
class Concat(Op):
    name = "concat"
    onnx_types = ("Concat",)

    def lower(self, ctx, node):
        inputs = [ctx.activation_input(node, i) for i in range(len(node.input))]
        shapes = [s for _, s in inputs]
        rank = len(shapes[0])
        axis = int(node_attrs(node)["axis"]) % rank
        for s in shapes[1:]:
            if len(s) != rank or any(a != b for i, (a, b) in enumerate(zip(s, shapes[0])) if i != axis):
                raise ctx.fail(node, f"incompatible shapes {shapes} for axis {axis}")
        out = list(shapes[0])
        out[axis] = sum(s[axis] for s in shapes)
        ctx.add_simple(node, self.name, inputs, tuple(out), axis=axis)

    def reference(self, layer, inputs):
        return np.concatenate(inputs, axis=layer.axis)

    def quantize(self, layer, in_qps, y_qp, quant, input_mean):
        from tpusim.quant.qlayer import plain_qlayer, rescales_to
        return plain_qlayer(layer, in_qps, y_qp, input_rescales=rescales_to(in_qps, y_qp))

    def execute(self, ql, inputs, options):
        from tpusim.quant.qlayer import on_output_grid
        return np.concatenate(on_output_grid(ql, inputs), axis=ql.layer.axis), 0

    def vector_cost(self, layer, in_elements, out_elements, lanes, int8):
        return VectorCost(f"concat+{layer.activation.label}", "none", sum(vectors(e, lanes) for e in in_elements),
                          activation_ops=out_elements if layer.activation.kind != "none" else 0,
                          requant_ops=sum(in_elements) if int8 else 0)

    def export(self, b, layer, inputs, weight, bias, y):
        b.node("Concat", inputs, y, layer.name, axis=layer.axis)
