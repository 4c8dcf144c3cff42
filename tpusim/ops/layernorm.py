"""LayerNormalization (opset 17) over the trailing axes ``axis..`` (the last axis, or the last few),
with a scale, an optional bias and epsilon; and :func:`fuse_decomposed_layernorm`, a model rewrite
that turns the chain torch's TorchScript exporter writes for ``nn.LayerNorm`` below opset 17
(ReduceMean -> Sub -> Pow -> ReduceMean -> Add -> Sqrt -> Div [-> Mul -> Add]) back into one
LayerNormalization node. The chain spans several nodes and would otherwise lower as separate
elementwise layers (and Sqrt has no lowering), so the rewrite is registered with
:func:`tpusim.ops.register_rewrite` and runs on the canonical model before lowering.

Integers: a float step in the vector unit, like Softmax: the unit dequantizes the input,
normalises in float32 (mean, variance, ``(x - mean) / sqrt(var + eps) * scale + bias``) and
quantizes to the output's own grid. The scale and bias are float vectors the unit holds. Vector
unit: three passes over each vector (mean, variance, normalise), and one requantization per output
element.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from tpusim.frontend.context import node_attrs
from tpusim.ops import register, register_rewrite
from tpusim.ops._layout import normalized_axes
from tpusim.ops.base import Op, VectorCost, vectors

LAYERNORM_PASSES = 3


def layer_norm(x: np.ndarray, axis: int, epsilon: float, scale: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
    """Normalise ``x`` over its axes ``axis..`` in float32."""
    x = x.astype(np.float32, copy=False)
    axes = tuple(range(axis, x.ndim))
    mean = x.mean(axis=axes, keepdims=True, dtype=np.float32)
    centred = x - mean
    variance = (centred * centred).mean(axis=axes, keepdims=True, dtype=np.float32)
    y = centred / np.sqrt(variance + np.float32(epsilon)) * scale
    return y if bias is None else y + bias


@register
class LayerNormalization(Op):
    name = "layernorm"
    onnx_types = ("LayerNormalization",)

    def lower(self, ctx, node):
        x, shape = ctx.activation_input(node)
        attrs = node_attrs(node)
        axis = normalized_axes(ctx, node, [int(attrs.get("axis", -1))], len(shape))[0]
        if axis == 0:
            raise ctx.fail(node, "axis 0 would normalise across the batch")
        if any(out and ctx.consumers.get(out, 0) for out in node.output[1:]):
            raise ctx.fail(node, "the Mean/InvStdDev outputs are read; only the normalised output is supported")
        normalized = tuple(shape[axis:])
        arrays = []
        for index, what in ((1, "scale"), (2, "bias")):
            value = ctx.constant(node, index, what) if index == 1 else ctx.optional_constant(node, index, what)
            if value is not None:
                try:
                    value = np.ascontiguousarray(np.broadcast_to(value.astype(np.float32), normalized))
                except ValueError:
                    raise ctx.fail(node, f"{what} of shape {value.shape} does not fit the normalised shape "
                                         f"{normalized}") from None
            arrays.append(value)
        ctx.add_simple(node, self.name, [(x, shape)], shape, attrs=(
            ("axis", axis), ("epsilon", float(attrs.get("epsilon", 1e-5))), ("scale", arrays[0]), ("bias", arrays[1])))

    def reference(self, layer, inputs):
        return layer_norm(inputs[0], layer.attr("axis"), layer.attr("epsilon"), layer.attr("scale"), layer.attr("bias"))

    def quantize(self, layer, in_qps, y_qp, quant, input_mean):
        from tpusim.quant.qlayer import plain_qlayer
        return plain_qlayer(layer, in_qps, y_qp)

    def execute(self, ql, inputs, options):
        from tpusim.quant.arithmetic import dequantize, quantize
        from tpusim.quant.qlayer import clamp_output
        # C-contiguous, whatever layout the layer before left: numpy's float sums depend on the order they run in
        y = self.reference(ql.layer, [np.ascontiguousarray(dequantize(inputs[0], ql.input_qparams[0]))])
        return clamp_output(ql, quantize(y, ql.output_qparams)), 0

    def vector_cost(self, layer, in_elements, out_elements, lanes, int8):
        return VectorCost("layernorm", "none", LAYERNORM_PASSES * vectors(out_elements, lanes),
                          activation_ops=LAYERNORM_PASSES * out_elements, requant_ops=out_elements if int8 else 0)

    def export(self, b, layer, inputs, weight, bias, y):
        # Not "<name>_scale": a layer named like its output tensor would collide with that tensor's Q/DQ scale.
        args = [inputs[0], b.const(f"{layer.name}_gamma", layer.attr("scale"))]
        if layer.attr("bias") is not None:
            args.append(b.const(f"{layer.name}_beta", layer.attr("bias")))
        b.node("LayerNormalization", args, y, layer.name, axis=layer.attr("axis"), epsilon=layer.attr("epsilon"))


# -- the decomposed form ---------------------------------------------------------------------


class _Graph:
    """Read-only indexes of an ONNX graph for the pattern match."""

    def __init__(self, model: onnx.ModelProto):
        graph = model.graph
        self.nodes = list(graph.node)  # one wrapper per node, so identity comparisons hold
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
        self.constants = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
        for node in self.nodes:
            if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
                self.constants[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
        self.readers: dict[str, list[onnx.NodeProto]] = {}
        for node in self.nodes:
            for name in node.input:
                self.readers.setdefault(name, []).append(node)
        self.outputs = {o.name for o in graph.output}
        self._model = model
        self._shapes: dict[str, tuple] | None = None

    def only_reader(self, tensor: str, op_type: str) -> onnx.NodeProto | None:
        readers = self.readers.get(tensor, [])
        if len(readers) != 1 or tensor in self.outputs or readers[0].op_type != op_type:
            return None
        return readers[0]

    def other_input(self, node: onnx.NodeProto, tensor: str) -> str | None:
        if len(node.input) != 2 or tensor not in node.input:
            return None
        return node.input[1] if node.input[0] == tensor else node.input[0]

    def scalar(self, name: str | None) -> float | None:
        value = self.constants.get(name) if name else None
        return float(value.reshape(-1)[0]) if value is not None and value.size == 1 else None

    def reduce_axes(self, node: onnx.NodeProto) -> tuple[int, ...] | None:
        attrs = node_attrs(node)
        if not int(attrs.get("keepdims", 1)):
            return None
        if self.opset >= 18:
            value = self.constants.get(node.input[1]) if len(node.input) > 1 and node.input[1] else None
            return None if value is None else tuple(int(a) for a in value.reshape(-1))
        return tuple(int(a) for a in attrs["axes"]) if "axes" in attrs else None

    def shape(self, tensor: str) -> tuple | None:
        if self._shapes is None:
            try:  # data propagation follows the exporters' Shape -> Slice -> Concat -> Reshape chains
                inferred = onnx.shape_inference.infer_shapes(self._model, data_prop=True).graph
            except Exception:  # noqa: BLE001 - a model shape inference cannot read is simply not matched
                inferred = onnx.GraphProto()
            self._shapes = {}
            for vi in list(inferred.input) + list(inferred.value_info) + list(inferred.output):
                if vi.type.tensor_type.HasField("shape"):
                    dims = vi.type.tensor_type.shape.dim
                    self._shapes[vi.name] = tuple(d.dim_value if d.HasField("dim_value") else None for d in dims)
        return self._shapes.get(tensor)


def _match(g: _Graph, mean: onnx.NodeProto):
    """(nodes, x, axis, epsilon, scale, bias, output) of a decomposed LayerNorm starting at ``mean``."""
    x = mean.input[0]
    axes = g.reduce_axes(mean)
    sub = g.only_reader(mean.output[0], "Sub")
    if axes is None or sub is None or list(sub.input) != [x, mean.output[0]]:
        return None
    diff = sub.output[0]
    readers = g.readers.get(diff, [])
    if diff in g.outputs or sorted(n.op_type for n in readers) != ["Div", "Pow"]:
        return None
    power = next(n for n in readers if n.op_type == "Pow")
    divide = next(n for n in readers if n.op_type == "Div")
    if power.input[0] != diff or g.scalar(power.input[1]) != 2.0 or divide.input[0] != diff:
        return None
    variance = g.only_reader(power.output[0], "ReduceMean")
    if variance is None or g.reduce_axes(variance) != axes:
        return None
    add_eps = g.only_reader(variance.output[0], "Add")
    epsilon = g.scalar(g.other_input(add_eps, variance.output[0])) if add_eps is not None else None
    root = g.only_reader(add_eps.output[0], "Sqrt") if epsilon is not None else None
    if root is None or g.only_reader(root.output[0], "Div") is not divide or divide.input[1] != root.output[0]:
        return None
    nodes = [mean, sub, power, variance, add_eps, root, divide]
    scale = bias = None
    out = divide.output[0]
    multiply = g.only_reader(out, "Mul")
    if multiply is not None and g.other_input(multiply, out) in g.constants:
        scale = g.constants[g.other_input(multiply, out)]
        nodes.append(multiply)
        out = multiply.output[0]
        add_bias = g.only_reader(out, "Add")
        if add_bias is not None and g.other_input(add_bias, out) in g.constants:
            bias = g.constants[g.other_input(add_bias, out)]
            nodes.append(add_bias)
            out = add_bias.output[0]
    # The normalised axes must be the trailing ones: negative axes say so without the rank, positive
    # ones need x's shape. The normalised dims come from x's shape, or else from the scale's.
    shape = g.shape(x)
    if all(a < 0 for a in axes):
        count = len(axes)
        if sorted(axes) != list(range(-count, 0)) or (shape is not None and count >= len(shape)):
            return None
    else:
        if shape is None or any(not -len(shape) <= a < len(shape) for a in axes):
            return None
        positive = sorted(a % len(shape) for a in axes)
        count = len(positive)
        if positive != list(range(len(shape) - count, len(shape))) or count == len(shape):
            return None
    if shape is not None and all(d is not None for d in shape[-count:]):
        normalized = tuple(shape[-count:])
    elif scale is not None and scale.ndim >= count:
        normalized = tuple(scale.shape[-count:])
    else:
        return None
    try:
        scale = np.broadcast_to(np.float32(1.0) if scale is None else scale.astype(np.float32), normalized)
        bias = None if bias is None else np.broadcast_to(bias.astype(np.float32), normalized)
    except ValueError:
        return None
    return nodes, x, -count, epsilon, np.ascontiguousarray(scale), bias, out


# LayerNormalization needs opset 17. From 13 to 17 no op the front end lowers changed its meaning
# (14-16 added types, Reshape's allowzero and BatchNormalization's training outputs, both defaulting
# to the old behaviour), so such a model's opset import is raised to 17; below 13, Softmax,
# Squeeze/Unsqueeze, Split and ReduceSum read their arguments differently, so those models are
# left unfused.
_FUSE_FROM_OPSET = 13
_LAYERNORM_OPSET = 17


@register_rewrite
def fuse_decomposed_layernorm(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` rewritten in place with every decomposed LayerNorm chain replaced by one LayerNormalization
    node (named after the chain's first ReduceMean, writing the chain's output tensor), its scale and
    bias as new initializers, and the opset raised to 17 where it was 13-16. Constants and
    initializers only the chain read are dropped. Unchanged when nothing matched (or the opset is below 13).
    """
    if not any(node.op_type == "ReduceMean" for node in model.graph.node):
        return model  # (before _Graph, which reads every initializer into numpy)
    g = _Graph(model)
    if g.opset < _FUSE_FROM_OPSET:
        return model
    replaced: dict[int, onnx.NodeProto] = {}
    dropped: set[int] = set()
    initializers: list[onnx.TensorProto] = []
    for node in g.nodes:
        if node.op_type != "ReduceMean" or id(node) in dropped:
            continue
        found = _match(g, node)
        if found is None:
            continue
        nodes, x, axis, epsilon, scale, bias, out = found
        name = node.name or f"LayerNorm_{len(replaced)}"
        inputs = [x, f"{name}_scale"]
        initializers.append(numpy_helper.from_array(scale, inputs[1]))
        if bias is not None:
            inputs.append(f"{name}_bias")
            initializers.append(numpy_helper.from_array(np.ascontiguousarray(bias), inputs[2]))
        replaced[id(nodes[-1])] = helper.make_node("LayerNormalization", inputs, [out], name=name, axis=axis,
                                                   epsilon=epsilon)
        dropped.update(id(n) for n in nodes)
    if not replaced:
        return model
    graph = model.graph
    kept = [replaced.get(id(n), n) for n in g.nodes if id(n) in replaced or id(n) not in dropped]
    read = {name for n in kept for name in n.input} | {o.name for o in graph.output}
    kept = [n for n in kept if n.op_type != "Constant" or any(o in read for o in n.output)]
    chain_read = {name for n in g.nodes if id(n) in dropped for name in n.input}
    unused = [i for i, t in enumerate(graph.initializer) if t.name in chain_read and t.name not in read]
    for index in reversed(unused):
        del graph.initializer[index]
    del graph.node[:]
    graph.node.extend(kept)
    graph.initializer.extend(initializers)
    if g.opset < _LAYERNORM_OPSET:
        for opset in model.opset_import:
            if opset.domain in ("", "ai.onnx"):
                opset.version = _LAYERNORM_OPSET
        model.ir_version = max(model.ir_version, 8)
    return model
