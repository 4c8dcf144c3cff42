"""Lower an ONNX model to a :class:`tpusim.ir.Graph`.

Nodes are lowered one by one by the op module registered for their type (:mod:`tpusim.ops`).
Shapes are computed here (not taken from ONNX shape inference) so that a run can override the batch
size of any model. BatchNormalization is folded into the preceding Conv/Gemm (white paper eq. 9-12)
and Relu/Clip are fused into the layer that produces their input when nothing else reads that tensor.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from tpusim import ops
from tpusim.errors import ModelError
from tpusim.frontend.context import LowerContext
from tpusim.ir import Graph, Layer, Shape

MIN_OPSET = 11


def supported_ops() -> tuple[str, ...]:
    """ONNX op types the front end lowers."""
    return ops.onnx_types()


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
    ctx = LowerContext(where=where, opset=opset, original_batch=original_batch, consumers=consumers,
                   graph_outputs={o.name for o in graph.output}, constants=constants)
    ctx.shapes[inputs[0].name] = shape
    for index, node in enumerate(graph.node):
        if node.domain not in ("", "ai.onnx"):
            raise ModelError(f"{where}: node {node.name!r} ({node.op_type}): custom domain {node.domain!r} is not supported")
        if not node.name:
            node.name = f"{node.op_type}_{index}"
        module = ops.lowering(node.op_type)
        if module is None:
            raise ModelError(f"{where}: node {node.name!r} ({node.op_type}): unsupported op; supported: "
                             f"{', '.join(supported_ops())}")
        # Consumer counts follow aliases so a Dropout/Identity between two nodes does not block fusion.
        for name in node.input:
            resolved = ctx.resolve(name)
            if resolved != name:
                consumers[resolved] = consumers.get(resolved, 0) + consumers.get(name, 0)
                consumers[name] = 0
        module.lower(ctx, node)
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
