"""What an op's lowering works with: the graph read so far (:class:`LowerContext`) and the layer it
is building (:class:`LayerRecord`). Op modules (``tpusim.ops``) receive a context and a node and
append records; :mod:`tpusim.frontend.lowering` walks the nodes and freezes the records."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx

from tpusim.errors import ModelError
from tpusim.ir import NO_ACTIVATION, Activation, ConvAttrs, Layer, PoolAttrs, Shape


@dataclass
class LayerRecord:
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
    attrs: tuple[tuple[str, object], ...] = ()

    def freeze(self) -> Layer:
        return Layer(
            name=self.name, op=self.op, inputs=tuple(self.inputs), output=self.output,
            input_shapes=tuple(self.input_shapes), output_shape=self.output_shape,
            activation=self.activation, weight=self.weight, bias=self.bias, conv=self.conv,
            pool=self.pool, axis=self.axis, attrs=self.attrs,
        )


@dataclass
class LowerContext:
    where: str
    opset: int
    original_batch: int | None
    consumers: dict[str, int]
    graph_outputs: set[str]
    constants: dict[str, np.ndarray]
    # The file was exported for exactly one sample (a fixed batch of 1) and runs so: no dim has to
    # stay the batch, so layout ops may move axis 0 (torchvision ViT's sequence-first attention).
    single_sample: bool = False
    shapes: dict[str, Shape] = field(default_factory=dict)
    alias: dict[str, str] = field(default_factory=dict)
    records: list[LayerRecord] = field(default_factory=list)
    producer: dict[str, LayerRecord] = field(default_factory=dict)
    # A QDQ model's quantized tensors: the model rounds there, so no weights are folded across them.
    model_quantized: frozenset[str] = frozenset()

    def resolve(self, name: str) -> str:
        while name in self.alias:
            name = self.alias[name]
        return name

    def fail(self, node: onnx.NodeProto, message: str) -> ModelError:
        return ModelError(f"{self.where}: node {node.name!r} ({node.op_type}): {message}")

    def is_constant(self, node: onnx.NodeProto, index: int) -> bool:
        return index < len(node.input) and bool(node.input[index]) and self.resolve(node.input[index]) in self.constants

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

    def add(self, record: LayerRecord) -> None:
        self.records.append(record)
        self.producer[record.output] = record
        self.shapes[record.output] = record.output_shape

    def add_simple(self, node: onnx.NodeProto, op: str, inputs: list[tuple[str, Shape]], output_shape: Shape,
                   **fields) -> LayerRecord:
        """Append a layer reading ``inputs`` (name, shape) and writing the node's first output."""
        record = LayerRecord(name=node.name, op=op, inputs=[n for n, _ in inputs], output=node.output[0],
                             input_shapes=[s for _, s in inputs], output_shape=tuple(output_shape), **fields)
        self.add(record)
        return record

    def sole_producer(self, tensor: str) -> LayerRecord | None:
        """The record producing ``tensor`` if this node is its only reader (so it may be rewritten)."""
        record = self.producer.get(tensor)
        if record is None or self.consumers.get(tensor, 0) != 1 or tensor in self.graph_outputs:
            return None
        return record

    def weights_foldable_across(self, tensor: str) -> bool:
        """Whether a per-channel scale/shift after ``tensor`` may be folded into its producer's weights
        and bias: not when a QDQ model quantizes ``tensor`` (its integer weights must stay its own)."""
        return tensor not in self.model_quantized

    def rename_output(self, record: LayerRecord, new_name: str) -> None:
        del self.producer[record.output]
        record.output = new_name
        self.producer[new_name] = record
        self.shapes[new_name] = record.output_shape


def node_attrs(node: onnx.NodeProto) -> dict:
    return {a.name: _decode(onnx.helper.get_attribute_value(a)) for a in node.attribute}


def _decode(value):
    return value.decode() if isinstance(value, bytes) else value


def spatial_pads(ctx: LowerContext, node: onnx.NodeProto, attrs: dict, in_hw: tuple[int, int], kernel: tuple[int, int],
                 strides: tuple[int, int], dilations: tuple[int, int]) -> tuple[int, int, int, int]:
    auto_pad = attrs.get("auto_pad", "NOTSET")
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


def conv_output_hw(h: int, w: int, attrs: ConvAttrs) -> tuple[int, int]:
    """A convolution's output height and width (pads, strides and dilations applied)."""
    (kh, kw), (sh, sw), (pt, pl, pb, pr), (dh, dw) = attrs.kernel, attrs.strides, attrs.pads, attrs.dilations
    h_out = (h + pt + pb - dh * (kh - 1) - 1) // sh + 1
    w_out = (w + pl + pr - dw * (kw - 1) - 1) // sw + 1
    return h_out, w_out


def pool_output_hw(h: int, w: int, attrs: PoolAttrs) -> tuple[int, int]:
    """A pooling's output height and width, in ``ceil_mode`` as ONNX defines it."""
    (kh, kw), (sh, sw), (pt, pl, pb, pr) = attrs.kernel, attrs.strides, attrs.pads
    rounding = np.ceil if attrs.ceil_mode else np.floor
    h_out = int(rounding((h + pt + pb - kh) / sh)) + 1
    w_out = int(rounding((w + pl + pr - kw) / sw)) + 1
    if attrs.ceil_mode:
        # ONNX: a window that starts inside the right/bottom padding is dropped.
        if (h_out - 1) * sh >= h + pt:
            h_out -= 1
        if (w_out - 1) * sw >= w + pl:
            w_out -= 1
    return h_out, w_out


def require_4d(ctx: LowerContext, node: onnx.NodeProto, shape: Shape) -> None:
    if len(shape) != 4:
        raise ctx.fail(node, f"expected a 4-D NCHW input, got shape {shape}")
