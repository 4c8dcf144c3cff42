"""What the layout ops (transpose, slice, pad, resize, squeeze) share: axis arguments in both of their
ONNX forms, the batch-axis rule, and the cost of a copy through the activation unit.

A layout op moves bytes and computes nothing. On the chip the activation unit streams the output
through its lanes: each pass assembles one lanes-wide output vector from unified-buffer reads
(the permutation, window or repetition lives in the read addresses) and writes it back, so a copy
costs one pass per output vector, every output element is written once and every element it
needs is read once.
"""
from __future__ import annotations

from typing import Sequence

from tpusim.frontend.context import node_attrs
from tpusim.ops.base import VectorCost, vectors


def batch_of_one(ctx) -> bool:
    """The file fixes a batch of 1 and the run keeps it (``ctx.single_sample``): no axis must stay the batch."""
    return ctx.single_sample


def copy_cost(function: str, out_elements: int, lanes: int) -> VectorCost:
    """One pass per output vector: read the elements it needs, write it (see the module docstring)."""
    return VectorCost(function, "none", vectors(out_elements, lanes))


def axes_argument(ctx, node, input_index: int, input_from_opset: int) -> list[int] | None:
    """The node's ``axes``: an attribute before ``input_from_opset``, input ``input_index`` from it on.
    None when absent (or an empty input)."""
    if ctx.opset >= input_from_opset:
        values = ctx.optional_constant(node, input_index, "axes")
        return None if values is None or values.size == 0 else [int(v) for v in values.reshape(-1)]
    values = node_attrs(node).get("axes")
    return None if values is None else [int(v) for v in values]


def normalized_axes(ctx, node, axes: Sequence[int], rank: int) -> tuple[int, ...]:
    """Axes in [0, rank), negative ones counted from the end; out-of-range or repeated axes are errors."""
    out = []
    for a in axes:
        if not -rank <= a < rank:
            raise ctx.fail(node, f"axis {a} is out of range for rank {rank}")
        out.append(a % rank)
    if len(set(out)) != len(out):
        raise ctx.fail(node, f"repeated axes {list(axes)}")
    return tuple(out)


def require_batch_kept(ctx, node, axes: Sequence[int], what: str) -> None:
    """The batch (axis 0) follows the run's batch size, so no layout op may change or move it -- unless
    the file was exported for one sample and runs so, when any axis may come first (torchvision's ViT
    runs its attention sequence-first, the batch on axis 1)."""
    if 0 in axes and not batch_of_one(ctx):
        raise ctx.fail(node, f"{what} the batch axis 0; only the other axes are supported")
