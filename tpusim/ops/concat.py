"""Concat of activations on any axis.

Integers: the output has its own grid; each input on a different grid is requantized into it, the
others are copied. Vector unit: one pass per input vector (every element is read and written once).
"""
from __future__ import annotations

import numpy as np

from tpusim import jit
from tpusim.derived import derived_from
from tpusim.frontend.context import node_attrs
from tpusim.ops import register
from tpusim.ops.base import Op, VectorCost, vectors


@register
class Concat(Op):
    name = "concat"
    onnx_types = ("Concat",)

    def lower(self, ctx, node):
        inputs = [ctx.activation_input(node, i) for i in range(len(node.input))]
        shapes = [s for _, s in inputs]
        rank = len(shapes[0])
        axis = int(node_attrs(node)["axis"]) % rank
        for s in shapes[1:]:
            if len(s) != rank or any(a != b for i, (a, b) in enumerate(zip(s, shapes[0])) if i != axis):
                raise ctx.fail(node, f"incompatible shapes {shapes} for axis {axis}")
        out = list(shapes[0])
        out[axis] = sum(s[axis] for s in shapes)
        ctx.add_simple(node, self.name, inputs, tuple(out), axis=axis)

    def reference(self, layer, inputs):
        return np.concatenate(inputs, axis=layer.axis)

    def quantize(self, layer, in_qps, y_qp, quant, input_mean):
        from tpusim.quant.qlayer import plain_qlayer, rescales_to
        return plain_qlayer(layer, in_qps, y_qp, input_rescales=rescales_to(in_qps, y_qp))

    def execute(self, ql, inputs, options):
        from tpusim.quant.arithmetic import storage_dtype
        from tpusim.tensor_ops import in_memory_order
        rescales = derived_from(ql, "concat", lambda: _rescale_constants(ql))
        # Written in the memory order of the first input (channels last after a conv): each input is then one run
        # per outer index (per pixel, along the channels), and the next conv takes the output as it is.
        first, back = in_memory_order(inputs[0])
        order = tuple(int(axis) for axis in np.argsort(back))
        axis = int(back[ql.layer.axis % first.ndim])
        y_qp = ql.output_qparams
        shape = list(first.shape)
        shape[axis] = sum(q.shape[ql.layer.axis % first.ndim] for q in inputs)
        out = np.empty(shape, np.result_type(*[q.dtype if r is None else storage_dtype(y_qp.qmin, y_qp.qmax)
                                               for q, r in zip(inputs, rescales)]))
        outer = int(np.prod(shape[:axis]))
        rows = out.reshape(outer, -1)
        at = 0
        for q, rescale in zip(inputs, rescales):
            part = np.ascontiguousarray(q.transpose(order)).reshape(outer, -1)
            if rescale is None:
                _copied_into(part, rows, at)
            else:
                _rescaled_into(part, *rescale, rows, at)
            at += part.shape[1]
        return out.transpose(back), 0

    def vector_cost(self, layer, in_elements, out_elements, lanes, int8):
        return VectorCost(f"concat+{layer.activation.label}", "none", sum(vectors(e, lanes) for e in in_elements),
                          activation_ops=out_elements if layer.activation.kind != "none" else 0,
                          requant_ops=sum(in_elements) if int8 else 0)

    def export(self, b, layer, inputs, weight, bias, y):
        b.node("Concat", inputs, y, layer.name, axis=layer.axis)


@jit.kernel(cache=True, nogil=True, imports={"requantize_value": "tpusim.kernels.rounding"})
def _rescaled_into(src, zero_point_in, multiplier, right, half, zero_point, qmin, qmax, dst, at):
    """dst[:, at : at + width] = src's integers, centred on ``zero_point_in``, requantized onto the output grid; src
    (rows, width) and dst (rows, total) C-contiguous, so the loop over a row vectorises however short it is."""
    width = src.shape[1]
    for o in range(src.shape[0]):
        s, d = src[o], dst[o, at : at + width]
        for i in range(width):
            d[i] = requantize_value(np.int64(s[i]) - zero_point_in, multiplier, right, half, zero_point, qmin, qmax)


@jit.kernel(cache=True, nogil=True)
def _copied_into(src, dst, at):
    """dst[:, at : at + width] = src, as :func:`_rescaled_into` writes (numpy's strided copy of rows of a few
    dozen bytes takes several times as long)."""
    width = src.shape[1]
    for o in range(src.shape[0]):
        s, d = src[o], dst[o, at : at + width]
        for i in range(width):
            d[i] = s[i]


def _rescale_constants(ql) -> tuple[tuple | None, ...]:
    """Per input, :func:`_rescaled_into`'s arguments between the input and the output rows (None: copied)."""
    from tpusim.kernels.rounding import requantize_constants
    y_qp = ql.output_qparams
    grid = (np.int64(y_qp.zero_point), np.int64(y_qp.qmin), np.int64(y_qp.qmax))
    constants = []
    for qp, r in zip(ql.input_qparams, ql.input_rescales):
        if r is None:
            constants.append(None)
            continue
        multiplier, right, half = requantize_constants(r.m0, r.shift, 1)
        constants.append((np.int64(qp.zero_point), multiplier[0], right[0], half[0], *grid))
    return tuple(constants)


def concat_reference(ql, inputs: list[np.ndarray]) -> np.ndarray:
    """Numpy oracle of :meth:`Concat.execute`: each input on the output grid, concatenated."""
    from tpusim.quant.qlayer import on_output_grid
    return np.concatenate(on_output_grid(ql, inputs), axis=ql.layer.axis)
