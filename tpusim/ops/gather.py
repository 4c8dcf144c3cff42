"""Gather: embedding lookups (rows of a constant table at the token ids the graph takes as its input,
or a constant tensor the graph adds or concatenates) and the selection of an activation's slices at
constant indices (ViT's class token ``x[:, 0]``, the q/k/v split of a fused in-projection).

**Embedding lookup** (layer ``embedding``). TPU v1 has no gather: the host holds the table and
sends the rows the ids select over PCIe into the unified buffer (one ``ReadHostMemory`` of the
output's bytes; the ids never go to the chip's matrix path). A constant operand that is neither a
scalar nor a per-channel vector of an Add or Sub, or a constant input of a Concat (BERT's folded
position and token-type embeddings, ViT's class token and position embedding), reaches the chip the
same way: :func:`materialize_constant_operands`, a model rewrite, turns it into the output of a Gather
of constant rows, so the Add or Concat that reads it becomes an op of two activations. The rewrite also drops the additive attention mask that an
all-ones ``attention_mask`` folds to (an all-zero constant added to the scores). The graph input read
as ids is an integer tensor (``index_rows`` on the layer: every id lies below it); it keeps its
integers (an identity grid), and the table is stored on the output's grid, so the lookup is exact.

**Selection** (layer ``gather``): the activation unit copies the selected slices, one pass per output
vector (every output element read once and written once); the integers keep the input's grid.
"""
from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import helper, numpy_helper

from tpusim.frontend.context import node_attrs
from tpusim.mapping.isa import LayerMapping, ReadHostMemory, UbRegion
from tpusim.frontend.canonical import static_shapes
from tpusim.ops import register, register_rewrite
from tpusim.ops._layout import copy_cost, normalized_axes, require_batch_kept
from tpusim.ops.base import Op

INDEX_ROWS = "index_rows"  # layer attr of a lookup: the graph input it reads holds ids below this


def _take(values: np.ndarray, indices: np.ndarray, axis: int) -> np.ndarray:
    return np.ascontiguousarray(np.take(values, indices.astype(np.int64), axis=axis, mode="raise"))


def _check_indices(ctx, node, indices: np.ndarray, dim: int) -> None:
    if indices.size and (indices.min() < -dim or indices.max() >= dim):
        raise ctx.fail(node, f"index out of range for an axis of size {dim}")


@register
class Embedding(Op):
    """Rows of a constant table (``weight``) at the graph input's ids, or a constant tensor (no input)."""

    name = "embedding"
    schedules_itself = True

    def reference(self, layer, inputs):
        if not inputs:
            return layer.weight
        return _take(layer.weight, np.rint(inputs[0]), 0)

    def quantize(self, layer, in_qps, y_qp, quant, input_mean):
        from tpusim.quant.arithmetic import quantize
        from tpusim.quant.qlayer import plain_qlayer
        # The host stores the table on the output's grid, so the lookup itself adds no rounding.
        return plain_qlayer(layer, in_qps, y_qp, weight_q=quantize(layer.weight, y_qp))

    def execute(self, ql, inputs, options):
        if not inputs:
            return ql.weight_q, 0
        return _take(ql.weight_q, inputs[0], 0), 0

    def emit(self, compiler, index, layer, out, is_output):
        """One host -> unified-buffer transfer of the output's bytes (the host looks the rows up)."""
        table = compiler._host_alloc(layer.weight.size * compiler.eb)
        if out.ub_addr is not None:
            compiler.code.append(ReadHostMemory(index, table, UbRegion(out.ub_addr, out.nbytes), spill=False))
        compiler.mappings.append(LayerMapping(layer.name, layer.op, None, 0, 0, 1, 0, 0, out.ub_addr is None, 0.0))

    def export(self, b, layer, inputs, weight, bias, y):
        table = b.const(f"{layer.name}_table", layer.weight)
        if inputs:
            b.node("Gather", [table, inputs[0]], y, layer.name, axis=0)
        else:
            b.node("Identity", [table], y, layer.name)


