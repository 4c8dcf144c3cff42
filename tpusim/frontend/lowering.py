"""Lower an ONNX model to a :class:`tpusim.ir.Graph`.

The model is first canonicalised (:mod:`tpusim.frontend.canonical`: static shapes for the run's
batch, constants and shape arithmetic folded, exporter noise removed, old opsets converted) and a
QDQ model is split into its float graph and its own quantization (:mod:`tpusim.frontend.qdq`).
Nodes are then lowered one by one by the op module registered for their type (:mod:`tpusim.ops`),
which computes each layer's shapes itself. BatchNormalization is folded into the preceding Conv/Gemm (white paper eq. 9-12)
and Relu/Clip are fused into the layer that produces their input when nothing else reads that tensor.
"""
from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import numpy as np
import onnx

from tpusim import ops
from tpusim.errors import ModelError
from tpusim.frontend.canonical import RawWeights, canonicalize, read_model, tensor_array
from tpusim.frontend.context import LowerContext
from tpusim.frontend.qdq import WeightQuant, strip_qdq
from tpusim.ir import Activation, Graph, Layer, Shape

def supported_ops() -> tuple[str, ...]:
    """ONNX op types the front end lowers."""
    return ops.onnx_types()


def _raise_unsupported(model: onnx.ModelProto, where: str) -> None:
    """One line naming every op the model uses that tpusim cannot lower, with counts."""
    missing = Counter(node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"
                      for node in model.graph.node
                      if node.domain not in ("", "ai.onnx") or ops.lowering(node.op_type) is None)
    if missing:
        listed = ", ".join(f"{op} x{count}" for op, count in sorted(missing.items(), key=lambda i: (-i[1], i[0])))
        raise ModelError(f"{where}: unsupported ops: {listed} (`tpusim check` lists every node)")


