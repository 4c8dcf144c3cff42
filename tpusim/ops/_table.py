"""Elementwise functions of one 8-bit tensor, as 256-entry tables (shared by the table ops), and the
fusion that turns a chain of elementwise ONNX nodes on one tensor into one such table.

Any function of a per-tensor-quantized input is exactly a table over its 256 integers (every value of
the 8-bit storage, so also the -128 below a symmetric grid that ONNX Runtime's QuantizeLinear can
produce), built offline with the same float32 dequantize -> f -> quantize steps a QDQ model takes, so
the table is what ONNX Runtime computes element by element. The vector unit looks every element up once:
one pass per vector, one activation op per element and the output write counted as its requantization.

Fusion: "a function of one tensor" (chosen over a list of node patterns). When an elementwise node's
operands are scalar constants and tensors that are each an elementwise function of one source tensor
``x`` (``x`` itself, or a table layer computed from ``x`` whose output nothing else reads; a clamp fused
into such a layer is part of its expression; a stand-alone clamp layer, whose input has other readers,
stays the cheap clamp on its input's grid), the node and those layers become one table layer reading
``x`` whose ``attrs`` hold the whole expression (:mod:`tpusim.ops._expr`). Unary table ops (Sigmoid,
Erf, ...) and scalar Add/Sub/Mul/Div/Pow compose onto such a layer; two tensors of the same ``x`` merge
when one of them is ``x`` itself (the self-gated shape of SiLU ``x * sigmoid(x)``, GELU
``x * (1 + erf(x / sqrt 2)) / 2``, HardSwish, Mish) or when the merged expression is a known function; two separate
nonlinearities of ``x`` (``sigmoid(x) + tanh(x)``) stay separate layers. The fused layer is named by
what it computes, checked numerically on a probe grid against the known functions (:data:`KNOWN`):
``silu``, ``gelu``, ``hardswish``, ``hardsigmoid``, ``mish``, else ``unary``; the name is a label only,
the layer computes its own expression. SiLU and both GELU forms therefore need no pattern list, in any
operand order, with ``Pow(x, 3)`` or ``x * (x * x)``. The export writes the expression's own nodes, so
ONNX Runtime runs between Q and DQ the float steps the table was built from.
"""
from __future__ import annotations

import numpy as np

from tpusim import jit, ops
from tpusim.ir import NO_ACTIVATION
from tpusim.ops._expr import X, emit, evaluate, substitute
from tpusim.ops.base import Op, VectorCost, vectors


def table_range(x_qp) -> tuple[int, int]:
    """The input integers a table covers: every value of the 8-bit storage (256 entries), so an input
    outside the calibrated grid (the -128 ONNX Runtime's QuantizeLinear saturates to below a symmetric
    grid's -127) still finds the entry of its own real value."""
    info = np.iinfo(x_qp.storage_dtype)
    if info.bits == 8:
        return int(info.min), int(info.max)
    return x_qp.qmin, x_qp.qmax


