"""Elementwise functions of one 8-bit tensor, as 256-entry tables (shared by the table ops).

Any function of a per-tensor-quantized input is exactly a table over its 256 (or fewer) integers,
built offline with the same float32 dequantize -> f -> quantize steps a QDQ model takes, so the table
is what ONNX Runtime computes element by element. The vector unit looks every element up once: one
pass per vector, one activation op per element and the output write counted as its requantization.
"""
from __future__ import annotations

import numpy as np

from tpusim.ops.base import Op, VectorCost, vectors
from tpusim.quant.arithmetic import dequantize, quantize
from tpusim.quant.qlayer import plain_qlayer


class TableOp(Op):
    """An elementwise op of one tensor: subclasses give ``function`` (float32 in, float32 out)."""

    in_place = True
    fusable = True

    def function(self, layer, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def lower(self, ctx, node):
        x, shape = ctx.activation_input(node)
        ctx.add_simple(node, self.name, [(x, shape)], shape, attrs=self.lowered_attrs(ctx, node))

    def lowered_attrs(self, ctx, node) -> tuple:
        return ()

    def reference(self, layer, inputs):
        return self.function(layer, inputs[0]).astype(np.float32, copy=False)

    def quantize(self, layer, in_qps, y_qp, quant, input_mean):
        x_qp = in_qps[0]
        grid = dequantize(np.arange(x_qp.qmin, x_qp.qmax + 1), x_qp)
        y = layer.activation.apply(self.function(layer, grid).astype(np.float32))
        return plain_qlayer(layer, in_qps, y_qp, lut=quantize(y, y_qp))

    def execute(self, ql, inputs, options):
        return ql.lut[inputs[0].astype(np.int32) - ql.input_qparams[0].qmin], 0

    def vector_cost(self, layer, in_elements, out_elements, lanes, int8):
        return VectorCost(layer.op, "none", vectors(out_elements, lanes), activation_ops=out_elements,
                          requant_ops=out_elements if int8 else 0)
