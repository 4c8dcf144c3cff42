"""The one lowering the binary elementwise ONNX ops share (Add, Sub, Mul, Div, Pow, Max, Min).

A node's operands decide what it becomes:

- two constants: folded into a new constant;
- a tensor and a constant (numpy broadcasting that keeps the tensor's shape):
  - Max/Min with a scalar: a clamp, fused into the producer like Relu/Clip (:mod:`tpusim.ops.activation`);
  - Add/Sub (tensor - constant) of a scalar or a per-output-channel vector after a Conv/Gemm/MatMul
    whose output nothing else reads: folded into its bias;
  - any ``x * a + b`` step (Add, Sub, Mul, Div by a constant) after an ``affine`` layer: folded into it;
  - a scalar otherwise: one step of a function of one tensor, a 256-entry table
    (:func:`tpusim.ops._table.apply_unary`), which composes with the table ops and scalar steps around it;
  - a per-channel vector otherwise (shape [C,1,1] / [1,C,1,1] against NCHW, [C] against the last
    axis): an ``affine`` layer ``x * a + b`` along that axis (:mod:`tpusim.ops.affine`);
  Mul/Div by a constant is not folded into a preceding Conv's weights: those keep the weights (and a
  QDQ model's weight scales) as the model states them, and the product is one more vector pass.
- two tensors: fused into one table when both are functions of one source
  (:func:`tpusim.ops._table.merge_binary`), else the op's own layer of two activations, with numpy
  broadcasting (squeeze-excitation's ``x[N,C,H,W] * s[N,C,1,1]``).
"""
from __future__ import annotations

import math

import numpy as np

from tpusim.ir import Activation
from tpusim.ops._expr import BINARY, X, const
from tpusim.ops._table import apply_unary, merge_binary
from tpusim.ops.activation import fuse_or_add_activation
from tpusim.ops.base import vectors

ONNX_KIND = {"Add": "add", "Sub": "sub", "Mul": "mul", "Div": "div", "Pow": "pow", "Max": "max", "Min": "min"}


def channel_constant(value: np.ndarray, shape) -> tuple[int | None, np.ndarray] | None:
    """(axis, values) of a constant that broadcasts against a tensor of ``shape`` without changing it and
    varies along at most one axis (None for a scalar), or None when it does not."""
    c = np.asarray(value)
    if c.ndim > len(shape):
        return None
    padded = (1,) * (len(shape) - c.ndim) + c.shape
    if any(p != 1 and p != s for p, s in zip(padded, shape)):
        return None
    varying = [i for i, p in enumerate(padded) if p != 1]
    if not varying:
        return None, c.reshape(1).astype(np.float64)
    if len(varying) == 1:
        return varying[0], c.reshape(-1).astype(np.float64)
    return None


def broadcast_shape(ctx, node, shapes) -> tuple[int, ...]:
    try:
        return tuple(int(d) for d in np.broadcast_shapes(*[tuple(s) for s in shapes]))
    except ValueError:
        raise ctx.fail(node, f"shapes {' and '.join(str(tuple(s)) for s in shapes)} do not broadcast") from None


def binary_passes(in_elements, out_elements: int, lanes: int) -> int:
    """Activation-unit passes of a binary op: every operand is read once, a full-size one vector by vector,
    a broadcast one (squeeze-excitation's per-channel gate) once into the unit's registers; when no
    operand has the output's size (mutual broadcasting) the output vectors take passes of their own."""
    passes = sum(vectors(e, lanes) for e in in_elements)
    if all(e != out_elements for e in in_elements):
        passes += vectors(out_elements, lanes)
    return passes


def _linear(kind: str, x_first: bool, v: np.ndarray):
    """(scale, shift) with ``node(x) = scale * x + shift``, or None when the step is not affine in x."""
    if kind == "add":
        return np.ones_like(v), v
    if kind == "sub":
        return (np.ones_like(v), -v) if x_first else (-np.ones_like(v), v)
    if kind == "mul":
        return v, np.zeros_like(v)
    if kind == "div" and x_first:
        with np.errstate(divide="ignore"):
            return 1.0 / v, np.zeros_like(v)
    return None


