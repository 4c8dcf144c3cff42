"""BatchNormalization after a Conv/Gemm/MatMul: folded into that layer's weights and bias
(white paper eq. 9-12), ``W' = W * gamma / sqrt(var + eps)``, ``b' = (b - mean) * gamma / sqrt(var + eps) + beta``.
It leaves no layer of its own."""
from __future__ import annotations

import numpy as np

from tpusim.frontend.context import node_attrs
from tpusim.ops import register
from tpusim.ops.base import Op


@register
class BatchNormFold(Op):
    name = ""
    onnx_types = ("BatchNormalization",)

    def lower(self, ctx, node):
        x, shape = ctx.activation_input(node)
        gamma, beta, mean, var = (ctx.constant(node, i, what).astype(np.float64)
                                  for i, what in enumerate(("scale", "bias", "mean", "var"), start=1))
        eps = float(node_attrs(node).get("epsilon", 1e-5))
        producer = ctx.sole_producer(x)
        if producer is None or producer.op not in ("conv", "gemm") or producer.activation.kind != "none":
            raise ctx.fail(node, "BatchNormalization must directly follow a Conv/Gemm/MatMul whose output nothing "
                                 "else reads, so it can be folded")
        factor = gamma / np.sqrt(var + eps)
        n_out = producer.weight.shape[0]
        if factor.shape != (n_out,):
            raise ctx.fail(node, f"{factor.shape[0]} channels do not match the {n_out} outputs of {producer.name!r}")
        old_bias = np.zeros(n_out) if producer.bias is None else producer.bias.astype(np.float64)
        folded_w = producer.weight.astype(np.float64) * factor.reshape((-1,) + (1,) * (producer.weight.ndim - 1))
        producer.weight = folded_w.astype(np.float32)
        producer.bias = ((old_bias - mean) * factor + beta).astype(np.float32)
        ctx.rename_output(producer, node.output[0])
