"""Pad (opset >= 11: ``pads`` and the constant value as inputs, ``axes`` from opset 18) in modes
constant, reflect and edge; negative pads crop. Opsets before 11, where the pads are an
attribute, reach the front end converted by canonicalisation.

Data movement only: the activation unit writes every output vector once, reading the input
elements it holds (reflect/edge/wrap read theirs from the mirrored addresses) and taking the
constant from a register: one pass per output vector.

Integers: the output keeps the input's grid (``inherits_grid``), copied exactly; the constant is
the pad value quantized onto that grid, i.e. the input's zero point for a pad value of 0 (exactly
what ONNX Runtime's Q(Pad(DQ(x))) computes). A pad value outside the input's range saturates.
"""
from __future__ import annotations

import numpy as np

from tpusim.frontend.context import node_attrs
from tpusim.ops import register
from tpusim.ops._layout import axes_argument, copy_cost, normalized_axes, require_batch_kept
from tpusim.ops.base import Op
from tpusim.ops.reshape import add_reshape

# ONNX's modes are numpy's (reflect excludes the edge element, as numpy's does). Opset 19's "wrap" is
# left out: the QDQ export that checks the integers is written at opset 17.
_NUMPY_MODE = {"constant": "constant", "reflect": "reflect", "edge": "edge"}


def _pad(x: np.ndarray, layer, value) -> np.ndarray:
    pads = layer.attr("pads")
    grow = [(max(b, 0), max(e, 0)) for b, e in pads]
    mode = _NUMPY_MODE[layer.attr("mode")]
    y = np.pad(x, grow, mode=mode, constant_values=value) if mode == "constant" else np.pad(x, grow, mode=mode)
    crop = tuple(slice(-min(b, 0), y.shape[i] + min(e, 0)) for i, (b, e) in enumerate(pads))
    return np.ascontiguousarray(y[crop])


@register
class Pad(Op):
    name = "pad"
    onnx_types = ("Pad",)
    inherits_grid = True

    def lower(self, ctx, node):
        x, shape = ctx.activation_input(node)
        rank = len(shape)
        mode = node_attrs(node).get("mode", "constant")
        if mode not in _NUMPY_MODE:
            raise ctx.fail(node, f"mode {mode!r} is not supported")
        flat = [int(v) for v in ctx.constant(node, 1, "pads").reshape(-1)]
        value = ctx.optional_constant(node, 2, "constant_value")
        value = 0.0 if value is None or value.size == 0 else float(value.reshape(-1)[0])
        axes = axes_argument(ctx, node, 3, 18)
        axes = tuple(range(rank)) if axes is None else normalized_axes(ctx, node, axes, rank)
        if len(flat) != 2 * len(axes):
            raise ctx.fail(node, f"{len(flat)} pads for {len(axes)} axes")
        pads = [(0, 0)] * rank
        for i, axis in enumerate(axes):
            pads[axis] = (flat[i], flat[i + len(axes)])
        require_batch_kept(ctx, node, [i for i, p in enumerate(pads) if p != (0, 0)], "Pad changes")
        out = tuple(d + b + e for d, (b, e) in zip(shape, pads))
        if min(out) < 1:
            raise ctx.fail(node, f"pads {flat} crop shape {shape} to nothing")
        if mode == "reflect" and any(max(b, e) >= d for d, (b, e) in zip(shape, pads)):
            raise ctx.fail(node, f"reflect pads {flat} must be smaller than the dims of {shape}")
        if all(p == (0, 0) for p in pads):
            add_reshape(ctx, node, x, shape, shape)
            return
        ctx.add_simple(node, self.name, [(x, shape)], out,
                       attrs=(("pads", tuple(pads)), ("mode", mode), ("value", value)))

    def reference(self, layer, inputs):
        return _pad(inputs[0], layer, np.float32(layer.attr("value")))

    def quantize(self, layer, in_qps, y_qp, quant, input_mean):
        from tpusim.quant.qlayer import plain_qlayer
        return plain_qlayer(layer, in_qps, y_qp)

    def execute(self, ql, inputs, options):
        from tpusim.quant.arithmetic import quantize
        value_q = quantize(np.float32(ql.layer.attr("value")), ql.input_qparams[0])
        return _pad(inputs[0], ql.layer, value_q), 0

    def vector_cost(self, layer, in_elements, out_elements, lanes, int8):
        return copy_cost(f"pad:{layer.attr('mode')}", out_elements, lanes)

    def export(self, b, layer, inputs, weight, bias, y):
        pads = layer.attr("pads")
        flat = np.array([p[0] for p in pads] + [p[1] for p in pads], np.int64)
        names = [b.const(f"{layer.name}_pads", flat)]
        if layer.attr("mode") == "constant":
            names.append(b.const(f"{layer.name}_value", np.float32(layer.attr("value"))))
        b.node("Pad", [inputs[0], *names], y, layer.name, mode=layer.attr("mode"))
