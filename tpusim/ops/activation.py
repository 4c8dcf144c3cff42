"""Relu and Clip (and Max/Min with a scalar constant, lowered by :mod:`tpusim.ops._binary`): a clamp,
fused into the layer that produces its input when nothing else reads that tensor (the clamp is then
only a tighter [qmin, qmax] of that layer's requantized output), otherwise a stand-alone
``activation`` layer: an integer clamp on its input's grid, one vector pass.

A clamp that meets an already clamped producer (Relu6 exported as ``Max(x, 0)`` then ``Min(x, 6)``,
or a Relu after a Clip) intersects the two intervals, which is the composition of the two clamps; a
stand-alone clamp producer is tightened the same way. Disjoint intervals (the second clamp maps
everything to one bound) stay two layers.
"""
from __future__ import annotations

import math

import numpy as np

from tpusim import ops
from tpusim.frontend.context import node_attrs
from tpusim.ir import Activation
from tpusim.ops import register
from tpusim.ops.base import Op, VectorCost, vectors


def activation_node(b, activation: Activation, x: str, y: str, name: str) -> None:
    """The clamp as an ONNX Relu or Clip node."""
    if activation.kind == "relu":
        b.node("Relu", [x], y, name)
        return
    lo = b.const(f"{name}_min", np.float32(activation.lo)) if math.isfinite(activation.lo) else ""
    hi = b.const(f"{name}_max", np.float32(activation.hi)) if math.isfinite(activation.hi) else ""
    b.node("Clip", [x, lo, hi], y, name)


def intersect(first: Activation, then: Activation) -> Activation | None:
    """The one clamp equal to ``first`` followed by ``then``, or None when their intervals are disjoint."""
    if first.kind == "none":
        return then
    lo, hi = max(first.lo, then.lo), min(first.hi, then.hi)
    if lo > hi:
        return None
    return Activation("relu" if (lo, hi) == (0.0, math.inf) else "clip", float(lo), float(hi))


def fuse_or_add_activation(ctx, node, activation: Activation, index: int = 0) -> None:
    """Apply clamp ``activation`` to input ``index`` of ``node``: fused into its producer when possible."""
    x, shape = ctx.activation_input(node, index)
    producer = ctx.sole_producer(x)
    if producer is not None:
        module = ops.op(producer.op)
        if module.fusable or (module.applies_activation and module.inherits_grid):
            merged = intersect(producer.activation, activation)
            if merged is not None:
                producer.activation = merged
                ctx.rename_output(producer, node.output[0])
                return
    ctx.add_simple(node, "activation", [(x, shape)], shape, activation=activation)


@register
class Clamp(Op):
    name = "activation"
    onnx_types = ("Relu", "Clip")
    inherits_grid = True
    in_place = True
    applies_activation = True

    def lower(self, ctx, node):
        if node.op_type == "Relu":
            fuse_or_add_activation(ctx, node, Activation("relu", 0.0, math.inf))
            return
        if ctx.opset < 11:
            attrs = node_attrs(node)
            lo, hi = attrs.get("min", -math.inf), attrs.get("max", math.inf)
        else:
            lo_arr = ctx.optional_constant(node, 1, "min")
            hi_arr = ctx.optional_constant(node, 2, "max")
            lo = -math.inf if lo_arr is None else float(lo_arr)
            hi = math.inf if hi_arr is None else float(hi_arr)
        if lo > hi:
            raise ctx.fail(node, f"min {lo} > max {hi}")
        kind = "relu" if lo == 0.0 and hi == math.inf else "clip"
        fuse_or_add_activation(ctx, node, Activation(kind, float(lo), float(hi)))

    def reference(self, layer, inputs):
        return inputs[0]

    def quantize(self, layer, in_qps, y_qp, quant, input_mean):
        from tpusim.quant.qlayer import plain_qlayer
        return plain_qlayer(layer, in_qps, y_qp)

    def execute(self, ql, inputs, options):
        from tpusim.quant.qlayer import clamp_output
        return clamp_output(ql, inputs[0]), 0

    def vector_cost(self, layer, in_elements, out_elements, lanes, int8):
        return VectorCost(layer.activation.label, "none", vectors(out_elements, lanes), activation_ops=out_elements)

    def export(self, b, layer, inputs, weight, bias, y):
        activation_node(b, layer.activation, inputs[0], y, layer.name)
