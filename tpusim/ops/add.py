"""Add of two activations (residual connections), with numpy broadcasting; Add of a constant.

Lowering (:mod:`tpusim.ops._binary`): a scalar or per-output-channel constant after a Conv/Gemm/MatMul
is that layer's bias; after an ``affine`` layer it is that layer's shift; another per-channel constant
makes an ``affine`` layer; another scalar is a step of a table (a function of one tensor); two
functions of one tensor (``x + f(x)``) are one table.

Integers: both inputs are rescaled into a common fixed-point domain (``(q - z) << ADD_LEFT_SHIFT``
times ``s_i / (2 max(s_a, s_b))``), summed (a broadcast operand is reused along the broadcast axes)
and requantized. :class:`tpusim.ops.sub.Sub` is the same layer with the second input's rescale
negated. Vector unit: one pass per input vector (each operand is read once; a broadcast operand is
read once and held), and every input element is requantized once.
"""
from __future__ import annotations

import numpy as np

from tpusim.ops import register
from tpusim.ops._binary import binary_passes, lower_binary
from tpusim.ops.base import Op, VectorCost
from tpusim.quant.qlayer import INT32_MAX, INT32_MIN, Requant, centered, plain_qlayer, rescale, rescale_output, scalar

# Headroom bits of the add's common domain: |q - z| <= 255 shifted by 20 stays below 2**28, so the
# two rescaled inputs and their sum (or difference) fit an int32, and 20 fractional bits make the
# rescale error negligible next to the output's rounding (TensorFlow Lite uses the same layout for
# 8-bit add).
ADD_LEFT_SHIFT = 20


@register
class Add(Op):
    name = "add"
    onnx_types = ("Add",)
    in_place = True
    fusable = True
    signs = (1, 1)  # the sign each input's rescaled value enters the sum with

    def lower(self, ctx, node):
        lower_binary(ctx, node, self.name, self.name)

    def reference(self, layer, inputs):
        return inputs[0] + inputs[1] if self.signs[1] > 0 else inputs[0] - inputs[1]

    def quantize(self, layer, in_qps, y_qp, quant, input_mean):
        scales = [scalar(qp.scale) for qp in in_qps]
        twice_max = 2.0 * max(scales)
        rescales = tuple(Requant.of(s / twice_max) for s in scales)
        requant = Requant.of(twice_max / (2.0**ADD_LEFT_SHIFT * scalar(y_qp.scale)))
        return plain_qlayer(layer, in_qps, y_qp, requant=requant, input_rescales=rescales)

    def execute(self, ql, inputs, options):
        total = np.zeros(ql.layer.output_shape, np.int32)
        for q, qp, r, sign in zip(inputs, ql.input_qparams, ql.input_rescales, self.signs):
            shifted = centered(q, qp.zero_point) << ADD_LEFT_SHIFT
            term = rescale(shifted, r, 0, INT32_MIN, INT32_MAX)
            if sign > 0:
                total += term
            else:
                total -= term
        return rescale_output(ql, total), 0

    def vector_cost(self, layer, in_elements, out_elements, lanes, int8):
        passes = binary_passes(in_elements, out_elements, lanes)
        return VectorCost(f"{layer.op}+{layer.activation.label}", "none", passes,
                          activation_ops=out_elements if layer.activation.kind != "none" else 0,
                          requant_ops=sum(in_elements) if int8 else 0)

    def export(self, b, layer, inputs, weight, bias, y):
        b.node("Add" if self.signs[1] > 0 else "Sub", inputs, y, layer.name)

