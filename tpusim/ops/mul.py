"""Mul: the elementwise product of two activations (numpy broadcasting: squeeze-excitation's gate
``x[N,C,H,W] * s[N,C,1,1]``), or of an activation and a constant.

Lowering (:mod:`tpusim.ops._binary`): a per-channel constant makes (or folds into) an ``affine``
layer; a scalar is a step of a table (a function of one tensor); ``x * f(x)`` (SiLU, GELU, HardSwish)
is one table layer.

Integers: the exact int32 product of the centred inputs, ``(q_a - z_a)(q_b - z_b)`` (at most 255^2),
requantized once by ``s_a s_b / s_y`` with a dyadic multiplier -- what ONNX Runtime's QLinearMul
computes. Vector unit: one pass per input vector (each operand is read once, a broadcast gate once
and held), one multiply per output element and its requantization.
"""
from __future__ import annotations

from tpusim.ops import register
from tpusim.ops._binary import binary_passes, lower_binary
from tpusim.ops.base import Op, VectorCost


@register
class Mul(Op):
    name = "mul"
    onnx_types = ("Mul",)
    in_place = True
    fusable = True

    def lower(self, ctx, node):
        lower_binary(ctx, node, "mul", self.name)

    def reference(self, layer, inputs):
        return inputs[0] * inputs[1]

    def quantize(self, layer, in_qps, y_qp, quant, input_mean):
        from tpusim.quant.qlayer import Requant, plain_qlayer, scalar
        a, b = (scalar(qp.scale) for qp in in_qps)
        return plain_qlayer(layer, in_qps, y_qp, requant=Requant.of(a * b / scalar(y_qp.scale)))

    def execute(self, ql, inputs, options):
        from tpusim.quant.qlayer import centered, rescale_output
        qa, qb = ql.input_qparams
        product = centered(inputs[0], qa.zero_point) * centered(inputs[1], qb.zero_point)
        return rescale_output(ql, product), 0

    def vector_cost(self, layer, in_elements, out_elements, lanes, int8):
        return VectorCost(f"mul+{layer.activation.label}", "none", binary_passes(in_elements, out_elements, lanes),
                          activation_ops=out_elements, requant_ops=out_elements if int8 else 0)

    def export(self, b, layer, inputs, weight, bias, y):
        b.node("Mul", inputs, y, layer.name)
