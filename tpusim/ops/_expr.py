"""Expressions of one tensor ``x``: what a fused elementwise chain (SiLU, GELU, HardSwish, ...) computes.

A table layer (:mod:`tpusim.ops._table`) made from several ONNX nodes keeps their arithmetic as a
small immutable tree in its ``attrs`` (``("expr", tree)``), so the FP32 reference, the 256-entry table
and the ONNX export all compute exactly the steps the model's graph took, in float32, in the same order:

- ``("x",)``: the layer's input;
- ``("c", value)``: a scalar constant (a float32 value held as a Python float);
- ``(kind, a, b)`` with kind ``add``, ``sub``, ``mul``, ``div``, ``pow``, ``max``, ``min``: the ONNX binary op;
- ``("fn", op, attrs, a)``: the registered table op ``op`` (with its layer attrs) applied to ``a``;
- ``("clip", lo, hi, a)``: a clamp (a Relu/Clip that had been fused into a step of the chain).

``Pow`` follows ONNX Runtime, which evaluates an exponent of 2 or 3 as repeated products.
"""
from __future__ import annotations

import itertools
import math

import numpy as np

X = ("x",)

# kind -> (ONNX op, numpy ufunc)
BINARY = {
    "add": ("Add", np.add),
    "sub": ("Sub", np.subtract),
    "mul": ("Mul", np.multiply),
    "div": ("Div", np.divide),
    "pow": ("Pow", np.power),
    "max": ("Max", np.maximum),
    "min": ("Min", np.minimum),
}


def const(value) -> tuple:
    """A scalar constant node holding ``value`` rounded to float32 (what an ONNX initializer holds)."""
    return ("c", float(np.float32(np.asarray(value).reshape(-1)[0])))


def substitute(tree: tuple, sub: tuple) -> tuple:
    """``tree`` with every ``x`` replaced by ``sub``."""
    tag = tree[0]
    if tag == "x":
        return sub
    if tag == "c":
        return tree
    if tag in BINARY:
        return (tag, substitute(tree[1], sub), substitute(tree[2], sub))
    if tag in ("fn", "clip"):
        return tree[:3] + (substitute(tree[3], sub),)
    raise ValueError(f"unknown expression node {tag!r}")


def _table_layer(name: str, op: str, attrs: tuple):
    from tpusim.ir import Layer

    return Layer(name=name, op=op, inputs=("x",), output="y", input_shapes=((),), output_shape=(), attrs=attrs)


def evaluate(tree: tuple, x: np.ndarray) -> np.ndarray:
    """The expression on ``x``, every step rounded to ``x``'s float dtype (float32 unless float64 is given)."""
    x = np.asarray(x)
    dtype = x.dtype if x.dtype in (np.float32, np.float64) else np.dtype(np.float32)
    x = x.astype(dtype, copy=False)
    cast = dtype.type

    def go(t):
        tag = t[0]
        if tag == "x":
            return x
        if tag == "c":
            return cast(t[1])
        if tag == "pow" and t[2][0] == "c" and t[2][1] in (2.0, 3.0):
            base = go(t[1])
            return base * base if t[2][1] == 2.0 else base * base * base
        if tag in BINARY:
            return np.asarray(BINARY[tag][1](go(t[1]), go(t[2])), dtype)
        if tag == "fn":
            from tpusim import ops

            value = ops.op(t[1]).function(_table_layer("", t[1], t[2]), np.asarray(go(t[3]), dtype))
            return np.asarray(value, dtype)
        if tag == "clip":
            return np.clip(go(t[3]), cast(t[1]), cast(t[2]))
        raise ValueError(f"unknown expression node {tag!r}")

    with np.errstate(all="ignore"):
        result = np.asarray(go(tree), dtype)
    return result if result.shape == x.shape else np.broadcast_to(result, x.shape).copy()


def emit(b, tree: tuple, x: str, y: str, prefix: str) -> None:
    """The expression as ONNX float nodes from tensor ``x`` to tensor ``y`` (names prefixed by ``prefix``)."""
    from tpusim import ops
    from tpusim.ir import Activation
    from tpusim.ops.activation import activation_node

    counter = itertools.count()

    def go(t, out: str | None = None) -> str:
        tag = t[0]
        k = next(counter)
        if tag == "x":
            if out is None:
                return x
            return b.node("Identity", [x], out, f"{prefix}__n{k}")
        if tag == "c":
            return b.const(f"{prefix}__c{k}", np.array(t[1], np.float32))
        name = out if out is not None else f"{y}__t{k}"
        if tag in BINARY:
            a_name, b_name = go(t[1]), go(t[2])
            return b.node(BINARY[tag][0], [a_name, b_name], name, f"{prefix}__n{k}")
        if tag == "fn":
            a_name = go(t[3])
            ops.op(t[1]).export(b, _table_layer(f"{prefix}__n{k}", t[1], t[2]), [a_name], None, None, name)
            return name
        if tag == "clip":
            a_name = go(t[3])
            lo, hi = t[1], t[2]
            kind = "relu" if lo == 0.0 and hi == math.inf else "clip"
            activation_node(b, Activation(kind, lo, hi), a_name, name, f"{prefix}__n{k}")
            return name
        raise ValueError(f"unknown expression node {tag!r}")

    go(tree, y)


def formula(tree: tuple) -> str:
    """A readable form of the expression, e.g. ``mul(x, sigmoid(x))``."""
    tag = tree[0]
    if tag == "x":
        return "x"
    if tag == "c":
        return f"{tree[1]:.9g}"
    if tag in BINARY:
        return f"{tag}({formula(tree[1])}, {formula(tree[2])})"
    if tag == "fn":
        params = "".join(f", {k}={v}" for k, v in tree[2])
        return f"{tree[1]}({formula(tree[3])}{params})"
    if tag == "clip":
        return f"clip({formula(tree[3])}, {tree[1]:.9g}, {tree[2]:.9g})"
    raise ValueError(f"unknown expression node {tag!r}")