def _fold(ctx, x: str, node, axis: int | None, scale: np.ndarray, shift: np.ndarray) -> bool:
    """Fold ``scale * x + shift`` into the layer producing ``x`` (a matrix layer's bias for a pure shift,
    or an affine layer's scale and shift); True when it did."""
    producer = ctx.sole_producer(x)
    if producer is None or producer.activation.kind != "none" or not ctx.weights_foldable_across(x):
        return False
    if producer.op in ("conv", "gemm") and np.all(scale == 1.0):
        n_out = producer.weight.shape[0]
        channel_axis = 1 if producer.op == "conv" else len(producer.output_shape) - 1
        if axis is not None and (axis != channel_axis or shift.size != n_out):
            return False
        old = np.zeros(n_out, np.float64) if producer.bias is None else producer.bias.astype(np.float64)
        producer.bias = (old + np.broadcast_to(shift, (n_out,))).astype(np.float32)
    elif producer.op == "affine":
        if axis is not None and axis != producer.axis:
            return False
        channels = producer.weight.size
        if scale.size not in (1, channels):
            return False
        producer.weight = (producer.weight.astype(np.float64) * scale).astype(np.float32)
        producer.bias = (producer.bias.astype(np.float64) * scale + shift).astype(np.float32)
    else:
        return False
    ctx.rename_output(producer, node.output[0])
    return True


def add_affine(ctx, node, x: str, shape, axis: int, scale: np.ndarray, shift: np.ndarray) -> None:
    channels = shape[axis]
    ctx.add_simple(node, "affine", [(x, shape)], shape, axis=axis,
                   weight=np.broadcast_to(scale, (channels,)).astype(np.float32),
                   bias=np.broadcast_to(shift, (channels,)).astype(np.float32))


def _with_constant(ctx, node, kind: str, index: int, value: np.ndarray) -> None:
    x, shape = ctx.activation_input(node, index)
    x_first = index == 0
    found = channel_constant(value, shape)
    if found is None:
        raise ctx.fail(node, f"constant of shape {tuple(np.shape(value))} against a tensor of shape {tuple(shape)} is "
                             "neither a scalar nor a per-channel vector that keeps the tensor's shape")
    axis, values = found
    if not np.all(np.isfinite(values)):
        raise ctx.fail(node, "constant holds NaN or inf")
    if kind in ("max", "min"):
        if axis is not None:
            raise ctx.fail(node, f"{node.op_type} with a per-channel constant is not supported (only a scalar bound)")
        bound = float(values[0])
        lo, hi = (bound, math.inf) if kind == "max" else (-math.inf, bound)
        fuse_or_add_activation(ctx, node, Activation("relu" if (lo, hi) == (0.0, math.inf) else "clip", lo, hi), index)
        return
    if axis == 0 and len(shape) > 1:
        raise ctx.fail(node, f"constant of shape {tuple(np.shape(value))} varies along the batch axis")
    linear = _linear(kind, x_first, values)
    if linear is not None:
        scale, shift = linear
        if not (np.all(np.isfinite(scale)) and np.all(np.isfinite(shift))):
            raise ctx.fail(node, "division by a zero constant")
        if _fold(ctx, x, node, axis, scale, shift):
            return
    if axis is None:
        tree = (kind, X, const(values)) if x_first else (kind, const(values), X)
        apply_unary(ctx, node, x, shape, tree)
        return
    if linear is None:
        raise ctx.fail(node, f"{node.op_type} with a per-channel constant as input {1 - index} is not supported")
    add_affine(ctx, node, x, shape, axis, *linear)


def lower_binary(ctx, node, kind: str, layer_op: str | None) -> None:
    """Lower binary node ``node`` of ``kind``; ``layer_op`` is the layer for two activations (None: unsupported)."""
    if len(node.input) != 2:
        raise ctx.fail(node, f"expected 2 inputs, got {len(node.input)}")
    names = [ctx.resolve(n) for n in node.input]
    is_const = [n in ctx.constants for n in names]
    if all(is_const):
        a, b = (ctx.constants[n] for n in names)
        with np.errstate(all="ignore"):
            ctx.constants[node.output[0]] = np.asarray(BINARY[kind][1](a, b)).astype(np.result_type(a, b))
        return
    if any(is_const):
        index = is_const.index(False)
        _with_constant(ctx, node, kind, index, ctx.constants[names[1 - index]])
        return
    (a, shape_a), (b, shape_b) = ctx.activation_input(node, 0), ctx.activation_input(node, 1)
    if tuple(shape_a) == tuple(shape_b) and merge_binary(ctx, node, kind, [a, b]):
        return
    if layer_op is None:
        raise ctx.fail(node, f"{node.op_type} of two computed tensors is supported only as one elementwise function "
                             "of a single tensor (e.g. Pow(x, 3) in GELU's tanh form)")
    out = broadcast_shape(ctx, node, [shape_a, shape_b])
    ctx.add_simple(node, layer_op, [(a, shape_a), (b, shape_b)], out)
