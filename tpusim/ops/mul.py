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

import numpy as np

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
        gated = _gate(ql, inputs)
        if gated is not None:
            from tpusim.ops.affine import kernel_constants, per_channel_affine
            x, x_zero_point, scale, axis = gated
            return per_channel_affine(x, axis, kernel_constants(
                scale, -x_zero_point * scale, ql.requant, int(ql.output_qparams.zero_point), ql.out_qmin, ql.out_qmax,
                x.shape[axis])), 0
        return mul_reference(ql, inputs), 0

    def vector_cost(self, layer, in_elements, out_elements, lanes, int8):
        return VectorCost(f"mul+{layer.activation.label}", "none", binary_passes(in_elements, out_elements, lanes),
                          activation_ops=out_elements, requant_ops=out_elements if int8 else 0)

    def export(self, b, layer, inputs, weight, bias, y):
        b.node("Mul", inputs, y, layer.name)


def _gate(ql, inputs) -> tuple | None:
    """(the full 8-bit input, its zero point, the other's centred integers as int64, the axis they run along)
    where the other input is one value per channel of that axis (a squeeze-excitation gate) or a single value:
    the product ``(q_x - z_x)(q_g - z_g)`` is then the per-channel affine ``q_x a_c + b_c`` with
    ``a_c = q_g - z_g`` and ``b_c = -z_x a_c``, the same integers. Else None."""
    shape = tuple(ql.layer.output_shape)
    pairs = list(zip(inputs, ql.input_qparams))
    for (x, x_qp), (g, g_qp) in (pairs, pairs[::-1]):
        if x.shape != shape or x.dtype.itemsize != 1 or g.dtype.itemsize != 1 or g.ndim > x.ndim:
            continue
        g_shape = (1,) * (x.ndim - g.ndim) + g.shape
        axes = [axis for axis, n in enumerate(g_shape) if n != 1]
        if len(axes) > 1:
            continue
        axis = axes[0] if axes else x.ndim - 1
        centred = g.astype(np.int64).reshape(-1) - int(g_qp.zero_point)
        return x, int(x_qp.zero_point), centred, axis
    return None


def mul_reference(ql, inputs) -> np.ndarray:
    """The int32 product of the centred inputs, broadcast, requantized: every other product, and the gate
    path's oracle."""
    from tpusim.quant.qlayer import centered, rescale_output
    qa, qb = ql.input_qparams
    return rescale_output(ql, centered(inputs[0], qa.zero_point) * centered(inputs[1], qb.zero_point))