class TableOp(Op):
    """An elementwise op of one tensor: subclasses give ``function`` (float32 in, float32 out; float64
    in, float64 out) and ``export_function``, or an ``expression`` that defines both."""

    in_place = True
    fusable = True

    def expression(self, layer) -> tuple | None:
        """The op as a tree of ONNX-exportable steps, for ops without an ONNX node of their own at the
        exporter's opset (SiLU, GELU); ``function`` and ``export_function`` then follow it."""
        return None

    def function(self, layer, x: np.ndarray) -> np.ndarray:
        tree = self.expression(layer)
        if tree is None:
            raise NotImplementedError
        return evaluate(tree, x)

    def export_function(self, b, layer, x: str, y: str) -> None:
        tree = self.expression(layer)
        if tree is None:
            raise NotImplementedError
        emit(b, tree, x, y, layer.name)

    def values(self, layer, x: np.ndarray) -> np.ndarray:
        """What the layer computes: its fused expression when it has one, else the op's own function."""
        tree = layer.attr("expr")
        return evaluate(tree, x) if tree is not None else self.function(layer, x)

    def lower(self, ctx, node):
        x, shape = ctx.activation_input(node)
        apply_unary(ctx, node, x, shape, ("fn", self.name, self.lowered_attrs(ctx, node), X))

    def lowered_attrs(self, ctx, node) -> tuple:
        return ()

    def reference(self, layer, inputs):
        return self.values(layer, inputs[0]).astype(np.float32, copy=False)

    def quantize(self, layer, in_qps, y_qp, quant, input_mean):
        from tpusim.quant.arithmetic import dequantize, quantize
        from tpusim.quant.qlayer import plain_qlayer
        lo, hi = table_range(in_qps[0])
        grid = dequantize(np.arange(lo, hi + 1), in_qps[0])
        y = layer.activation.apply(self.values(layer, grid).astype(np.float32))
        # A step without a real value (0/0 in a user's chain) maps to real zero, like Div's float step.
        y = np.where(np.isnan(y), np.float32(0), y)
        return plain_qlayer(layer, in_qps, y_qp, lut=quantize(y, y_qp))

    def execute(self, ql, inputs, options):
        q, lo = inputs[0], table_range(ql.input_qparams[0])[0]
        if q.dtype.itemsize != 1:  # (a wider grid's table covers [qmin, qmax] only: numpy checks the indices)
            return look_up_reference(ql.lut, q, lo), 0
        from tpusim.tensor_ops import in_memory_order
        # In the input's memory order (channels last after a conv), which the output keeps for the next conv
        flat, back = in_memory_order(q)
        out = np.empty(flat.shape, ql.lut.dtype)
        _look_up(flat.reshape(-1), ql.lut, np.int64(lo), out.reshape(-1))
        return out.transpose(back), 0

    def vector_cost(self, layer, in_elements, out_elements, lanes, int8):
        return VectorCost(layer.op, "none", vectors(out_elements, lanes), activation_ops=out_elements,
                          requant_ops=out_elements if int8 else 0)

    def export(self, b, layer, inputs, weight, bias, y):
        tree = layer.attr("expr")
        if tree is not None:
            emit(b, tree, inputs[0], y, layer.name)
        else:
            self.export_function(b, layer, inputs[0], y)


@jit.kernel(cache=True, nogil=True)
def _look_up(q, lut, lo, out):
    """out = lut[q - lo] for 8-bit q, whose every value the 256-entry table covers."""
    for i in range(q.size):
        out[i] = lut[np.uint64(np.int64(q[i]) - lo)]


def look_up_reference(lut: np.ndarray, q: np.ndarray, lo: int) -> np.ndarray:
    """Numpy oracle of the table ops' lookup (and their path for a grid wider than 8 bits)."""
    return lut[q.astype(np.int32) - lo]


# Functions a fused chain is recognised as (layer op, attrs): the first that agrees on the probe grid
# names the layer. Sigmoid and Tanh are left out: their modules export their own ONNX node, not a chain.
KNOWN: tuple[tuple[str, tuple], ...] = (
    ("silu", ()),
    ("gelu", (("approximate", "none"),)),
    ("gelu", (("approximate", "tanh"),)),
    ("hardswish", ()),
    ("hardsigmoid", (("alpha", float(np.float32(1 / 6))), ("beta", 0.5))),
    ("hardsigmoid", (("alpha", float(np.float32(0.2))), ("beta", 0.5))),
    ("mish", ()),
)
# x in [-12, 12] by 1/200: every breakpoint of the known functions lies on it or between two of its
# points, and no two known functions agree on it to the tolerance (GELU's two forms differ by ~2e-4).
_PROBE = np.linspace(-12.0, 12.0, 4801)
_TOLERANCE = 1e-6


def _table_layer(op: str, attrs: tuple):
    from tpusim.ops._expr import _table_layer as make

    return make("", op, attrs)


