"""Slice (opset >= 10 form: constant starts/ends/axes/steps inputs, negative and out-of-range indices
clamped as ONNX says, negative steps) and Split (sizes as an attribute before opset 13, as an input
from 13, or ``num_outputs`` from 18), lowered as one ``slice`` layer per output, each its own layer
named after the Split node plus ``_out<i>``.

Data movement only: the activation unit reads the selected elements (the window and the step are
unified-buffer read addresses) and writes them contiguously, one pass per output vector (every
output element read once and written once). A Slice that selects the whole tensor, and a Split
into one part, are lowered as a reshape (an alias: no instruction, no bytes).

Integers: an exact copy on the input's grid (``inherits_grid``).
"""
from __future__ import annotations

import math

import numpy as np

from tpusim.frontend.context import LayerRecord, node_attrs
from tpusim.ops import register
from tpusim.ops._layout import axes_argument, copy_cost, normalized_axes, require_batch_kept
from tpusim.ops.base import Op
from tpusim.ops.reshape import add_reshape


def _bounds(dim: int, start: int, end: int, step: int) -> tuple[int, int, int]:
    """(start, end, length) of ``start:end:step`` over ``dim`` elements, clamped as ONNX Slice does;
    ``end`` is -1 for a negative step that runs down to element 0."""
    start = start + dim if start < 0 else start
    end = end + dim if end < 0 else end
    if step > 0:
        start, end = min(max(start, 0), dim), min(max(end, 0), dim)
    else:
        start, end = min(max(start, 0), dim - 1), min(max(end, -1), dim - 1)
    return start, end, max(0, -(-(end - start) // step))


def _index(layer) -> tuple[slice, ...]:
    return tuple(slice(s, None if e < 0 else e, st)
                 for s, e, st in zip(layer.attr("starts"), layer.attr("ends"), layer.attr("steps")))


def add_slice(ctx, node, name: str, output: str, x: str, shape, starts, ends, steps) -> None:
    """A slice layer taking ``starts[i]:ends[i]:steps[i]`` (already clamped) on every axis of ``x``."""
    out = tuple(max(0, -(-(e - s) // st)) for s, e, st in zip(starts, ends, steps))
    if math.prod(out) == 0:
        raise ctx.fail(node, f"the slice of shape {shape} to {out} is empty")
    ctx.add(LayerRecord(name=name, op="slice", inputs=[x], output=output, input_shapes=[shape], output_shape=out,
                        attrs=(("starts", tuple(starts)), ("ends", tuple(ends)), ("steps", tuple(steps)))))


def _lower_slice(ctx, node) -> None:
    x, shape = ctx.activation_input(node)
    rank = len(shape)
    starts = ctx.constant(node, 1, "starts").reshape(-1).tolist()
    ends = ctx.constant(node, 2, "ends").reshape(-1).tolist()
    axes = axes_argument(ctx, node, 3, 10)
    given = ctx.optional_constant(node, 4, "steps")
    steps = None if given is None else given.reshape(-1).tolist()
    axes = list(range(len(starts))) if axes is None else axes
    steps = [1] * len(starts) if steps is None else steps
    if not len(starts) == len(ends) == len(axes) == len(steps):
        raise ctx.fail(node, f"starts, ends, axes and steps differ in length ({len(starts)}, {len(ends)}, "
                             f"{len(axes)}, {len(steps)})")
    axes = normalized_axes(ctx, node, axes, rank)
    full = [(0, d, 1) for d in shape]
    for axis, s, e, st in zip(axes, starts, ends, steps):
        if int(st) == 0:
            raise ctx.fail(node, f"step 0 on axis {axis}")
        start, end, length = _bounds(shape[axis], int(s), int(e), int(st))
        if length != shape[axis] or int(st) < 0:
            full[axis] = (start, end, int(st))
    changed = [i for i, f in enumerate(full) if f != (0, shape[i], 1)]
    require_batch_kept(ctx, node, changed, "Slice cuts")
    if not changed:
        add_reshape(ctx, node, x, shape, shape)
        return
    starts, ends, steps = zip(*full)
    add_slice(ctx, node, node.name, node.output[0], x, shape, starts, ends, steps)


def _split_sizes(ctx, node, dim: int) -> list[int]:
    attrs = node_attrs(node)
    parts = len(node.output)
    if ctx.opset >= 13:
        given = ctx.optional_constant(node, 1, "split")
        sizes = None if given is None or given.size == 0 else [int(v) for v in given.reshape(-1)]
    else:
        sizes = [int(v) for v in attrs["split"]] if "split" in attrs else None
    if sizes is None and "num_outputs" in attrs:
        n = int(attrs["num_outputs"])
        if n != parts:
            raise ctx.fail(node, f"num_outputs {n} but {parts} outputs")
        chunk = -(-dim // n)
        sizes = [chunk] * (n - 1) + [dim - chunk * (n - 1)]
    if sizes is None:
        if dim % parts:
            raise ctx.fail(node, f"axis of size {dim} does not split evenly into {parts} outputs")
        sizes = [dim // parts] * parts
    if len(sizes) != parts or sum(sizes) != dim or min(sizes) < 1:
        raise ctx.fail(node, f"split sizes {sizes} do not cut an axis of size {dim} into {parts} outputs")
    return sizes


def _lower_split(ctx, node) -> None:
    x, shape = ctx.activation_input(node)
    axis = normalized_axes(ctx, node, [int(node_attrs(node).get("axis", 0))], len(shape))[0]
    require_batch_kept(ctx, node, [axis], "Split cuts")
    sizes = _split_sizes(ctx, node, shape[axis])
    if len(sizes) == 1:
        add_reshape(ctx, node, x, shape, shape)
        return
    offset = 0
    for i, (size, output) in enumerate(zip(sizes, node.output)):
        starts, ends = [0] * len(shape), list(shape)
        starts[axis], ends[axis] = offset, offset + size
        offset += size
        if output:
            add_slice(ctx, node, f"{node.name}_out{i}", output, x, shape, starts, ends, [1] * len(shape))


@register
class Slice(Op):
    name = "slice"
    onnx_types = ("Slice", "Split")
    inherits_grid = True

    def lower(self, ctx, node):
        if node.op_type == "Split":
            _lower_split(ctx, node)
        else:
            _lower_slice(ctx, node)

    def reference(self, layer, inputs):
        return np.ascontiguousarray(inputs[0][_index(layer)])

    def quantize(self, layer, in_qps, y_qp, quant, input_mean):
        from tpusim.quant.qlayer import plain_qlayer
        return plain_qlayer(layer, in_qps, y_qp)

    def execute(self, ql, inputs, options):
        return np.ascontiguousarray(inputs[0][_index(ql.layer)]), 0

    def vector_cost(self, layer, in_elements, out_elements, lanes, int8):
        return copy_cost("slice", out_elements, lanes)

    def export(self, b, layer, inputs, weight, bias, y):
        shape = layer.input_shapes[0]
        axes = [i for i, (s, e, st) in enumerate(zip(layer.attr("starts"), layer.attr("ends"), layer.attr("steps")))
                if (s, e, st) != (0, shape[i], 1)]
        # An end of -1 (a negative step down to element 0) is written as -(dim + 1): ONNX reads -1 as dim - 1.
        ends = [e if e >= 0 else -(shape[i] + 1) for i, e in enumerate(layer.attr("ends"))]
        consts = {"starts": [layer.attr("starts")[i] for i in axes], "ends": [ends[i] for i in axes], "axes": axes,
                  "steps": [layer.attr("steps")[i] for i in axes]}
        names = [b.const(f"{layer.name}_{k}", np.array(v, np.int64)) for k, v in consts.items()]
        b.node("Slice", [inputs[0], *names], y, layer.name)
