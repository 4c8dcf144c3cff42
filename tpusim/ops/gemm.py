"""Gemm (transB, alpha, beta) and MatMul with a constant second operand, on the matrix unit.

Weights are stored (N, K); any leading dims of the input fold into M (``Layer.gemm``), so a ViT or
ConvNeXt linear layer on a (batch, tokens, features) tensor is one GEMM with M = batch x tokens.
A constant Add after a MatMul becomes its bias (see :mod:`tpusim.ops.add`). A MatMul whose second
operand is computed too (attention) is lowered by :mod:`tpusim.ops.matmul`.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from tpusim.derived import derived_from
from tpusim.frontend.context import LowerContext, node_attrs
from tpusim.ir import Layer
from tpusim.ops import register
from tpusim.ops._matrix import accumulate, quantize_matrix_layer
from tpusim.ops.base import ExecOptions, Op

if TYPE_CHECKING:  # annotations only
    from tpusim.quant.qlayer import QLayer


_TRANSPOSE_ROWS = 16


def transposed(matrix: np.ndarray) -> np.ndarray:
    """``np.ascontiguousarray(matrix.T)``, copied 16 rows at a time: numpy's single pass over the whole
    matrix reads a row apart for every element written and takes 2-9x longer on BERT's and the MLP's
    weights (BERT-base's lowering spent 0.3 s on it)."""
    out = np.empty(matrix.shape[::-1], matrix.dtype)
    for row in range(0, matrix.shape[0], _TRANSPOSE_ROWS):
        out[:, row:row + _TRANSPOSE_ROWS] = matrix[row:row + _TRANSPOSE_ROWS].T
    return out


def _requantized_gemm(ql: QLayer, acc_bits: int, x_dtype: np.dtype):
    """The int8 kernel with the requantization fused in, prepared once per layer, accumulator width and
    activation dtype."""
    from tpusim.kernels.gemm import RequantizedGemm
    from tpusim.quant.arithmetic import storage_dtype
    return RequantizedGemm(ql.weight_q[None], ql.acc_bias, acc_bits, ql.requant.m0, ql.requant.shift,
                           int(ql.output_qparams.zero_point), ql.out_qmin, ql.out_qmax,
                           storage_dtype(ql.out_qmin, ql.out_qmax), x_dtype)


@register
class Gemm(Op):
    name = "gemm"
    onnx_types = ("Gemm", "MatMul")
    matrix = True
    accumulates = True
    fusable = True

    def lower(self, ctx: LowerContext, node) -> None:
        if node.op_type == "MatMul":
            self._lower_matmul(ctx, node)
            return
        x, shape = ctx.activation_input(node)
        attrs = node_attrs(node)
        if int(attrs.get("transA", 0)):
            raise ctx.fail(node, "transA=1 is not supported")
        if len(shape) != 2:
            raise ctx.fail(node, f"expected a 2-D input, got shape {shape}")
        b = ctx.constant(node, 1, "weight").astype(np.float32, copy=False)  # (no layer writes into a weight)
        weight = b if int(attrs.get("transB", 0)) else transposed(b)
        alpha = np.float32(attrs.get("alpha", 1.0))
        weight = np.ascontiguousarray(weight if alpha == 1 else weight * alpha)
        n, k = weight.shape
        if shape[1] != k:
            raise ctx.fail(node, f"weight {b.shape} does not fit input {shape}")
        c = ctx.optional_constant(node, 2, "bias")
        bias = None
        if c is not None:
            if c.size not in (1, n):
                raise ctx.fail(node, f"bias of shape {c.shape} is not a per-output vector")
            bias = np.broadcast_to(c.astype(np.float32).reshape(-1), (n,)) * np.float32(attrs.get("beta", 1.0))
            bias = np.ascontiguousarray(bias)
        ctx.add_simple(node, self.name, [(x, shape)], (shape[0], n), weight=weight, bias=bias)

    def _lower_matmul(self, ctx: LowerContext, node) -> None:
        if not ctx.is_constant(node, 1):
            # Both operands computed (attention's Q K^T and P V): see tpusim.ops.matmul.
            from tpusim.ops import op

            op("matmul").lower(ctx, node)
            return
        x, shape = ctx.activation_input(node)
        b = ctx.constant(node, 1, "weight (second MatMul operand)")
        if b.ndim != 2:
            raise ctx.fail(node, f"only a 2-D constant second operand is supported, got shape {b.shape}")
        k, n = b.shape
        if shape[-1] != k:
            raise ctx.fail(node, f"weight {b.shape} does not fit input {shape}")
        ctx.add_simple(node, self.name, [(x, shape)], tuple(shape[:-1]) + (n,),
                       weight=transposed(b.astype(np.float32, copy=False)))

    def reference(self, layer: Layer, inputs):
        k = layer.weight.shape[1]
        y = inputs[0].reshape(-1, k) @ layer.weight.T
        if layer.bias is not None:
            y = y + layer.bias
        return y.reshape(layer.output_shape)

    def quantize(self, layer, in_qps, y_qp, quant, input_mean):
        return quantize_matrix_layer(layer, in_qps[0], y_qp, quant, input_mean)

    def execute(self, ql: QLayer, inputs, options: ExecOptions):
        k = ql.weight_q.shape[1]
        x = inputs[0].reshape(1, -1, k)
        if options.engine == "int8-gemm" and options.acc_bits <= 32:
            gemm = derived_from(ql, ("requantized", options.acc_bits, x.dtype.str),
                                lambda: _requantized_gemm(ql, options.acc_bits, x.dtype))
            y, wrapped = gemm(x)
            return y.reshape(ql.layer.output_shape), wrapped
        from tpusim.quant.qlayer import rescale_output
        acc, wrapped = accumulate(x, ql.weight_q[None], ql.acc_bias, options.acc_bits, options.engine)
        return rescale_output(ql, acc[0].reshape(ql.layer.output_shape), -1), wrapped

    def export(self, b, layer, inputs, weight, bias, y):
        if len(layer.input_shapes[0]) == 2:
            b.node("Gemm", [inputs[0], weight] + ([bias] if bias else []), y, layer.name, transB=1)
            return
        # Rank > 2: MatMul on the (K, N) weight, then the bias broadcast over the last axis.
        weight_t = b.node("Transpose", [weight], f"{layer.name}_Wt", f"{layer.name}_Wt", perm=[1, 0])
        if bias is None:
            b.node("MatMul", [inputs[0], weight_t], y, layer.name)
            return
        product = b.node("MatMul", [inputs[0], weight_t], f"{y}__matmul", layer.name)
        b.node("Add", [product, bias], y, f"{layer.name}_bias")
