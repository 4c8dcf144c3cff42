"""GlobalAveragePool: the mean over H x W per channel.

Integers: the centred input summed per channel in int32, then one dyadic rescale by
``s_x / (s_y H W)``. Vector unit: one pass per input vector (every element is read once and added).
"""
from __future__ import annotations

import numpy as np

from tpusim import jit
from tpusim.frontend.context import require_4d
from tpusim.ops import register
from tpusim.ops.base import Op, VectorCost, vectors


@jit.kernel(cache=True)
def _channels_last_sums(xt, zero_point, sums):
    """sums[b, c] = sum over (h, w) of xt[b, h, w, c] - zero_point, modulo 2**32 like numpy's int32 sum."""
    for b in range(xt.shape[0]):
        total = sums[b]
        total[:] = 0
        for h in range(xt.shape[1]):
            for w in range(xt.shape[2]):
                pixel = xt[b, h, w]
                for c in range(pixel.size):
                    total[c] += np.int32(pixel[c]) - zero_point


def channel_sums(x: np.ndarray, zero_point: int) -> np.ndarray:
    """(B, C, 1, 1) int32 sums of x - zero_point over H x W. Channels-last memory (what the integer conv
    returns behind its NCHW shape) is summed in one compiled pass; else numpy's, the oracle."""
    from tpusim.quant.qlayer import centered
    xt = x.transpose(0, 2, 3, 1)
    if not xt.flags.c_contiguous:
        return centered(x, zero_point).sum(axis=(2, 3), keepdims=True, dtype=np.int32)
    sums = np.empty((x.shape[0], x.shape[1]), np.int32)
    _channels_last_sums(xt, np.int32(zero_point), sums)
    return sums.reshape(*sums.shape, 1, 1)


@register
class GlobalAveragePool(Op):
    name = "global_avgpool"
    onnx_types = ("GlobalAveragePool",)
    fusable = True

    def lower(self, ctx, node):
        x, shape = ctx.activation_input(node)
        require_4d(ctx, node, shape)
        ctx.add_simple(node, self.name, [(x, shape)], (shape[0], shape[1], 1, 1))

    def reference(self, layer, inputs):
        return inputs[0].mean(axis=(2, 3), keepdims=True)

    def quantize(self, layer, in_qps, y_qp, quant, input_mean):
        from tpusim.quant.qlayer import Requant, plain_qlayer, scalar
        _, _, h, w = layer.input_shapes[0]
        return plain_qlayer(layer, in_qps, y_qp, requant=Requant.of(scalar(in_qps[0].scale) / (scalar(y_qp.scale) * h * w)))

    def execute(self, ql, inputs, options):
        from tpusim.quant.qlayer import rescale_output
        return rescale_output(ql, channel_sums(inputs[0], int(ql.input_qparams[0].zero_point))), 0

    def vector_cost(self, layer, in_elements, out_elements, lanes, int8):
        return VectorCost(layer.activation.label, "global_avg", vectors(in_elements[0], lanes),
                          activation_ops=out_elements if layer.activation.kind != "none" else 0,
                          pool_ops=in_elements[0], requant_ops=out_elements if int8 else 0)

    def export(self, b, layer, inputs, weight, bias, y):
        b.node("GlobalAveragePool", inputs, y, layer.name)