def _matrix_sources(ctx: LowerContext, node: onnx.NodeProto) -> tuple[str | None, str | None]:
    """The constants a matrix node reads as its weight and its bias."""
    weight = ctx.resolve(node.input[1]) if len(node.input) > 1 and node.input[1] else None
    bias = ctx.resolve(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    return weight, bias


def _model_weight_attrs(node: onnx.NodeProto, weight: WeightQuant | None, bias: WeightQuant | None) -> tuple:
    """A QDQ model's weight scales (per output channel of the (N, K)/OIHW weight) and int32 bias."""
    attrs: list[tuple[str, object]] = []
    if weight is not None:
        scale = weight.scale
        if weight.axis is not None:
            # The output channel is axis 0 of Conv's OIHW and of a transB Gemm's (N, K); axis 1 of
            # MatMul's and a plain Gemm's (K, N), which the lowering stores transposed.
            transposed = node.op_type == "MatMul" or (node.op_type == "Gemm" and not _gemm_trans_b(node))
            if weight.axis != (1 if transposed else 0):
                raise ModelError(f"node {node.name!r} ({node.op_type}): weights quantized per channel along axis "
                                 f"{weight.axis}, not along the output channels")
        if np.any(weight.zero_point != 0):
            raise ModelError(f"node {node.name!r} ({node.op_type}): asymmetric weights (zero point "
                             f"{weight.zero_point.reshape(-1)[0]}) are not supported: the chip's weights are "
                             "symmetric int8 (quantize with weight_type=QInt8)")
        attrs.append(("weight_scale", np.asarray(scale, np.float64)))
        attrs.append(("weight_qmin", int(np.iinfo(weight.values.dtype).min)))
    if bias is not None and bias.values.dtype == np.int32:
        attrs.append(("bias_int32", np.asarray(bias.values, np.int32).reshape(-1)))
    return tuple(attrs)


def _gemm_trans_b(node: onnx.NodeProto) -> bool:
    return any(a.name == "transB" and a.i for a in node.attribute)


def lower_model(model: onnx.ModelProto, where: str, batch: int | None = None, input_shape: Shape | None = None) -> Graph:
    """Canonicalise and lower an in-memory ONNX model; ``where`` names it in error messages.

    ``input_shape`` replaces the declared input shape (its first dim is the batch), ``batch`` then
    replaces the batch. A QDQ model is lowered as its float graph and keeps its own quantization
    (``Graph.model_grids`` and, on matrix layers, ``weight_scale``/``bias_int32`` attrs). The model
    is not modified.
    """
    return _lower(model, where, batch, input_shape)


def _lower(source: onnx.ModelProto | Path, where: str, batch: int | None, input_shape: Shape | None) -> Graph:
    """:func:`lower_model` of a model the caller keeps (canonicalised as a copy), or of a file, read here
    so that nothing else holds it: canonicalised in place, its weights go once the layers have theirs."""
    if isinstance(source, onnx.ModelProto):
        model, raw, consume, external = source, RawWeights(), False, None
    else:
        (model, raw, external), consume = read_model(source), True
    del source
    if batch is not None and batch < 1:
        raise ModelError(f"{where}: batch must be >= 1, got {batch}")
    canonical = canonicalize(model, where, batch=batch, input_shape=input_shape, consume=consume)
    del model  # only the canonical model is read from here on: a copy lets the source go unless the caller keeps it
    stripped = strip_qdq(canonical.model, where)
    model = ops.rewrite(stripped.model)
    _raise_unsupported(model, where)
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    constants = {init.name: tensor_array(init, raw) for init in model.graph.initializer}
    inputs = [vi for vi in model.graph.input if vi.name not in constants]
    elem_type = inputs[0].type.tensor_type.elem_type
    if elem_type not in (onnx.TensorProto.FLOAT, *INDEX_INPUT_TYPES):
        raise ModelError(f"{where}: input {inputs[0].name!r} is {onnx.TensorProto.DataType.Name(elem_type)}; "
                         "tpusim reads FP32 models (or int64 token ids) and quantizes them itself")
    shape, original_batch = canonical.input_shape, canonical.original_batch
    activation_grids, weight_quants, quantized_model = stripped.activations, stripped.constants, stripped.format == "qdq"
    # From here on the weights are the arrays in ``constants``: a graph of the nodes alone lets the model's
    # tensor protos (ResNet-50: 100 MB, held by one protobuf arena) go before the layers' weights are made.
    graph = _without_initializers(model.graph, inputs[0])
    del canonical, stripped, model, inputs, raw
    consumers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            consumers[name] = consumers.get(name, 0) + 1
    # Canonicalisation already retargeted hard-coded batch dims, so the run's batch is the one to keep.
    ctx = LowerContext(where=where, opset=opset, original_batch=shape[0], consumers=consumers,
                       single_sample=original_batch == 1 and shape[0] == 1,
                       graph_outputs={o.name for o in graph.output}, constants=constants,
                       model_quantized=frozenset(activation_grids))
    ctx.shapes[graph.input[0].name] = shape
    weight_attrs: dict[str, tuple] = {}
    for index, node in enumerate(graph.node):
        if not node.name:
            node.name = f"{node.op_type}_{index}"
        module = ops.lowering(node.op_type)
        # Consumer counts follow aliases so a Dropout/Identity between two nodes does not block fusion.
        for name in node.input:
            resolved = ctx.resolve(name)
            if resolved != name:
                consumers[resolved] = consumers.get(resolved, 0) + consumers.get(name, 0)
                consumers[name] = 0
        if quantized_model and module.matrix:
            w, b = _matrix_sources(ctx, node)
            try:
                weight_attrs[node.name] = _model_weight_attrs(node, weight_quants.get(w), weight_quants.get(b))
            except ModelError as exc:
                raise ModelError(f"{where}: {exc}") from None
        module.lower(ctx, node)
    outputs = tuple(ctx.resolve(o.name) for o in graph.output)
    for name in outputs:
        if name not in ctx.producer:
            raise ModelError(f"{where}: graph output {name!r} is not computed from the input")
    grids = None
    if quantized_model:
        grids = {name: grid.qparams() for name, grid in activation_grids.items()}
        _grids_back_through_grid_keeping_ops(ctx.records, grids, outputs)
    for record in ctx.records:
        record.attrs = record.attrs + weight_attrs.get(record.name, ())
        if quantized_model:
            _restore_folded_relu(record, grids)
    layers = _prune_dead(tuple(record.freeze() for record in ctx.records), outputs)
    if elem_type != onnx.TensorProto.FLOAT:
        _check_index_input(where, graph.input[0], layers)
    return Graph(name=graph.name or Path(where).stem, input_name=graph.input[0].name, input_shape=shape,
                 outputs=outputs, layers=layers, model_grids=grids, external_data=external)


def _without_initializers(graph: onnx.GraphProto, data_input: onnx.ValueInfoProto) -> onnx.GraphProto:
    """A copy of ``graph``'s name, nodes, outputs and one data input, in an arena of its own."""
    light = onnx.GraphProto(name=graph.name)
    light.node.extend(graph.node)
    light.input.append(data_input)
    light.output.extend(graph.output)
    return light


# Integer inputs tpusim reads: token ids, which only embedding lookups may read (``index_rows`` on the layer).
INDEX_INPUT_TYPES = (onnx.TensorProto.INT64, onnx.TensorProto.INT32)


def index_rows(graph: Graph) -> int | None:
    """The row count of the tables a graph input of token ids indexes (every id must lie below it), or
    None when the input is a float tensor."""
    rows = [layer.attr("index_rows") for layer in graph.layers
            if graph.input_name in layer.inputs and layer.attr("index_rows") is not None]
    return min(rows) if rows else None


def _check_index_input(where: str, value: onnx.ValueInfoProto, layers: tuple[Layer, ...]) -> None:
    """An integer graph input must be token ids: read by embedding lookups (Gather of a table) only."""
    readers = [layer for layer in layers if value.name in layer.inputs]
    others = [layer.name for layer in readers if layer.attr("index_rows") is None]
    kind = onnx.TensorProto.DataType.Name(value.type.tensor_type.elem_type)
    if not readers or others:
        raise ModelError(f"{where}: input {value.name!r} is {kind}, which tpusim reads only as token ids of an "
                         f"embedding lookup (Gather of a constant table), but {', '.join(others[:3]) or 'nothing'} "
                         "reads it otherwise")


def _grids_back_through_grid_keeping_ops(records, grids, outputs) -> None:
    """A grid-keeping op (max pooling, reshape, a clamp, ...: ``inherits_grid``) whose output the model
    quantizes but whose input it leaves in float: PT2E's X86InductorQuantizer writes Add -> Relu ->
    MaxPool -> QuantizeLinear. The op cannot requantize, so its input takes the output's grid rather
    than a calibrated one; rounding to a grid commutes with what these ops do (selection, layout,
    clamping; average pooling to within its own rounding), so the integers are still those of the
    model. Only for an input that nothing else reads."""
    readers = Counter(name for record in records for name in record.inputs)
    for record in reversed(records):
        source = record.inputs[0] if record.inputs else None
        if (source is not None and ops.op(record.op).inherits_grid and record.output in grids
                and source not in grids and readers[source] == 1 and source not in outputs):
            grids[source] = grids[record.output]


def _restore_folded_relu(record, grids) -> None:
    """ONNX Runtime's quantizer deletes a Relu whose producer's grid starts at zero (zero point at the
    lowest integer): the grid clamps instead. The float graph lost that Relu; put it back as the
    producer's fused clamp, so the FP32 reference computes what the model means (on the integer side
    the clamp changes nothing: the grid already stops at zero)."""
    grid = grids.get(record.output)
    if (grid is not None and record.activation.kind == "none" and ops.op(record.op).fusable
            and int(grid.zero_point) == grid.qmin):
        record.activation = Activation("relu", 0.0, math.inf)


def _prune_dead(layers: tuple[Layer, ...], outputs: tuple[str, ...]) -> tuple[Layer, ...]:
    needed = set(outputs)
    kept = []
    for layer in reversed(layers):
        if layer.output in needed:
            kept.append(layer)
            needed.update(layer.inputs)
    return tuple(reversed(kept))


def load_onnx(path: str | Path, batch: int | None = None, input_shape: Shape | None = None) -> Graph:
    """Read (with external data), check, canonicalise and lower an ONNX file; every failure is a
    one-line :class:`ModelError`."""
    return _lower(Path(path), str(path), batch, input_shape)
