"""Add of two activations (residual connections), and Add of a constant that is a matrix layer's bias.

Integers: both inputs are rescaled into a common fixed-point domain (``(q - z) << ADD_LEFT_SHIFT``
times ``s_i / (2 max(s_a, s_b))``), summed and requantized. Vector unit: one pass per input vector
(each operand is read once), and every input element is requantized once.
"""
from __future__ import annotations

import numpy as np

from tpusim.ops import register
from tpusim.ops.base import Op, VectorCost, vectors
from tpusim.quant.qlayer import INT32_MAX, INT32_MIN, Requant, centered, plain_qlayer, rescale, rescale_output, scalar

# Headroom bits of the add's common domain: |q - z| <= 255 shifted by 20 stays below 2**28, so the
# two rescaled inputs and their sum fit an int32, and 20 fractional bits make the rescale error
# negligible next to the output's rounding (TensorFlow Lite uses the same layout for 8-bit add).
ADD_LEFT_SHIFT = 20


def fold_bias_add(ctx, node, names: list[str]) -> None:
    """MatMul + Add(constant) (how Linear layers are often exported) becomes one gemm with a bias."""
    x = next(n for n in names if n not in ctx.constants)
    addend = ctx.constants[next(n for n in names if n in ctx.constants)]
    producer = ctx.sole_producer(x)
    if producer is None or producer.op not in ("conv", "gemm") or producer.activation.kind != "none":
        raise ctx.fail(node, "adding a constant is supported only as the bias of a preceding Conv/Gemm/MatMul")
    n_out = producer.weight.shape[0]
    per_channel = addend.reshape(-1) if addend.size in (1, n_out) else None
    if per_channel is None:
        raise ctx.fail(node, f"constant of shape {addend.shape} is not a per-output-channel bias")
    old = np.zeros(n_out, np.float32) if producer.bias is None else producer.bias
    producer.bias = (old + np.broadcast_to(per_channel.astype(np.float32), (n_out,))).astype(np.float32)
    ctx.rename_output(producer, node.output[0])


@register
class Add(Op):
    name = "add"
    onnx_types = ("Add",)
    in_place = True
    fusable = True

    def lower(self, ctx, node):
        names = [ctx.resolve(n) for n in node.input]
        if sum(n in ctx.constants for n in names) == 1:
            fold_bias_add(ctx, node, names)
            return
        a, shape_a = ctx.activation_input(node, 0)
        b, shape_b = ctx.activation_input(node, 1)
        if shape_a != shape_b:
            raise ctx.fail(node, f"broadcasting Add is not supported (shapes {shape_a} and {shape_b})")
        ctx.add_simple(node, self.name, [(a, shape_a), (b, shape_b)], shape_a)

    def reference(self, layer, inputs):
        return inputs[0] + inputs[1]

    def quantize(self, layer, in_qps, y_qp, quant, input_mean):
        scales = [scalar(qp.scale) for qp in in_qps]
        twice_max = 2.0 * max(scales)
        rescales = tuple(Requant.of(s / twice_max) for s in scales)
        requant = Requant.of(twice_max / (2.0**ADD_LEFT_SHIFT * scalar(y_qp.scale)))
        return plain_qlayer(layer, in_qps, y_qp, requant=requant, input_rescales=rescales)

    def execute(self, ql, inputs, options):
        total = np.zeros(ql.layer.output_shape, np.int32)
        for q, qp, r in zip(inputs, ql.input_qparams, ql.input_rescales):
            shifted = centered(q, qp.zero_point) << ADD_LEFT_SHIFT
            total += rescale(shifted, r, 0, INT32_MIN, INT32_MAX)
        return rescale_output(ql, total), 0

    def vector_cost(self, layer, in_elements, out_elements, lanes, int8):
        return VectorCost(f"add+{layer.activation.label}", "none", sum(vectors(e, lanes) for e in in_elements),
                          activation_ops=out_elements if layer.activation.kind != "none" else 0,
                          requant_ops=sum(in_elements) if int8 else 0)

    def export(self, b, layer, inputs, weight, bias, y):
        b.node("Add", inputs, y, layer.name)
