"""Div: the quotient of two activations (numpy broadcasting), or of an activation and a constant.

Lowering (:mod:`tpusim.ops._binary`): ``x / c`` is ``x * (1 / c)`` (folded into or making an
``affine`` layer for a per-channel ``c``, a table step for a scalar, kept as a division so the table
holds exactly the model's float steps); ``c / x`` with a scalar ``c`` is a table step; ``f(x) / g(x)``
of one tensor is one table.

Integers: Div of two activations is a float step, like Softmax: both inputs are dequantized, divided
in float32 and the quotient quantized (the chip has no integer divider; a host or vector unit does
this in float). ``a / 0`` saturates to the grid's end of the sign of ``a``; ``0 / 0`` is real zero.
Vector unit: one pass per divisor vector for its reciprocal, then one pass per input vector for the
product (operands read once, a broadcast operand once and held) with the output's quantization.
"""
from __future__ import annotations

import numpy as np

from tpusim.ops import register
from tpusim.ops._binary import binary_passes, lower_binary
from tpusim.ops.base import Op, VectorCost, vectors


@register
class Div(Op):
    name = "div"
    onnx_types = ("Div",)
    in_place = True
    fusable = True

    def lower(self, ctx, node):
        lower_binary(ctx, node, "div", self.name)

    def reference(self, layer, inputs):
        with np.errstate(divide="ignore", invalid="ignore"):
            return inputs[0] / inputs[1]

    def quantize(self, layer, in_qps, y_qp, quant, input_mean):
        from tpusim.quant.qlayer import plain_qlayer
        return plain_qlayer(layer, in_qps, y_qp)

    def execute(self, ql, inputs, options):
        from tpusim.quant.arithmetic import dequantize, quantize
        from tpusim.quant.qlayer import clamp_output
        a, b = (dequantize(q, qp) for q, qp in zip(inputs, ql.input_qparams))
        with np.errstate(divide="ignore", invalid="ignore"):
            y = a / b
        y = np.where(np.isnan(y), np.float32(0), y)
        return clamp_output(ql, quantize(ql.layer.activation.apply(y), ql.output_qparams)), 0

    def vector_cost(self, layer, in_elements, out_elements, lanes, int8):
        return VectorCost(f"div+{layer.activation.label}", "none",
                          vectors(in_elements[1], lanes) + binary_passes(in_elements, out_elements, lanes),
                          activation_ops=in_elements[1] + out_elements, requant_ops=out_elements if int8 else 0)

    def export(self, b, layer, inputs, weight, bias, y):
        b.node("Div", inputs, y, layer.name)
