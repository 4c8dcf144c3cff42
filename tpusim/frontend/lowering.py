"""Lower an ONNX model to a :class:`tpusim.ir.Graph`.

One small lowering function per ONNX op, registered in ``_LOWERINGS``. Shapes are computed here
(not taken from ONNX shape inference) so that a run can override the batch size of any model.
BatchNormalization is folded into the preceding Conv/Gemm (white paper eq. 9-12) and Relu/Clip are
fused into the layer that produces their input when nothing else reads that tensor.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
from onnx import numpy_helper

from tpusim import tensor_ops
from tpusim.errors import ModelError
from tpusim.ir import NO_ACTIVATION, Activation, ConvAttrs, Graph, Layer, PoolAttrs, Shape

MIN_OPSET = 11
FUSABLE_PRODUCERS = ("conv", "gemm", "add", "avgpool", "global_avgpool", "maxpool")


@dataclass
class _Record:
    """A layer under construction; frozen into a :class:`Layer` once the whole graph is read."""

    name: str
    op: str
    inputs: list[str]
    output: str
    input_shapes: list[Shape]
    output_shape: Shape
    activation: Activation = NO_ACTIVATION
    weight: np.ndarray | None = None
    bias: np.ndarray | None = None
    conv: ConvAttrs | None = None
    pool: PoolAttrs | None = None
    axis: int = 1

    def freeze(self) -> Layer:
        return Layer(
            name=self.name, op=self.op, inputs=tuple(self.inputs), output=self.output,
            input_shapes=tuple(self.input_shapes), output_shape=self.output_shape,
            activation=self.activation, weight=self.weight, bias=self.bias, conv=self.conv,
            pool=self.pool, axis=self.axis,
        )


@dataclass
class _Context:
    where: str
    opset: int
    original_batch: int | None
    consumers: dict[str, int]
    graph_outputs: set[str]
    constants: dict[str, np.ndarray]
    shapes: dict[str, Shape] = field(default_factory=dict)
    alias: dict[str, str] = field(default_factory=dict)
    records: list[_Record] = field(default_factory=list)
    producer: dict[str, _Record] = field(default_factory=dict)

    def resolve(self, name: str) -> str:
        while name in self.alias:
            name = self.alias[name]
        return name

    def fail(self, node: onnx.NodeProto, message: str) -> ModelError:
        return ModelError(f"{self.where}: node {node.name!r} ({node.op_type}): {message}")

    def activation_input(self, node: onnx.NodeProto, index: int = 0) -> tuple[str, Shape]:
        if index >= len(node.input) or not node.input[index]:
            raise self.fail(node, f"missing input {index}")
        name = self.resolve(node.input[index])
        if name in self.constants:
            raise self.fail(node, f"input {name!r} is a constant; expected an activation tensor")
        if name not in self.shapes:
            raise self.fail(node, f"input {name!r} is not produced by any earlier node")
        return name, self.shapes[name]

    def constant(self, node: onnx.NodeProto, index: int, what: str) -> np.ndarray:
        if index >= len(node.input) or not node.input[index]:
            raise self.fail(node, f"missing {what}")
        name = self.resolve(node.input[index])
        if name not in self.constants:
            raise self.fail(node, f"{what} {name!r} must be an initializer or Constant (computed {what}s are not supported)")
        return self.constants[name]

    def optional_constant(self, node: onnx.NodeProto, index: int, what: str) -> np.ndarray | None:
        if index >= len(node.input) or not node.input[index]:
            return None
        return self.constant(node, index, what)

    def add(self, record: _Record) -> None:
        self.records.append(record)
        self.producer[record.output] = record
        self.shapes[record.output] = record.output_shape

    def sole_producer(self, tensor: str) -> _Record | None:
        """The record producing ``tensor`` if this node is its only reader (so it may be rewritten)."""
        record = self.producer.get(tensor)
        if record is None or self.consumers.get(tensor, 0) != 1 or tensor in self.graph_outputs:
            return None
        return record

    def rename_output(self, record: _Record, new_name: str) -> None:
        del self.producer[record.output]
        record.output = new_name
        self.producer[new_name] = record
        self.shapes[new_name] = record.output_shape


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _decode(value):
    return value.decode() if isinstance(value, bytes) else value


def _spatial_pads(ctx: _Context, node: onnx.NodeProto, attrs: dict, in_hw: tuple[int, int], kernel: tuple[int, int],
                  strides: tuple[int, int], dilations: tuple[int, int]) -> tuple[int, int, int, int]:
    auto_pad = _decode(attrs.get("auto_pad", "NOTSET"))
    if auto_pad in ("NOTSET", ""):
        pads = tuple(int(p) for p in attrs.get("pads", (0, 0, 0, 0)))
        if len(pads) != 4:
            raise ctx.fail(node, f"expected 4 pads for a 2-D op, got {len(pads)}")
        return pads[0], pads[1], pads[2], pads[3]
    if auto_pad == "VALID":
        return 0, 0, 0, 0
    if auto_pad not in ("SAME_UPPER", "SAME_LOWER"):
        raise ctx.fail(node, f"unknown auto_pad {auto_pad!r}")
    begin, end = [], []
    for size, k, s, d in zip(in_hw, kernel, strides, dilations):
        out = -(-size // s)
        total = max(0, (out - 1) * s + (k - 1) * d + 1 - size)
        small, large = total // 2, total - total // 2
        begin.append(small if auto_pad == "SAME_UPPER" else large)
        end.append(large if auto_pad == "SAME_UPPER" else small)
    return begin[0], begin[1], end[0], end[1]


def _require_4d(ctx: _Context, node: onnx.NodeProto, shape: Shape) -> None:
    if len(shape) != 4:
        raise ctx.fail(node, f"expected a 4-D NCHW input, got shape {shape}")


def _lower_conv(ctx: _Context, node: onnx.NodeProto) -> None:
    x, shape = ctx.activation_input(node)
    _require_4d(ctx, node, shape)
    weight = ctx.constant(node, 1, "weight").astype(np.float32)
    bias = ctx.optional_constant(node, 2, "bias")
    attrs = _attrs(node)
    if weight.ndim != 4:
        raise ctx.fail(node, f"only 2-D convolutions are supported (weight shape {weight.shape})")
    groups = int(attrs.get("group", 1))
    c_out, c_in_g, kh, kw = weight.shape
    if shape[1] != c_in_g * groups or c_out % groups:
        raise ctx.fail(node, f"weight {weight.shape} with group={groups} does not fit input {shape}")
    kernel = tuple(int(k) for k in attrs.get("kernel_shape", (kh, kw)))
    if kernel != (kh, kw):
        raise ctx.fail(node, f"kernel_shape {kernel} disagrees with weight shape {weight.shape}")
    strides = tuple(int(s) for s in attrs.get("strides", (1, 1)))
    dilations = tuple(int(d) for d in attrs.get("dilations", (1, 1)))
    pads = _spatial_pads(ctx, node, attrs, (shape[2], shape[3]), kernel, strides, dilations)
    conv = ConvAttrs(kernel=kernel, strides=strides, pads=pads, dilations=dilations, groups=groups)
    h_out, w_out = tensor_ops.conv_output_hw(shape[2], shape[3], conv)
    if h_out < 1 or w_out < 1:
        raise ctx.fail(node, f"output would be empty for input {shape}")
    ctx.add(_Record(
        name=node.name, op="conv", inputs=[x], output=node.output[0], input_shapes=[shape],
        output_shape=(shape[0], c_out, h_out, w_out), weight=weight,
        bias=None if bias is None else bias.astype(np.float32).reshape(c_out), conv=conv,
    ))


def _lower_gemm(ctx: _Context, node: onnx.NodeProto) -> None:
    x, shape = ctx.activation_input(node)
    attrs = _attrs(node)
    if int(attrs.get("transA", 0)):
        raise ctx.fail(node, "transA=1 is not supported")
    if len(shape) != 2:
        raise ctx.fail(node, f"expected a 2-D input, got shape {shape}")
    b = ctx.constant(node, 1, "weight").astype(np.float32)
    weight = b if int(attrs.get("transB", 0)) else b.T
    weight = np.ascontiguousarray(weight * np.float32(attrs.get("alpha", 1.0)))
    n, k = weight.shape
    if shape[1] != k:
        raise ctx.fail(node, f"weight {b.shape} does not fit input {shape}")
    c = ctx.optional_constant(node, 2, "bias")
    bias = None
    if c is not None:
        if c.size not in (1, n):
            raise ctx.fail(node, f"bias of shape {c.shape} is not a per-output vector")
        bias = np.broadcast_to(c.astype(np.float32).reshape(-1), (n,)) * np.float32(attrs.get("beta", 1.0))
        bias = np.ascontiguousarray(bias)
    ctx.add(_Record(name=node.name, op="gemm", inputs=[x], output=node.output[0], input_shapes=[shape],
                    output_shape=(shape[0], n), weight=weight, bias=bias))


def _lower_matmul(ctx: _Context, node: onnx.NodeProto) -> None:
    x, shape = ctx.activation_input(node)
    b = ctx.constant(node, 1, "weight (second MatMul operand)")
    if b.ndim != 2:
        raise ctx.fail(node, f"only a 2-D constant second operand is supported, got shape {b.shape}")
    k, n = b.shape
    if shape[-1] != k:
        raise ctx.fail(node, f"weight {b.shape} does not fit input {shape}")
    ctx.add(_Record(name=node.name, op="gemm", inputs=[x], output=node.output[0], input_shapes=[shape],
                    output_shape=tuple(shape[:-1]) + (n,), weight=np.ascontiguousarray(b.astype(np.float32).T)))


def _lower_batchnorm(ctx: _Context, node: onnx.NodeProto) -> None:
    x, shape = ctx.activation_input(node)
    gamma, beta, mean, var = (ctx.constant(node, i, what).astype(np.float64)
                              for i, what in enumerate(("scale", "bias", "mean", "var"), start=1))
    eps = float(_attrs(node).get("epsilon", 1e-5))
    producer = ctx.sole_producer(x)
    if producer is None or producer.op not in ("conv", "gemm") or producer.activation.kind != "none":
        raise ctx.fail(node, "BatchNormalization must directly follow a Conv/Gemm/MatMul whose output nothing "
                             "else reads, so it can be folded")
    factor = gamma / np.sqrt(var + eps)
    n_out = producer.weight.shape[0]
    if factor.shape != (n_out,):
        raise ctx.fail(node, f"{factor.shape[0]} channels do not match the {n_out} outputs of {producer.name!r}")
    old_bias = np.zeros(n_out) if producer.bias is None else producer.bias.astype(np.float64)
    folded_w = producer.weight.astype(np.float64) * factor.reshape((-1,) + (1,) * (producer.weight.ndim - 1))
    producer.weight = folded_w.astype(np.float32)
    producer.bias = ((old_bias - mean) * factor + beta).astype(np.float32)
    ctx.rename_output(producer, node.output[0])


def _fuse_or_add_activation(ctx: _Context, node: onnx.NodeProto, activation: Activation) -> None:
    x, shape = ctx.activation_input(node)
    producer = ctx.sole_producer(x)
    if producer is not None and producer.op in FUSABLE_PRODUCERS and producer.activation.kind == "none":
        producer.activation = activation
        ctx.rename_output(producer, node.output[0])
        return
    ctx.add(_Record(name=node.name, op="activation", inputs=[x], output=node.output[0], input_shapes=[shape],
                    output_shape=shape, activation=activation))


def _lower_relu(ctx: _Context, node: onnx.NodeProto) -> None:
    _fuse_or_add_activation(ctx, node, Activation("relu", 0.0, math.inf))


def _lower_clip(ctx: _Context, node: onnx.NodeProto) -> None:
    if ctx.opset < 11:
        attrs = _attrs(node)
        lo, hi = attrs.get("min", -math.inf), attrs.get("max", math.inf)
    else:
        lo_arr = ctx.optional_constant(node, 1, "min")
        hi_arr = ctx.optional_constant(node, 2, "max")
        lo = -math.inf if lo_arr is None else float(lo_arr)
        hi = math.inf if hi_arr is None else float(hi_arr)
    if lo > hi:
        raise ctx.fail(node, f"min {lo} > max {hi}")
    kind = "relu" if lo == 0.0 and hi == math.inf else "clip"
    _fuse_or_add_activation(ctx, node, Activation(kind, float(lo), float(hi)))


def _lower_pool(ctx: _Context, node: onnx.NodeProto) -> None:
    x, shape = ctx.activation_input(node)
    _require_4d(ctx, node, shape)
    attrs = _attrs(node)
    kernel = tuple(int(k) for k in attrs["kernel_shape"])
    strides = tuple(int(s) for s in attrs.get("strides", (1, 1)))
    dilations = tuple(int(d) for d in attrs.get("dilations", (1, 1)))
    if dilations != (1, 1):
        raise ctx.fail(node, "dilated pooling is not supported")
    if len(kernel) != 2:
        raise ctx.fail(node, f"only 2-D pooling is supported (kernel_shape {kernel})")
    pads = _spatial_pads(ctx, node, attrs, (shape[2], shape[3]), kernel, strides, dilations)
    pool = PoolAttrs(kernel=kernel, strides=strides, pads=pads, ceil_mode=bool(attrs.get("ceil_mode", 0)),
                     count_include_pad=bool(attrs.get("count_include_pad", 0)))
    h_out, w_out = tensor_ops.pool_output_hw(shape[2], shape[3], pool)
    op = "maxpool" if node.op_type == "MaxPool" else "avgpool"
    ctx.add(_Record(name=node.name, op=op, inputs=[x], output=node.output[0], input_shapes=[shape],
                    output_shape=(shape[0], shape[1], h_out, w_out), pool=pool))


def _lower_global_avgpool(ctx: _Context, node: onnx.NodeProto) -> None:
    x, shape = ctx.activation_input(node)
    _require_4d(ctx, node, shape)
    ctx.add(_Record(name=node.name, op="global_avgpool", inputs=[x], output=node.output[0], input_shapes=[shape],
                    output_shape=(shape[0], shape[1], 1, 1)))


def _lower_add(ctx: _Context, node: onnx.NodeProto) -> None:
    names = [ctx.resolve(n) for n in node.input]
    constant_inputs = [n for n in names if n in ctx.constants]
    if len(constant_inputs) == 1:
        _fold_bias_add(ctx, node, names)
        return
    a, shape_a = ctx.activation_input(node, 0)
    b, shape_b = ctx.activation_input(node, 1)
    if shape_a != shape_b:
        raise ctx.fail(node, f"broadcasting Add is not supported (shapes {shape_a} and {shape_b})")
    ctx.add(_Record(name=node.name, op="add", inputs=[a, b], output=node.output[0], input_shapes=[shape_a, shape_b],
                    output_shape=shape_a))


def _fold_bias_add(ctx: _Context, node: onnx.NodeProto, names: list[str]) -> None:
    """MatMul + Add(constant) (how Linear layers are often exported) becomes one gemm with a bias."""
    x = next(n for n in names if n not in ctx.constants)
    addend = ctx.constants[next(n for n in names if n in ctx.constants)]
    producer = ctx.sole_producer(x)
    if producer is None or producer.op not in ("conv", "gemm") or producer.activation.kind != "none":
        raise ctx.fail(node, "adding a constant is supported only as the bias of a preceding Conv/Gemm/MatMul")
    n_out = producer.weight.shape[0]
    per_channel = addend.reshape(-1) if addend.size in (1, n_out) else None
    if per_channel is None:
        raise ctx.fail(node, f"constant of shape {addend.shape} is not a per-output-channel bias")
    old = np.zeros(n_out, np.float32) if producer.bias is None else producer.bias
    producer.bias = (old + np.broadcast_to(per_channel.astype(np.float32), (n_out,))).astype(np.float32)
    ctx.rename_output(producer, node.output[0])


def _lower_concat(ctx: _Context, node: onnx.NodeProto) -> None:
    inputs = [ctx.activation_input(node, i) for i in range(len(node.input))]
    shapes = [s for _, s in inputs]
    rank = len(shapes[0])
    axis = int(_attrs(node)["axis"]) % rank
    for s in shapes[1:]:
        if len(s) != rank or any(a != b for i, (a, b) in enumerate(zip(s, shapes[0])) if i != axis):
            raise ctx.fail(node, f"incompatible shapes {shapes} for axis {axis}")
    out = list(shapes[0])
    out[axis] = sum(s[axis] for s in shapes)
    ctx.add(_Record(name=node.name, op="concat", inputs=[n for n, _ in inputs], output=node.output[0],
                    input_shapes=shapes, output_shape=tuple(out), axis=axis))


def _add_reshape(ctx: _Context, node: onnx.NodeProto, x: str, shape: Shape, out: Shape) -> None:
    if math.prod(out) != math.prod(shape):
        raise ctx.fail(node, f"cannot reshape {shape} to {out}")
    ctx.add(_Record(name=node.name, op="reshape", inputs=[x], output=node.output[0], input_shapes=[shape],
                    output_shape=out))


def _lower_flatten(ctx: _Context, node: onnx.NodeProto) -> None:
    x, shape = ctx.activation_input(node)
    axis = int(_attrs(node).get("axis", 1)) % (len(shape) + 1)
    if axis == 0:
        raise ctx.fail(node, "Flatten with axis=0 would mix the batch into the features")
    _add_reshape(ctx, node, x, shape, (math.prod(shape[:axis]), math.prod(shape[axis:])))


def _lower_reshape(ctx: _Context, node: onnx.NodeProto) -> None:
    x, shape = ctx.activation_input(node)
    target = [int(v) for v in ctx.constant(node, 1, "shape").reshape(-1)]
    if _attrs(node).get("allowzero", 0) and 0 in target:
        raise ctx.fail(node, "allowzero=1 with a zero dimension is not supported")
    # The batch dimension follows the run's batch size, whatever the exported graph hard-coded.
    if target and (target[0] in (0, -1) or target[0] == ctx.original_batch):
        rest = [shape[i + 1] if v == 0 else v for i, v in enumerate(target[1:])]
        per_sample = math.prod(shape[1:])
        if rest.count(-1) > 1:
            raise ctx.fail(node, f"more than one -1 in shape {target}")
        if -1 in rest:
            known = math.prod(v for v in rest if v != -1)
            if known == 0 or per_sample % known:
                raise ctx.fail(node, f"cannot reshape {shape} to {target}")
            rest[rest.index(-1)] = per_sample // known
        _add_reshape(ctx, node, x, shape, (shape[0], *rest))
        return
    raise ctx.fail(node, f"reshape target {target} does not keep the batch dimension first")


def _lower_softmax(ctx: _Context, node: onnx.NodeProto) -> None:
    x, shape = ctx.activation_input(node)
    default = -1 if ctx.opset >= 13 else 1
    axis = int(_attrs(node).get("axis", default)) % len(shape)
    if ctx.opset < 13 and axis != len(shape) - 1:
        raise ctx.fail(node, "opset < 13 Softmax over several trailing axes is not supported")
    ctx.add(_Record(name=node.name, op="softmax", inputs=[x], output=node.output[0], input_shapes=[shape],
                    output_shape=shape, axis=axis))


def _lower_elementwise(op: str) -> Callable[[_Context, onnx.NodeProto], None]:
    def lower(ctx: _Context, node: onnx.NodeProto) -> None:
        x, shape = ctx.activation_input(node)
        ctx.add(_Record(name=node.name, op=op, inputs=[x], output=node.output[0], input_shapes=[shape],
                        output_shape=shape))

    return lower


def _lower_identity(ctx: _Context, node: onnx.NodeProto) -> None:
    name, _ = ctx.activation_input(node)
    ctx.alias[node.output[0]] = name
    ctx.consumers[name] -= 1  # an alias is not a reader: its own readers are counted when they resolve it
    if node.output[0] in ctx.graph_outputs:
        ctx.graph_outputs.add(name)
    for extra in node.output[1:]:
        if extra and ctx.consumers.get(extra, 0):
            raise ctx.fail(node, f"output {extra!r} (the dropout mask) is read; only inference graphs are supported")


def _lower_constant(ctx: _Context, node: onnx.NodeProto) -> None:
    attrs = _attrs(node)
    if "value" not in attrs:
        raise ctx.fail(node, f"only the 'value' form of Constant is supported (got {sorted(attrs)})")
    ctx.constants[node.output[0]] = numpy_helper.to_array(attrs["value"])


_LOWERINGS: dict[str, Callable[[_Context, onnx.NodeProto], None]] = {
    "Conv": _lower_conv,
    "Gemm": _lower_gemm,
    "MatMul": _lower_matmul,
    "BatchNormalization": _lower_batchnorm,
    "Relu": _lower_relu,
    "Clip": _lower_clip,
    "MaxPool": _lower_pool,
    "AveragePool": _lower_pool,
    "GlobalAveragePool": _lower_global_avgpool,
    "Add": _lower_add,
    "Concat": _lower_concat,
    "Flatten": _lower_flatten,
    "Reshape": _lower_reshape,
    "Softmax": _lower_softmax,
    "Sigmoid": _lower_elementwise("sigmoid"),
    "Tanh": _lower_elementwise("tanh"),
    "Identity": _lower_identity,
    "Dropout": _lower_identity,
    "Constant": _lower_constant,
}

SUPPORTED_OPS = tuple(sorted(_LOWERINGS))


def _input_shape(where: str, value_info: onnx.ValueInfoProto, batch: int, override: Shape | None) -> tuple[Shape, int | None]:
    dims = value_info.type.tensor_type.shape.dim
    declared = [d.dim_value if d.HasField("dim_value") else None for d in dims]
    original_batch = declared[0] if declared else None
    if override is not None:
        if len(override) != len(declared) and declared:
            raise ModelError(f"{where}: --input-shape {override} has rank {len(override)}, "
                             f"but input {value_info.name!r} has rank {len(declared)}")
        return (batch, *override[1:]), original_batch
    if not declared:
        raise ModelError(f"{where}: input {value_info.name!r} has no shape; pass --input-shape")
    missing = [i for i, d in enumerate(declared[1:], start=1) if not d]
    if missing:
        raise ModelError(f"{where}: input {value_info.name!r} has dynamic dims {missing} (shape "
                         f"{['?' if d is None else d for d in declared]}); pass --input-shape, e.g. 1,3,224,224")
    return (batch, *declared[1:]), original_batch


def lower_model(model: onnx.ModelProto, where: str, batch: int = 1, input_shape: Shape | None = None) -> Graph:
    """Lower an in-memory ONNX model; ``where`` names it in error messages."""
    if batch < 1:
        raise ModelError(f"{where}: batch must be >= 1, got {batch}")
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    newest = onnx.defs.onnx_opset_version()
    if opset is None or not MIN_OPSET <= opset <= newest:
        raise ModelError(f"{where}: opset {opset} is not supported (supported: {MIN_OPSET} to {newest})")
    graph = model.graph
    constants = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    inputs = [vi for vi in graph.input if vi.name not in constants]
    if len(inputs) != 1:
        raise ModelError(f"{where}: expected exactly one input tensor, found {[vi.name for vi in inputs]}")
    elem_type = inputs[0].type.tensor_type.elem_type
    if elem_type != onnx.TensorProto.FLOAT:
        raise ModelError(f"{where}: input {inputs[0].name!r} is {onnx.TensorProto.DataType.Name(elem_type)}; "
                         "tpusim reads FP32 models and quantizes them itself")
    shape, original_batch = _input_shape(where, inputs[0], batch, input_shape)
    consumers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            consumers[name] = consumers.get(name, 0) + 1
    ctx = _Context(where=where, opset=opset, original_batch=original_batch, consumers=consumers,
                   graph_outputs={o.name for o in graph.output}, constants=constants)
    ctx.shapes[inputs[0].name] = shape
    for index, node in enumerate(graph.node):
        if node.domain not in ("", "ai.onnx"):
            raise ModelError(f"{where}: node {node.name!r} ({node.op_type}): custom domain {node.domain!r} is not supported")
        if not node.name:
            node.name = f"{node.op_type}_{index}"
        lowering = _LOWERINGS.get(node.op_type)
        if lowering is None:
            raise ModelError(f"{where}: node {node.name!r} ({node.op_type}): unsupported op; supported: "
                             f"{', '.join(SUPPORTED_OPS)}")
        # Consumer counts follow aliases so a Dropout/Identity between two nodes does not block fusion.
        for name in node.input:
            resolved = ctx.resolve(name)
            if resolved != name:
                consumers[resolved] = consumers.get(resolved, 0) + consumers.get(name, 0)
                consumers[name] = 0
        lowering(ctx, node)
    outputs = tuple(ctx.resolve(o.name) for o in graph.output)
    for name in outputs:
        if name not in ctx.producer:
            raise ModelError(f"{where}: graph output {name!r} is not computed from the input")
    layers = tuple(record.freeze() for record in ctx.records)
    return Graph(name=graph.name or Path(where).stem, input_name=inputs[0].name, input_shape=shape,
                 outputs=outputs, layers=_prune_dead(layers, outputs))


def _prune_dead(layers: tuple[Layer, ...], outputs: tuple[str, ...]) -> tuple[Layer, ...]:
    needed = set(outputs)
    kept = []
    for layer in reversed(layers):
        if layer.output in needed:
            kept.append(layer)
            needed.update(layer.inputs)
    return tuple(reversed(kept))


def load_onnx(path: str | Path, batch: int = 1, input_shape: Shape | None = None) -> Graph:
    """Read, check and lower an ONNX file; every failure is a one-line :class:`ModelError`."""
    path = Path(path)
    where = str(path)
    if path.is_dir():
        raise ModelError(f"{where}: is a folder, not an ONNX model file")
    if not path.is_file():
        raise ModelError(f"{where}: no such model file")
    try:
        model = onnx.load(str(path))
    except Exception as exc:  # protobuf raises several unrelated types for corrupt input
        raise ModelError(f"{where}: not a readable ONNX model (corrupt or truncated): {type(exc).__name__}") from None
    if not model.graph.node:
        raise ModelError(f"{where}: not a readable ONNX model (empty graph; corrupt or truncated?)")
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "invalid model"
        raise ModelError(f"{where}: ONNX checker: {first}") from None
    return lower_model(model, where, batch=batch, input_shape=input_shape)
