"""Reshape and Flatten: the same bytes seen with another shape (any rank: ShuffleNet's channel
shuffle reshapes [N, C, H, W] to [N, g, C/g, H, W] and back; Squeeze/Unsqueeze lower here too).

The unified buffer holds the tensor unchanged, so the tiler aliases the output to the input (no
instruction, no bytes) and the integers are the input's, on its grid.
"""
from __future__ import annotations

import math

import numpy as np

from tpusim.frontend.context import node_attrs
from tpusim.ops import register
from tpusim.ops._layout import batch_of_one
from tpusim.ops.base import Op


def add_reshape(ctx, node, x: str, shape, out) -> None:
    if math.prod(out) != math.prod(shape):
        raise ctx.fail(node, f"cannot reshape {shape} to {out}")
    ctx.add_simple(node, "reshape", [(x, shape)], tuple(out))


@register
class Reshape(Op):
    name = "reshape"
    onnx_types = ("Reshape", "Flatten")
    inherits_grid = True
    alias = True

    def lower(self, ctx, node):
        x, shape = ctx.activation_input(node)
        if node.op_type == "Flatten":
            axis = int(node_attrs(node).get("axis", 1)) % (len(shape) + 1)
            if axis == 0:
                raise ctx.fail(node, "Flatten with axis=0 would mix the batch into the features")
            add_reshape(ctx, node, x, shape, (math.prod(shape[:axis]), math.prod(shape[axis:])))
            return
        target = [int(v) for v in ctx.constant(node, 1, "shape").reshape(-1)]
        if node_attrs(node).get("allowzero", 0) and 0 in target:
            raise ctx.fail(node, "allowzero=1 with a zero dimension is not supported")
        if not target:
            raise ctx.fail(node, "empty reshape target")
        if any(v == 0 and i >= len(shape) for i, v in enumerate(target)):
            raise ctx.fail(node, f"a 0 in shape {target} copies a dimension the input {shape} does not have")
        if batch_of_one(ctx) and (shape[0] != 1 or target[0] not in (0, -1, 1)):
            # Exported for one sample and run so: any dimension may lead (torchvision ViT's sequence-first
            # attention), ONNX's own rule.
            out = [shape[i] if v == 0 else v for i, v in enumerate(target)]
            if out.count(-1) > 1:
                raise ctx.fail(node, f"more than one -1 in shape {target}")
            if -1 in out:
                known = math.prod(v for v in out if v != -1)
                if known == 0 or math.prod(shape) % known:
                    raise ctx.fail(node, f"cannot reshape {shape} to {target}")
                out[out.index(-1)] = math.prod(shape) // known
            add_reshape(ctx, node, x, shape, tuple(out))
            return
        rest = [shape[i + 1] if v == 0 else v for i, v in enumerate(target[1:])]
        per_sample = math.prod(shape[1:])
        # The batch dimension follows the run's batch size, whatever the exported graph hard-coded: a
        # leading 0/-1, the file's batch, this run's batch, or any number when the other dims hold
        # exactly one sample (the dynamo exporter's [1, 16, 16] at another batch, which ONNX itself
        # would refuse) is the batch.
        one_sample = -1 not in rest and math.prod(rest) == per_sample
        if not (target[0] in (0, -1, ctx.original_batch, shape[0]) or one_sample):
            raise ctx.fail(node, f"reshape target {target} does not keep the batch dimension first")
        if rest.count(-1) > 1:
            raise ctx.fail(node, f"more than one -1 in shape {target}")
        if -1 in rest:
            known = math.prod(v for v in rest if v != -1)
            if known == 0 or per_sample % known:
                raise ctx.fail(node, f"cannot reshape {shape} to {target}")
            rest[rest.index(-1)] = per_sample // known
        add_reshape(ctx, node, x, shape, (shape[0], *rest))

    def reference(self, layer, inputs):
        return inputs[0].reshape(layer.output_shape)

    def quantize(self, layer, in_qps, y_qp, quant, input_mean):
        from tpusim.quant.qlayer import plain_qlayer
        return plain_qlayer(layer, in_qps, y_qp)

    def execute(self, ql, inputs, options):
        return inputs[0].reshape(ql.layer.output_shape), 0

    def export(self, b, layer, inputs, weight, bias, y):
        shape = b.const(f"{layer.name}_shape", np.array(layer.output_shape, np.int64))
        b.node("Reshape", [inputs[0], shape], y, layer.name)