@register
class Gather(Op):
    """Slices of an activation at constant indices along one axis; lowers the lookups too."""

    name = "gather"
    onnx_types = ("Gather",)
    inherits_grid = True

    def lower(self, ctx, node):
        axis = int(node_attrs(node).get("axis", 0))
        if ctx.is_constant(node, 0):
            data = ctx.constant(node, 0, "data")
            axis = normalized_axes(ctx, node, [axis], data.ndim)[0]
            if ctx.is_constant(node, 1):  # a constant operand, materialised (see the module docstring)
                indices = ctx.constant(node, 1, "indices")
                _check_indices(ctx, node, indices, data.shape[axis])
                values = _take(data.astype(np.float32, copy=False), indices, axis)
                ctx.add_simple(node, "embedding", [], values.shape, weight=values)
                return
            ids, shape = ctx.activation_input(node, 1)
            if ids in ctx.producer:
                raise ctx.fail(node, "indices computed on the chip are not supported: a lookup's ids must be the "
                                     "graph input (token ids)")
            if axis != 0:
                raise ctx.fail(node, f"a lookup along axis {axis} of its table is not supported (only rows, axis 0)")
            table = np.ascontiguousarray(data.astype(np.float32, copy=False))  # (no layer writes into a weight)
            ctx.add_simple(node, "embedding", [(ids, shape)], tuple(shape) + table.shape[1:], weight=table,
                           attrs=((INDEX_ROWS, int(table.shape[0])),))
            return
        x, shape = ctx.activation_input(node)
        if not ctx.is_constant(node, 1):
            raise ctx.fail(node, "Gather of an activation at computed indices is not supported")
        axis = normalized_axes(ctx, node, [axis], len(shape))[0]
        indices = np.asarray(ctx.constant(node, 1, "indices")).astype(np.int64)
        require_batch_kept(ctx, node, [axis], "Gather selects along")
        _check_indices(ctx, node, indices, shape[axis])
        out = tuple(shape[:axis]) + indices.shape + tuple(shape[axis + 1:])
        if math.prod(out) == 0:
            raise ctx.fail(node, "the selection is empty")
        ctx.add_simple(node, self.name, [(x, shape)], out, axis=axis, attrs=(("indices", indices),))

    def reference(self, layer, inputs):
        return _take(inputs[0], layer.attr("indices"), layer.axis)

    def quantize(self, layer, in_qps, y_qp, quant, input_mean):
        from tpusim.quant.qlayer import plain_qlayer
        return plain_qlayer(layer, in_qps, y_qp)

    def execute(self, ql, inputs, options):
        return _take(inputs[0], ql.layer.attr("indices"), ql.layer.axis), 0

    def vector_cost(self, layer, in_elements, out_elements, lanes, int8):
        return copy_cost("gather", out_elements, lanes)

    def export(self, b, layer, inputs, weight, bias, y):
        indices = b.const(f"{layer.name}_indices", np.asarray(layer.attr("indices"), np.int64))
        b.node("Gather", [inputs[0], indices], y, layer.name, axis=layer.axis)


# -- constant operands -----------------------------------------------------------------------------

_MATERIALIZED_BY = ("Add", "Sub", "Concat")  # learned position embeddings, prepended tokens


def _full_tensor(value: np.ndarray) -> bool:
    """Neither a scalar nor a vector along one axis: the elementwise lowering cannot fold it."""
    return sum(1 for d in value.shape if d > 1) >= 2


def _zero_addend(node: onnx.NodeProto, constants: dict, shapes: dict) -> str | None:
    """The activation of ``x + 0`` / ``x - 0`` / ``0 + x`` with an all-zero constant that does not enlarge x."""
    if node.op_type not in ("Add", "Sub") or len(node.input) != 2:
        return None
    for i in (1, 0) if node.op_type == "Add" else (1,):
        c, x = node.input[i], node.input[1 - i]
        if c in constants and x not in constants and x in shapes and not np.any(constants[c]):
            try:
                if tuple(np.broadcast_shapes(shapes[x], constants[c].shape)) == shapes[x]:
                    return x
            except ValueError:
                return None
    return None


@register_rewrite
def materialize_constant_operands(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` rewritten in place so that every constant operand that is neither a scalar nor a per-channel
    vector of an Add/Sub (and every constant input of a Concat that also reads an activation)
    is the output of a new ``Gather(constant, 0..n-1)`` node (an embedding lookup of constant rows),
    and in which an Add/Sub of an all-zero constant that does not broadcast its activation (the
    attention mask an all-ones ``attention_mask`` folds to) is gone, its readers reading the
    activation."""
    graph = model.graph
    constants = {t.name: t for t in graph.initializer}
    arrays: dict[str, np.ndarray] = {}

    def value(name: str) -> np.ndarray:
        if name not in arrays:
            arrays[name] = numpy_helper.to_array(constants[name])
        return arrays[name]

    outputs = {o.name for o in graph.output}
    shapes = None
    rename: dict[str, str] = {}
    kept: list[onnx.NodeProto] = []
    new_inits: list[onnx.TensorProto] = []
    made: dict[str, str] = {}
    changed = False
    for node in graph.node:
        node_copy = None
        inputs = [rename.get(n, n) for n in node.input]
        if node.op_type in ("Add", "Sub") and any(n in constants for n in inputs):
            if shapes is None:
                shapes = static_shapes(graph)
            zero_consts = {n: value(n) for n in inputs if n in constants}
            x = _zero_addend(helper.make_node(node.op_type, inputs, list(node.output)), zero_consts, shapes)
            if x is not None and node.output[0] not in outputs:
                rename[node.output[0]] = x
                changed = True
                continue
        if node.op_type in _MATERIALIZED_BY and any(n and n not in constants for n in inputs):
            for i, name in enumerate(inputs):
                if name not in constants or (node.op_type != "Concat" and not _full_tensor(value(name))):
                    continue
                if constants[name].data_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16,
                                                     onnx.TensorProto.DOUBLE):
                    continue
                if name not in made:
                    rows = f"{name}__rows"
                    index = f"{name}__rows_index"
                    new_inits.append(numpy_helper.from_array(np.arange(max(value(name).shape[:1] or (1,)),
                                                                       dtype=np.int64), index))
                    kept.append(helper.make_node("Gather", [name, index], [rows], name=f"{name}__materialize",
                                                 axis=0))
                    made[name] = rows
                inputs[i] = made[name]
        if inputs != list(node.input):
            node_copy = onnx.NodeProto()
            node_copy.CopyFrom(node)
            node_copy.input[:] = inputs
            changed = True
        kept.append(node_copy if node_copy is not None else node)
    if changed:
        del graph.node[:]
        graph.node.extend(kept)
        graph.initializer.extend(new_inits)
    return model
