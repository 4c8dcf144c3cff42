"""BatchNormalization (inference): ``y = (x - mean) * gamma / sqrt(var + eps) + beta`` per channel (axis 1).

After a Conv/Gemm/MatMul whose output nothing else reads (and that has no fused clamp): folded into
that layer's weights and bias (white paper eq. 9-12), ``W' = W * gamma / sqrt(var + eps)``,
``b' = (b - mean) * gamma / sqrt(var + eps) + beta``; it leaves no layer of its own.

Anywhere else (after an add, a pooling, a clamp, on the graph input): a stand-alone per-channel
scale and shift, ``a = gamma / sqrt(var + eps)``, ``b = beta - mean * a``, i.e. an ``affine`` layer
(:mod:`tpusim.ops.affine`, one vector pass), folded into a preceding affine layer when there is one.
In a QDQ model that quantizes the BatchNormalization's input (ONNX Runtime does when the model was
not run through ``quant_pre_process``), nothing is folded: the conv keeps the model's integers and
the BatchNormalization is that affine layer.
"""
from __future__ import annotations

import numpy as np

from tpusim.frontend.context import node_attrs
from tpusim.ops import register
from tpusim.ops._binary import _fold, add_affine
from tpusim.ops.base import Op


def fold_scale(weight: np.ndarray, factor: np.ndarray) -> np.ndarray:
    """``weight`` (output channels first) times a float64 factor per output channel, rounded to float32
    once: ``(weight.astype(float64) * factor).astype(float32)``, bit for bit, without the two float64
    copies of the weights (ResNet-50's 53 folds made 400 MB of them, half its load time; numpy computes
    in float64 chunk by chunk and writes float32). A new array: the weight may be a model constant that
    other nodes read."""
    folded = np.empty(weight.shape, np.float32)
    np.multiply(weight, factor.reshape((-1,) + (1,) * (weight.ndim - 1)), out=folded, dtype=np.float64,
                casting="unsafe")
    return folded


@register
class BatchNormFold(Op):
    name = ""
    onnx_types = ("BatchNormalization",)

    def lower(self, ctx, node):
        x, shape = ctx.activation_input(node)
        gamma, beta, mean, var = (ctx.constant(node, i, what).astype(np.float64)
                                  for i, what in enumerate(("scale", "bias", "mean", "var"), start=1))
        eps = float(node_attrs(node).get("epsilon", 1e-5))
        if len(shape) < 2 or any(p.shape != (shape[1],) for p in (gamma, beta, mean, var)):
            raise ctx.fail(node, f"parameters of shapes {[tuple(p.shape) for p in (gamma, beta, mean, var)]} are not "
                                 f"one per channel of {tuple(shape)}")
        factor = gamma / np.sqrt(var + eps)
        producer = ctx.sole_producer(x)
        if (producer is not None and producer.op in ("conv", "gemm") and producer.activation.kind == "none"
                and ctx.weights_foldable_across(x)):
            n_out = producer.weight.shape[0]
            channel_axis = 1 if producer.op == "conv" else len(producer.output_shape) - 1
            if n_out == shape[1] and channel_axis == 1:
                old_bias = np.zeros(n_out) if producer.bias is None else producer.bias.astype(np.float64)
                producer.weight = fold_scale(producer.weight, factor)
                producer.bias = ((old_bias - mean) * factor + beta).astype(np.float32)
                ctx.rename_output(producer, node.output[0])
                return
        shift = beta - mean * factor
        if not (ctx.weights_foldable_across(x) and _fold(ctx, x, node, 1, factor, shift)):
            add_affine(ctx, node, x, shape, 1, factor, shift)
