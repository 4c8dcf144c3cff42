"""Softmax over one axis: the one float step of the chip model.

The vector unit dequantizes, evaluates softmax in float32 and quantizes, as a host or vector unit
would: three passes over each vector (max, exp-and-sum, normalise).
"""
from __future__ import annotations

import numpy as np

from tpusim.frontend.context import node_attrs
from tpusim.ops import register
from tpusim.ops.base import Op, VectorCost, vectors

SOFTMAX_PASSES = 3


@register
class Softmax(Op):
    name = "softmax"
    onnx_types = ("Softmax",)

    def lower(self, ctx, node):
        x, shape = ctx.activation_input(node)
        default = -1 if ctx.opset >= 13 else 1
        axis = int(node_attrs(node).get("axis", default)) % len(shape)
        if ctx.opset < 13 and axis != len(shape) - 1:
            raise ctx.fail(node, "opset < 13 Softmax over several trailing axes is not supported")
        ctx.add_simple(node, self.name, [(x, shape)], shape, axis=axis)

    def reference(self, layer, inputs):
        from tpusim import tensor_ops
        return tensor_ops.softmax(inputs[0], layer.axis)

    def quantize(self, layer, in_qps, y_qp, quant, input_mean):
        from tpusim.quant.qlayer import plain_qlayer
        return plain_qlayer(layer, in_qps, y_qp)

    def execute(self, ql, inputs, options):
        from tpusim import tensor_ops
        from tpusim.quant.arithmetic import dequantize, quantize
        from tpusim.quant.qlayer import clamp_output
        # C-contiguous, whatever layout the layer before left: numpy's float sums depend on the order they run in
        y = tensor_ops.softmax(np.ascontiguousarray(dequantize(inputs[0], ql.input_qparams[0])), ql.layer.axis)
        return clamp_output(ql, quantize(ql.layer.activation.apply(y), ql.output_qparams)), 0

    def vector_cost(self, layer, in_elements, out_elements, lanes, int8):
        return VectorCost("softmax", "none", SOFTMAX_PASSES * vectors(out_elements, lanes),
                          activation_ops=SOFTMAX_PASSES * out_elements, requant_ops=out_elements if int8 else 0)

    def export(self, b, layer, inputs, weight, bias, y):
        b.node("Softmax", inputs, y, layer.name, axis=layer.axis)