_known_values: list[np.ndarray] = []


def identify(tree: tuple) -> tuple[str, tuple]:
    """(layer op, attrs) of a table layer computing ``tree`` on its input."""
    if tree[0] == "fn" and tree[3] == X:
        return tree[1], tree[2]
    if not _known_values:
        _known_values.extend(ops.op(name).function(_table_layer(name, attrs), _PROBE) for name, attrs in KNOWN)
    got = evaluate(tree, _PROBE)
    if np.all(np.isfinite(got)):
        for (name, attrs), want in zip(KNOWN, _known_values):
            if np.all(np.abs(got - want) <= _TOLERANCE * (1.0 + np.abs(want))):
                return name, attrs + (("expr", tree),)
    return "unary", (("expr", tree),)


def expression_of(record) -> tuple | None:
    """The function of its input a table layer record computes (its fused clamp included), or None."""
    if not isinstance(ops.op(record.op), TableOp):
        return None
    tree = dict(record.attrs).get("expr") or ("fn", record.op, record.attrs, X)
    act = record.activation
    return tree if act.kind == "none" else ("clip", float(act.lo), float(act.hi), tree)


def absorbable(ctx, node, tensor: str):
    """The record producing ``tensor`` when it is a function of one tensor that only ``node`` reads."""
    record = ctx.producer.get(tensor)
    if record is None or tensor in ctx.graph_outputs or len(record.inputs) != 1:
        return None
    reads = sum(ctx.resolve(name) == tensor for name in node.input)
    if ctx.consumers.get(tensor, 0) != reads or record.output_shape != tuple(record.input_shapes[0]):
        return None
    return record if expression_of(record) is not None else None


def put_function(ctx, node, source: str, shape, tree: tuple, records: list) -> None:
    """Write ``node``'s output as one table layer computing ``tree`` of ``source``, reusing the first of
    ``records`` (the absorbed layers) and dropping the others."""
    op, attrs = identify(tree)
    if not records:
        ctx.add_simple(node, op, [(source, shape)], shape, attrs=attrs)
        return
    keep = records[0]
    for record in records[1:]:
        if record is not keep:
            ctx.records[:] = [r for r in ctx.records if r is not record]
            del ctx.producer[record.output]
    keep.op, keep.attrs, keep.activation = op, attrs, NO_ACTIVATION
    keep.inputs, keep.input_shapes = [source], [tuple(shape)]
    ctx.rename_output(keep, node.output[0])


def apply_unary(ctx, node, x: str, shape, tree: tuple) -> None:
    """``node`` computes ``tree`` of tensor ``x``: composed onto ``x``'s producer when it is absorbable."""
    record = absorbable(ctx, node, x)
    if record is not None:
        put_function(ctx, node, record.inputs[0], record.input_shapes[0], substitute(tree, expression_of(record)),
                     [record])
    else:
        put_function(ctx, node, x, shape, tree, [])


def merge_binary(ctx, node, kind: str, tensors: list[str]) -> bool:
    """Fuse a binary node of two tensors that are functions of one source into one table layer, when
    one of them is the source itself or the result is a known function. True when it did."""
    views = []
    for t in tensors:
        options = []
        record = absorbable(ctx, node, t)
        if record is not None:
            options.append((record.inputs[0], tuple(record.input_shapes[0]), expression_of(record), record))
        options.append((t, tuple(ctx.shapes[t]), X, None))
        views.append(options)
    for source_a, shape_a, tree_a, rec_a in views[0]:
        for source_b, _, tree_b, rec_b in views[1]:
            if source_a != source_b:
                continue
            tree = (kind, tree_a, tree_b)
            if rec_a is None or rec_b is None or rec_a is rec_b or identify(tree)[0] != "unary":
                put_function(ctx, node, source_a, shape_a, tree, [r for r in (rec_a, rec_b) if r is not None])
                return True
    return False
