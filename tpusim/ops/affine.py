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

from tpusim import jit
from tpusim.derived import derived_from
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
        channels = inputs[0].shape[ql.layer.axis]
        constants = derived_from(ql, ("affine", channels), lambda: kernel_constants(
            ql.weight_q, ql.acc_bias, ql.requant, int(ql.output_qparams.zero_point), ql.out_qmin, ql.out_qmax,
            channels))
        return per_channel_affine(inputs[0], ql.layer.axis, constants), 0

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


@jit.kernel(cache=True, nogil=True, imports={"requantize_value": "tpusim.kernels.rounding",
                                             "INT32_MIN": "tpusim.quant.qlayer", "INT32_MAX": "tpusim.quant.qlayer"})
def _affine_kernel(x, a, b, multiplier, right, half, zero_point, qmin, qmax, out):
    """out[o, c, i] = the accumulator ``x[o, c, i] * a[c] + b[c]``, saturated to int32, requantized with channel
    c's constants; x and out (outer, channels, inner) C-contiguous. The inner loop runs over a contiguous row:
    along the channels when they are the last axis in memory (inner == 1), else along each channel's run."""
    outer, channels, inner = x.shape
    if inner == 1:
        rows, targets = x.reshape(outer, channels), out.reshape(outer, channels)
        for o in range(outer):
            src, dst = rows[o], targets[o]
            for c in range(channels):
                acc = min(max(np.int64(src[c]) * a[c] + b[c], INT32_MIN), INT32_MAX)
                dst[c] = requantize_value(acc, multiplier[c], right[c], half[c], zero_point, qmin, qmax)
        return
    for o in range(outer):
        for c in range(channels):
            src, dst = x[o, c], out[o, c]
            ac, bc, m, r, h = a[c], b[c], multiplier[c], right[c], half[c]
            for i in range(inner):
                acc = min(max(np.int64(src[i]) * ac + bc, INT32_MIN), INT32_MAX)
                dst[i] = requantize_value(acc, m, r, h, zero_point, qmin, qmax)


def kernel_constants(a: np.ndarray, b: np.ndarray, requant, zero_point: int, qmin: int, qmax: int,
                     channels: int) -> tuple:
    """:func:`per_channel_affine`'s constants: integer scales ``a`` and shifts ``b`` (one, or one per channel),
    the requantization (a :class:`~tpusim.quant.qlayer.Requant`) and the output grid [qmin, qmax] around
    ``zero_point``."""
    from tpusim.kernels.rounding import requantize_constants
    per_channel = (np.ascontiguousarray(np.broadcast_to(np.asarray(values, np.int64).reshape(-1), channels))
                   for values in (a, b))
    return (*per_channel, *requantize_constants(requant.m0, requant.shift, channels),
            np.int64(zero_point), np.int64(qmin), np.int64(qmax))


def per_channel_affine(x: np.ndarray, axis: int, constants: tuple) -> np.ndarray:
    """The integers ``x * a[c] + b[c]`` of channel c along ``axis``, saturated to int32 and requantized
    (:func:`kernel_constants`), in x's own memory order (channels last after a conv), which the next conv
    takes as it is."""
    from tpusim.quant.arithmetic import storage_dtype
    from tpusim.tensor_ops import in_memory_order
    flat, back = in_memory_order(x)
    axis = int(back[axis % x.ndim])
    channels = flat.shape[axis]
    blocks = flat.reshape(int(np.prod(flat.shape[:axis])), channels, int(np.prod(flat.shape[axis + 1 :])))
    out = np.empty(flat.shape, storage_dtype(int(constants[-2]), int(constants[-1])))
    _affine_kernel(blocks, *constants, out.reshape(blocks.shape))
    return out.transpose(back)


def affine_reference(ql, q: np.ndarray) -> np.ndarray:
    """Numpy oracle of :meth:`Affine.execute`: the int64 accumulator, saturated to int32, requantized."""
    from tpusim.quant.qlayer import INT32_MAX, INT32_MIN, rescale_output
    shape = channel_shape(ql.layer)
    acc = q.astype(np.int64) * ql.weight_q.astype(np.int64).reshape(shape) + ql.acc_bias.reshape(shape)
    return rescale_output(ql, np.clip(acc, INT32_MIN, INT32_MAX).astype(np.int32), channel_axis=ql.layer.axis)
