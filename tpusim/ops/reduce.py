"""ReduceMean and ReduceMax over any axes but the batch (``axes`` an attribute before opset 18, an
input from 18; ``keepdims``). Over the spatial axes (2, 3) of an NCHW tensor they are global
average and global max pooling: the dynamo exporter writes ResNet's pooling as ReduceMean.

Integers:
- mean: the centred inputs ``q - z_x`` summed over the reduced axes in int32, then one dyadic
  rescale by ``s_x / (s_y n)`` (n reduced elements per output) to the output's own grid, as
  :mod:`tpusim.ops.global_avgpool` does;
- max: the integer maximum, on the input's grid (``inherits_grid``, like max pooling).
Vector unit: one pass per input vector (every element is read once and added or compared), plus
the mean's requantization of each output element.
"""
from __future__ import annotations

import math

import numpy as np

from tpusim.frontend.context import node_attrs
from tpusim.ops import register
from tpusim.ops._layout import axes_argument, normalized_axes, require_batch_kept
from tpusim.ops.base import Op, VectorCost, vectors


def _lower_reduce(ctx, node, op: str) -> None:
    x, shape = ctx.activation_input(node)
    attrs = node_attrs(node)
    axes = axes_argument(ctx, node, 1, 18)
    if axes is None:
        if ctx.opset >= 18 and int(attrs.get("noop_with_empty_axes", 0)):
            raise ctx.fail(node, "noop_with_empty_axes=1 without axes is not supported")
        axes = list(range(len(shape)))
    axes = tuple(sorted(normalized_axes(ctx, node, axes, len(shape))))
    require_batch_kept(ctx, node, axes, "reduces over")
    keepdims = bool(int(attrs.get("keepdims", 1)))
    out = tuple(1 if i in axes else d for i, d in enumerate(shape) if keepdims or i not in axes)
    ctx.add_simple(node, op, [(x, shape)], out, attrs=(("axes", axes), ("keepdims", keepdims)))


def _pooling_label(layer, kind: str) -> str:
    axes = layer.attr("axes")
    if len(layer.input_shapes[0]) == 4 and axes == (2, 3):
        return f"global_{kind}"
    return f"{kind}{list(axes)}"


def _reduce_cost(layer, in_elements, out_elements, lanes, int8, kind: str) -> VectorCost:
    return VectorCost(layer.activation.label, _pooling_label(layer, kind), vectors(in_elements[0], lanes),
                      activation_ops=out_elements if layer.activation.kind != "none" else 0,
                      pool_ops=in_elements[0], requant_ops=out_elements if int8 and kind == "avg" else 0)


def _export(b, layer, inputs, y, op_type: str) -> None:
    # The export is written at opset 17, where both ops take their axes as an attribute.
    b.node(op_type, inputs, y, layer.name, axes=list(layer.attr("axes")), keepdims=int(layer.attr("keepdims")))


@register
class ReduceMean(Op):
    name = "reduce_mean"
    onnx_types = ("ReduceMean",)
    fusable = True

    def lower(self, ctx, node):
        _lower_reduce(ctx, node, self.name)

    def reference(self, layer, inputs):
        return inputs[0].mean(axis=layer.attr("axes"), keepdims=layer.attr("keepdims"))

    def quantize(self, layer, in_qps, y_qp, quant, input_mean):
        from tpusim.quant.qlayer import Requant, plain_qlayer, scalar
        count = math.prod(layer.input_shapes[0][a] for a in layer.attr("axes"))
        real = scalar(in_qps[0].scale) / (scalar(y_qp.scale) * count)
        return plain_qlayer(layer, in_qps, y_qp, requant=Requant.of(real))

    def execute(self, ql, inputs, options):
        from tpusim.quant.qlayer import centered, rescale_output
        layer = ql.layer
        sums = centered(inputs[0], ql.input_qparams[0].zero_point).sum(axis=layer.attr("axes"),
                                                                       keepdims=layer.attr("keepdims"), dtype=np.int32)
        return rescale_output(ql, sums), 0

    def vector_cost(self, layer, in_elements, out_elements, lanes, int8):
        return _reduce_cost(layer, in_elements, out_elements, lanes, int8, "avg")

    def export(self, b, layer, inputs, weight, bias, y):
        _export(b, layer, inputs, y, "ReduceMean")


@register
class ReduceMax(Op):
    name = "reduce_max"
    onnx_types = ("ReduceMax",)
    inherits_grid = True
    fusable = True

    def lower(self, ctx, node):
        _lower_reduce(ctx, node, self.name)

    def reference(self, layer, inputs):
        return inputs[0].max(axis=layer.attr("axes"), keepdims=layer.attr("keepdims"))

    def quantize(self, layer, in_qps, y_qp, quant, input_mean):
        from tpusim.quant.qlayer import plain_qlayer
        return plain_qlayer(layer, in_qps, y_qp)

    def execute(self, ql, inputs, options):
        from tpusim.quant.qlayer import clamp_output
        layer = ql.layer
        return clamp_output(ql, inputs[0].max(axis=layer.attr("axes"), keepdims=layer.attr("keepdims"))), 0

    def vector_cost(self, layer, in_elements, out_elements, lanes, int8):
        return _reduce_cost(layer, in_elements, out_elements, lanes, int8, "max")

    def export(self, b, layer, inputs, weight, bias, y):
        _export(b, layer, inputs, y, "ReduceMax")
