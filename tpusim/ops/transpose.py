"""Transpose of an activation, any permutation that keeps the batch axis first: the NHWC -> NCHW
Transpose tflite2onnx writes in front of a flatten, ShuffleNet's channel shuffle (Reshape to
[N, g, C/g, H, W] -> Transpose(0, 2, 1, 3, 4) -> Reshape back), a transformer's head swaps; any
permutation in a graph exported for one sample and run so (torchvision's ViT runs its attention
sequence-first).

Data movement only: the activation unit assembles each lanes-wide output vector from the permuted
unified-buffer addresses and writes it, one pass per output vector (every element read once and
written once). A permutation that keeps the order of all dimensions larger than 1 (NHWC -> NCHW
of a 1x1 map) moves no byte and is lowered as a reshape, an alias with no instruction.

Integers: an exact copy on the input's grid (``inherits_grid``).
"""
from __future__ import annotations

import numpy as np

from tpusim.frontend.context import node_attrs
from tpusim.ops import register
from tpusim.ops._layout import batch_of_one, copy_cost
from tpusim.ops.base import Op
from tpusim.ops.reshape import add_reshape


@register
class Transpose(Op):
    name = "transpose"
    onnx_types = ("Transpose",)
    inherits_grid = True

    def lower(self, ctx, node):
        x, shape = ctx.activation_input(node)
        rank = len(shape)
        perm = node_attrs(node).get("perm")
        perm = tuple(range(rank))[::-1] if perm is None else tuple(int(p) for p in perm)
        if sorted(perm) != list(range(rank)):
            raise ctx.fail(node, f"perm {list(perm)} is not a permutation of the {rank} axes")
        if perm[0] != 0 and not batch_of_one(ctx):
            raise ctx.fail(node, f"perm {list(perm)} moves the batch axis 0")
        out = tuple(shape[p] for p in perm)
        moved = [p for p in perm if shape[p] != 1]
        if moved == sorted(moved):
            add_reshape(ctx, node, x, shape, out)
            return
        ctx.add_simple(node, self.name, [(x, shape)], out, attrs=(("perm", perm),))

    def reference(self, layer, inputs):
        return np.ascontiguousarray(inputs[0].transpose(layer.attr("perm")))

    def quantize(self, layer, in_qps, y_qp, quant, input_mean):
        from tpusim.quant.qlayer import plain_qlayer
        return plain_qlayer(layer, in_qps, y_qp)

    def execute(self, ql, inputs, options):
        return np.ascontiguousarray(inputs[0].transpose(ql.layer.attr("perm"))), 0

    def vector_cost(self, layer, in_elements, out_elements, lanes, int8):
        return copy_cost("transpose", out_elements, lanes)

    def export(self, b, layer, inputs, weight, bias, y):
        b.node("Transpose", inputs, y, layer.name, perm=list(layer.attr("perm")))
