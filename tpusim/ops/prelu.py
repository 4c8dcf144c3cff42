"""PRelu, ``x`` for ``x >= 0`` else ``slope * x``.

One slope (torch's default ``nn.PReLU()``, slope shape [1]) is a LeakyRelu: the ``leakyrelu`` table
(:mod:`tpusim.ops.leakyrelu`). A slope per channel (shape [C,1,1] / [1,C,1,1] against NCHW, [C]
against the last axis) is the ``prelu`` layer, with a sign-split integer rule rather than a C x 256
table: the non-negative side is requantized by the per-tensor multiplier ``s_x / s_y`` and the
negative side by the per-channel ``s_x |slope_c| / s_y`` (the centred input's sign flipped where the
slope is negative). That is the per-channel multiplier vector a conv's per-channel requantization
already streams, chosen by the sign of each element, so it costs one pass and C multipliers instead of
C tables of 256 bytes loaded per channel, and the slopes keep 31-bit precision. The quantized layer
stores the negative side in ``requant`` and the non-negative side in ``input_rescales[0]``. Vector
unit: one pass per vector (sign test, multiply, rounding shift), every element requantized once.
"""
from __future__ import annotations

import numpy as np

from tpusim.ops import register
from tpusim.ops._binary import channel_constant
from tpusim.ops._expr import X
from tpusim.ops._table import apply_unary
from tpusim.ops.affine import channel_shape
from tpusim.ops.base import Op, VectorCost, vectors


@register
class PRelu(Op):
    name = "prelu"
    onnx_types = ("PRelu",)
    in_place = True
    fusable = True

    def lower(self, ctx, node):
        x, shape = ctx.activation_input(node)
        slope = ctx.constant(node, 1, "slope")
        found = channel_constant(slope, shape)
        if found is None:
            raise ctx.fail(node, f"slope of shape {tuple(slope.shape)} is neither one value nor one per channel of "
                                 f"{tuple(shape)}")
        axis, values = found
        if axis is None:
            alpha = float(np.float32(values[0]))
            apply_unary(ctx, node, x, shape, ("fn", "leakyrelu", (("alpha", alpha),), X))
            return
        ctx.add_simple(node, self.name, [(x, shape)], shape, axis=axis, weight=values.astype(np.float32))

    def reference(self, layer, inputs):
        x = inputs[0]
        return np.where(x >= 0, x, x * layer.weight.reshape(channel_shape(layer)))

    def quantize(self, layer, in_qps, y_qp, quant, input_mean):
        from tpusim.quant.qlayer import Requant, plain_qlayer, scalar
        s_x, s_y = scalar(in_qps[0].scale), scalar(y_qp.scale)
        negative = Requant.of(s_x * np.abs(layer.weight.astype(np.float64)) / s_y)
        return plain_qlayer(layer, in_qps, y_qp, requant=negative, input_rescales=(Requant.of(s_x / s_y),))

    def execute(self, ql, inputs, options):
        from tpusim.quant.qlayer import centered, clamp_output, rescale
        y_qp = ql.output_qparams
        z_y = int(y_qp.zero_point)
        c = centered(inputs[0], ql.input_qparams[0].zero_point)
        positive = rescale(c, ql.input_rescales[0], z_y, y_qp.qmin, y_qp.qmax)
        sign = np.where(ql.layer.weight < 0, -1, 1).astype(np.int32).reshape(channel_shape(ql.layer))
        negative = rescale(c * sign, ql.requant, z_y, y_qp.qmin, y_qp.qmax, channel_axis=ql.layer.axis)
        return clamp_output(ql, np.where(c >= 0, positive, negative)), 0

    def vector_cost(self, layer, in_elements, out_elements, lanes, int8):
        return VectorCost(f"prelu+{layer.activation.label}", "none", vectors(out_elements, lanes),
                          activation_ops=out_elements, requant_ops=out_elements if int8 else 0)

    def export(self, b, layer, inputs, weight, bias, y):
        slope = b.const(f"{layer.name}_slope", layer.weight.astype(np.float32).reshape(channel_shape(layer)))
        b.node("PRelu", [inputs[0], slope], y, layer.name)
