"""Squeeze and Unsqueeze: remove or insert dimensions of size 1. The bytes do not move, so both
lower to a ``reshape`` layer (:mod:`tpusim.ops.reshape`): an alias with no instruction, no bytes
and the input's integers on its grid.

``axes`` is an attribute before opset 13 and an input from 13 on. The batch axis 0 is never removed
or inserted (it follows the run's batch size); a Squeeze without axes removes the size-1 dimensions
after the batch.
"""
from __future__ import annotations

from tpusim.ops import register
from tpusim.ops._layout import axes_argument, normalized_axes, require_batch_kept
from tpusim.ops.base import Op
from tpusim.ops.reshape import add_reshape


@register
class Squeeze(Op):
    name = ""  # lowering only: the layers are reshapes
    onnx_types = ("Squeeze", "Unsqueeze")

    def lower(self, ctx, node):
        x, shape = ctx.activation_input(node)
        axes = axes_argument(ctx, node, 1, 13)
        if node.op_type == "Squeeze":
            if axes is None:
                drop = tuple(i for i in range(1, len(shape)) if shape[i] == 1)
            else:
                drop = normalized_axes(ctx, node, axes, len(shape))
                require_batch_kept(ctx, node, drop, "Squeeze removes")
                wrong = [a for a in drop if shape[a] != 1]
                if wrong:
                    raise ctx.fail(node, f"cannot squeeze axes {wrong} of shape {shape}: their size is not 1")
            add_reshape(ctx, node, x, shape, tuple(d for i, d in enumerate(shape) if i not in drop))
            return
        if axes is None:
            raise ctx.fail(node, "missing axes")
        rank = len(shape) + len(axes)
        insert = normalized_axes(ctx, node, axes, rank)
        require_batch_kept(ctx, node, insert, "Unsqueeze inserts a dimension before")
        dims = iter(shape)
        add_reshape(ctx, node, x, shape, tuple(1 if i in insert else next(dims) for i in range(rank)))
