"""Affine: ``y = x * a + b`` with one scale ``a`` and shift ``b`` per channel along ``axis``.

It is what an activation and a per-channel constant make when they cannot fold into a matrix layer
(:mod:`tpusim.ops._binary`): Mul by a constant, Div by a constant (Mul by ``1 / c``), Add/Sub of a
constant, and a stand-alone BatchNormalization (one that does not follow a Conv/Gemm/MatMul,
:mod:`tpusim.ops.batchnorm`); later such steps fold into the same layer. The layer holds ``a`` in
``weight`` and ``b`` in ``bias`` (both shaped (C,)).

Integers, as a matrix layer with one weight per output channel and K = 1 (:mod:`tpusim.ops._matrix`):
``a`` is quantized like a weight (symmetric int8, per channel or per tensor as the weights are;
per channel each scale is exactly ``|a_c| / 127``), ``b`` is an int32 on ``s_x * s_a`` with the input
zero point's term ``-z_x a_q`` folded in, the accumulator ``q_x a_q + b'`` is exact, and one dyadic
multiplier ``s_x s_a / s_y`` per channel (or per tensor) requantizes it. The quantized layer keeps the
dequantized ``a`` and ``b`` as its float constants, so the QDQ export computes what the chip does.
Vector unit: one pass per vector (a multiply-add per element) with the requantization in the same pass.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from tpusim.errors import ModelError
from tpusim.ops import register
from tpusim.ops._matrix import _bias_safe_weight_qparams
from tpusim.ops.base import Op, VectorCost, vectors


def channel_shape(layer) -> tuple[int, ...]:
    """The shape (C, 1, ..., 1) that broadcasts a per-channel vector along the layer's axis."""
    rank = len(layer.output_shape)
    shape = [1] * (rank - layer.axis)
    shape[0] = layer.weight.size
    return tuple(shape)


@register
class Affine(Op):
    name = "affine"
    onnx_types = ()
    in_place = True
    fusable = True

    def lower(self, ctx, node):  # made by the binary ops and BatchNormalization, never from its own node
        raise ctx.fail(node, "affine layers are not lowered from an ONNX node of their own")

    def reference(self, layer, inputs):
        shape = channel_shape(layer)
        return inputs[0] * layer.weight.reshape(shape) + layer.bias.reshape(shape)

    def quantize(self, layer, in_qps, y_qp, quant, input_mean):
        from tpusim.quant.arithmetic import bias_to_int32, dequantize, quantize, weight_qparams
        from tpusim.quant.qlayer import INT32_MAX, INT32_MIN, QLayer, Requant, activation_bounds, scalar
        x_qp = in_qps[0]
        a_qp = weight_qparams(layer.weight, quant.weights, axis=0, name=f"{layer.name} scale")
        a_qp = _bias_safe_weight_qparams(layer, a_qp, x_qp)
        a_q = quantize(layer.weight, a_qp)
        channels = layer.weight.size
        s_x, z_x = scalar(x_qp.scale), int(x_qp.zero_point)
        s_a = np.broadcast_to(a_qp.scale, (channels,))
        bias_q = bias_to_int32(layer.bias, s_a, s_x)
        acc_bias = bias_q.astype(np.int64) - z_x * a_q.astype(np.int64)
        if acc_bias.min() < INT32_MIN or acc_bias.max() > INT32_MAX:
            raise ModelError(f"{layer.name}: shift with the folded zero-point term does not fit an int32 accumulator")
        stored = dataclasses.replace(layer, weight=dequantize(a_q, a_qp),
                                     bias=(bias_q.astype(np.float64) * s_a * s_x).astype(np.float32))
        out_qmin, out_qmax = activation_bounds(y_qp, layer)
        return QLayer(layer=stored, input_qparams=in_qps, output_qparams=y_qp, out_qmin=out_qmin, out_qmax=out_qmax,
                      weight_q=a_q, weight_qparams=a_qp, bias_q=bias_q, acc_bias=acc_bias.astype(np.int32),
                      requant=Requant.of(s_x * a_qp.scale / scalar(y_qp.scale)))

    def execute(self, ql, inputs, options):
        from tpusim.quant.qlayer import INT32_MAX, INT32_MIN, rescale_output
        shape = channel_shape(ql.layer)
        acc = inputs[0].astype(np.int64) * ql.weight_q.astype(np.int64).reshape(shape) + ql.acc_bias.reshape(shape)
        acc = np.clip(acc, INT32_MIN, INT32_MAX).astype(np.int32)
        return rescale_output(ql, acc, channel_axis=ql.layer.axis), 0

    def vector_cost(self, layer, in_elements, out_elements, lanes, int8):
        return VectorCost(f"affine+{layer.activation.label}", "none", vectors(out_elements, lanes),
                          activation_ops=out_elements, requant_ops=out_elements if int8 else 0)

    def export(self, b, layer, inputs, weight, bias, y):
        shape = channel_shape(layer)
        scale = b.const(f"{layer.name}_scale", layer.weight.astype(np.float32).reshape(shape))
        if not np.any(layer.bias):
            b.node("Mul", [inputs[0], scale], y, layer.name)
            return
        shift = b.const(f"{layer.name}_shift", layer.bias.astype(np.float32).reshape(shape))
        b.node("Mul", [inputs[0], scale], f"{y}__scaled", f"{layer.name}_mul")
        b.node("Add", [f"{y}__scaled", shift], y, layer.name)
