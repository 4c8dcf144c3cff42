"""Canonicalise a user's ONNX model before lowering: one clean, static-shaped graph, op by op.

Real exported models carry exporter noise that has nothing to do with the network: Identity nodes
on initializers and shared weights (torch's TorchScript exporter), shape subgraphs such as
Shape -> Gather -> Unsqueeze -> Concat -> Reshape, Constant nodes in all their forms, Dropout and
no-op Cast, weights in an external ``model.onnx.data`` file (the dynamo exporter), opsets 7-10 (the
ONNX model zoo), and Transpose pairs that TF/TFLite converters wrap around NHWC convolutions.
:func:`canonicalize` removes all of it, in this order, repeating steps 3-5 until nothing changes:

1. opsets 7-10 are converted to :data:`TARGET_OPSET` with ``onnx.version_converter``;
2. the one real graph input gets a static shape (``batch`` / ``input_shape`` from the run); when
   the run changes a batch the file declared statically, Reshape targets that hard-code that batch
   (``[1, 2048]``) are rewritten to copy dim 0 (``[0, 2048]``), so the model stays consistent;
3. everything computed only from constants and static shapes is folded into initializers
   (Constant nodes, Shape/Size of statically shaped tensors, and any node whose inputs are all
   constant), except QuantizeLinear/DequantizeLinear: a QDQ model's int8 weights must reach the
   quantization stage as int8 initializer -> DequantizeLinear;
4. Identity, inference-mode Dropout and Cast to the tensor's own type are removed (a graph output
   keeps its name: the producer is renamed instead);
5. a Transpose followed by its inverse cancels, consecutive Transposes compose, identity
   permutations go, and a Transpose is moved past a unary elementwise op (Relu, Clip, ...) or a
   binary one (Add, Mul, ...) when that lets it meet and cancel the next Transpose;
6. (:func:`load_model`) weights in external data files are loaded from the model's folder;
7. shape inference writes a static shape for every value into ``graph.value_info``, and nodes and
   initializers no graph output needs are pruned.

Library choice. Folding uses onnx's own machinery: shape inference with data propagation
(``onnx.shape_inference.infer_shapes(..., data_prop=True)``) for the shapes, and onnx's reference
evaluator (``onnx.reference.ReferenceEvaluator``, one node at a time, at the model's opset) to compute
each foldable node; the fixed-point loop and the Transpose rewrites are ours. ONNX Runtime's
basic-level optimisation written to file (``optimized_model_filepath``) was tried and not chosen: it
keeps Q/DQ nodes (good), but it also fuses Conv+BatchNormalization, Conv+Add and Conv+Mul, which
changes the weights the front end folds itself (white paper eq. 9-12) and the ops the lowering sees;
it cannot make the input shape static or convert old opsets; it serialises the whole model into and
out of the session (about 0.3 s for the 100 MB ResNet-50 before any rewriting) and needs extra
external-data settings above 2 GB. Speed: shape inference runs on a weight-free copy of the graph
(every initializer above :data:`SMALL_INITIALIZER` elements becomes a typed graph input), which
takes milliseconds for ResNet-50; weights are never serialised, are converted to numpy only when a
foldable node reads them, and are copied once, when the result is assembled (about 40 ms of the
60 ms ResNet-50 takes), unless the caller hands the model over (``consume``, as
:func:`tpusim.frontend.load_onnx` does): then the result is built in it, around the weights it holds.
The version converter gets the model with its large raw weights detached (put back by name
afterwards): 0.04 s instead of 0.3 s for an opset-9 ResNet-50.

Converter limitation worked around: ``onnx.version_converter`` turns Upsample and opset-10 Resize
into an opset-11 Resize without ``coordinate_transformation_mode``, whose default (half_pixel)
silently changes every bilinear upsampling; :func:`_convert_opset` states the old (asymmetric,
nearest-floor) semantics explicitly.

Every failure is one :class:`tpusim.errors.ModelError` line naming the file and, where relevant, the
node; library exceptions are caught and turned into such a line.
"""
from __future__ import annotations

import heapq
import math
import mmap
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, NamedTuple

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import helper, numpy_helper, serialization

from tpusim.errors import ModelError

MIN_OPSET = 11
"""Opsets below this are converted up (to :data:`TARGET_OPSET`) before anything else."""
TARGET_OPSET = 13
"""What opsets 7-10 are converted to: the first opset with axes as inputs (Squeeze, Unsqueeze,
Split, ReduceSum) and the per-axis Softmax, and one the version converter handles for every op of
the zoo's CNNs (BatchNormalization, Upsample -> Resize, Dropout, Flatten, Gemm, Reshape, Clip, Pad)."""
SMALL_INITIALIZER = 1024
"""Initializers with at most this many elements go to shape inference with their values (shape
targets, axes, scales); larger ones (weights) go as typed graph inputs, without their data."""
_DETACH_BYTES = 4096
"""Raw weights above this many bytes are detached while the version converter runs."""

_DEFAULT_DOMAINS = ("", "ai.onnx")
_NEVER_FOLD = frozenset({
    # A QDQ model's integer weights must survive as int8 initializer -> DequantizeLinear.
    "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear",
    # Not functions of their inputs.
    "RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli",
    # Removed as no-ops (aliases) rather than copied into new initializers.
    "Identity", "Dropout", "Constant",
})
_UNARY_ELEMENTWISE = frozenset({
    "Relu", "LeakyRelu", "Elu", "Selu", "Celu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Softplus",
    "Softsign", "Abs", "Neg", "Exp", "Log", "Sqrt", "Reciprocal", "Erf", "Gelu", "Mish", "Floor", "Ceil",
    "Round", "Sign", "Not", "Clip",  # Clip's min/max (inputs 1 and 2) are scalars
})
_BINARY_ELEMENTWISE = frozenset({"Add", "Sub", "Mul", "Div", "Max", "Min", "Pow", "PRelu"})
_MAX_ROUNDS = 64


@dataclass(frozen=True)
class Canonical:
    """A canonical model and what the lowering needs to know about how it was made."""

    model: onnx.ModelProto        # opset >= 11, static shapes, folded, clean
    input_name: str
    input_shape: tuple[int, ...]  # what the model now takes (batch first)
    original_batch: int | None    # the batch dim the file declared (None when symbolic)
    source_opset: int             # opset the file had before conversion


class _Type(NamedTuple):
    elem_type: int
    shape: tuple[int | None, ...] | None  # None: rank unknown; None entries: unknown dims

    @property
    def static(self) -> bool:
        return self.shape is not None and all(d is not None for d in self.shape)


# ---------------------------------------------------------------------------------------------
# Small helpers


def _first_line(exc: BaseException) -> str:
    """One readable line from a library exception (C++ source locations and assertion noise dropped)."""
    text = str(exc).strip()
    line = text.splitlines()[0].strip() if text else type(exc).__name__
    match = re.search(r"Assertion `[^`]*` failed:\s*(.*)", line)
    if match:
        line = match.group(1)
    line = re.sub(r"^(?:\S+\.(?:h|cc|cpp|hpp):\d+:\s*)+(?:\w+:\s+)?", "", line)
    return line.strip() or type(exc).__name__


def _node_error(where: str, node: onnx.NodeProto, message: str) -> ModelError:
    return ModelError(f"{where}: node {node.name!r} ({node.op_type}): {message}")


def _numel(tensor: onnx.TensorProto) -> int:
    return math.prod(int(d) for d in tensor.dims)


def _default_opset(model: onnx.ModelProto) -> int | None:
    return next((o.version for o in model.opset_import if o.domain in _DEFAULT_DOMAINS), None)


def _subgraphs(node: onnx.NodeProto) -> Iterable[onnx.GraphProto]:
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            yield attr.g
        elif attr.type == onnx.AttributeProto.GRAPHS:
            yield from attr.graphs


def _outer_names(graph: onnx.GraphProto) -> set[str]:
    """Names a subgraph reads (including from the enclosing scope), recursively."""
    names: set[str] = set()
    for node in graph.node:
        names.update(n for n in node.input if n)
        for sub in _subgraphs(node):
            names |= _outer_names(sub)
    names.update(o.name for o in graph.output)
    return names


def _node_inputs(node: onnx.NodeProto) -> set[str]:
    names = {n for n in node.input if n}
    for sub in _subgraphs(node):
        names |= _outer_names(sub)
    return names


def _rename_in_subgraphs(node: onnx.NodeProto, resolve) -> None:
    for sub in _subgraphs(node):
        for inner in sub.node:
            for i, name in enumerate(inner.input):
                if name:
                    inner.input[i] = resolve(name)
            _rename_in_subgraphs(inner, resolve)
        for out in sub.output:
            out.name = resolve(out.name)


def _all_tensors(graph: onnx.GraphProto) -> Iterable[onnx.TensorProto]:
    """Every TensorProto of a graph: initializers and Constant/attribute tensors, subgraphs included."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                yield attr.t
            elif attr.type == onnx.AttributeProto.TENSORS:
                yield from attr.tensors
            elif attr.type == onnx.AttributeProto.SPARSE_TENSOR:
                yield attr.sparse_tensor.values
                yield attr.sparse_tensor.indices
        for sub in _subgraphs(node):
            yield from _all_tensors(sub)


def _dense(sparse: onnx.SparseTensorProto) -> np.ndarray:
    values = numpy_helper.to_array(sparse.values)
    indices = numpy_helper.to_array(sparse.indices).astype(np.int64)
    dims = tuple(int(d) for d in sparse.dims)
    dense = np.zeros(math.prod(dims), dtype=values.dtype)
    if indices.size:
        flat = indices.reshape(-1) if indices.ndim == 1 else np.ravel_multi_index(tuple(indices.T), dims)
        dense[flat] = values.reshape(-1)
    return dense.reshape(dims)


def _constant_tensor(where: str, node: onnx.NodeProto) -> onnx.TensorProto:
    """The value of a Constant node (every form), as an initializer named after its output."""
    if len(node.attribute) != 1:
        raise _node_error(where, node, f"expected exactly one value attribute, got {[a.name for a in node.attribute]}")
    attr = node.attribute[0]
    name = node.output[0]
    if attr.name == "value":
        tensor = onnx.TensorProto()
        tensor.CopyFrom(attr.t)  # keeps the exact element type (float16, bfloat16, int4, ...)
        tensor.name = name
        return tensor
    if attr.name == "value_float":
        array = np.array(attr.f, dtype=np.float32)
    elif attr.name == "value_floats":
        array = np.array(list(attr.floats), dtype=np.float32)
    elif attr.name == "value_int":
        array = np.array(attr.i, dtype=np.int64)
    elif attr.name == "value_ints":
        array = np.array(list(attr.ints), dtype=np.int64)
    elif attr.name == "value_string":
        array = np.array(attr.s.decode(), dtype=object)
    elif attr.name == "value_strings":
        array = np.array([s.decode() for s in attr.strings], dtype=object)
    elif attr.name == "sparse_value":
        array = _dense(attr.sparse_tensor)
    else:
        raise _node_error(where, node, f"unknown Constant attribute {attr.name!r}")
    return numpy_helper.from_array(array, name)


def _dims_text(dims: Iterable[int | str | None]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in dims) + "]"


def _type_of(value_info: onnx.ValueInfoProto) -> _Type | None:
    if not value_info.type.HasField("tensor_type"):
        return None
    tensor_type = value_info.type.tensor_type
    if not tensor_type.HasField("shape"):
        return _Type(tensor_type.elem_type, None)
    dims = tuple(int(d.dim_value) if d.HasField("dim_value") else None for d in tensor_type.shape.dim)
    return _Type(tensor_type.elem_type, dims)


# ---------------------------------------------------------------------------------------------
# Loading


def static_shapes(graph: onnx.GraphProto) -> dict[str, tuple[int, ...]]:
    """Every fully static shape a canonical model records (its inputs, value_info and outputs)."""
    shapes = {}
    for vi in list(graph.input) + list(graph.value_info) + list(graph.output):
        dims = vi.type.tensor_type.shape.dim
        if vi.type.tensor_type.HasField("shape") and all(d.HasField("dim_value") for d in dims):
            shapes[vi.name] = tuple(int(d.dim_value) for d in dims)
    return shapes


def load_model(path: str | Path) -> onnx.ModelProto:
    """Read an ONNX file with its external data (relative to the file's folder) and check it.

    Every read failure (missing file, folder, corrupt or truncated protobuf, missing or truncated
    ``.data`` file, checker failure) is one :class:`ModelError` line.
    """
    return read_model(path)[0]


class RawWeights(dict):
    """The raw bytes of a model's large initializers as the checker fetched them, by name: (the tensor,
    its ``raw_data``). Protobuf copies ``raw_data`` out on every read (BERT-base: 440 MB, 0.2 s), so
    the lowering makes its arrays from these bytes instead of reading them again (:func:`tensor_array`)."""


def read_model(path: str | Path) -> tuple[onnx.ModelProto, RawWeights, bool]:
    """:func:`load_model`, the raw weights its check read, and whether the file keeps weights in external
    data files (loaded into the model here)."""
    path = Path(path)
    where = str(path)
    if path.is_dir():
        raise ModelError(f"{where}: is a folder, not an ONNX model file")
    if not path.is_file():
        raise ModelError(f"{where}: no such model file")
    try:
        model = _parse(path)
    except Exception as exc:  # protobuf raises several unrelated types for corrupt input
        raise ModelError(f"{where}: not a readable ONNX model (corrupt or truncated): {type(exc).__name__}") from None
    if not model.graph.node:
        raise ModelError(f"{where}: not a readable ONNX model (empty graph; corrupt or truncated?)")
    external = _load_external_data(model, path, where)
    return model, _check(model, where, path), external


def _parse(path: Path) -> onnx.ModelProto:
    """``onnx.load_model(path, load_external_data=False)``; a binary file is parsed from a memory map of
    it rather than from the bytes Python's ``read`` copies it into, which takes half the time (ResNet-50:
    0.06 s instead of 0.1-0.2 s)."""
    binary = serialization.registry.get_format_from_file_extension(os.path.splitext(path)[1]) in (None, "protobuf")
    size = path.stat().st_size
    if not binary or not size:  # (an empty file cannot be mapped; onnx reads it as an empty model)
        return onnx.load_model(str(path), load_external_data=False)
    model = onnx.ModelProto()
    with open(path, "rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        decoded = model.ParseFromString(memoryview(mapped))
    if decoded is not None and decoded != size:  # what onnx checks
        raise DecodeError(f"Protobuf decoding consumed too few bytes: {decoded} out of {size}")
    return model


def _load_external_data(model: onnx.ModelProto, path: Path, where: str) -> bool:
    """Load the tensors that ``model`` keeps in data files beside ``path``, checking each: whether there were any."""
    external = [t for t in _all_tensors(model.graph) if t.data_location == onnx.TensorProto.EXTERNAL]
    if not external:
        return False
    folder = path.resolve().parent
    expected: dict[str, tuple[int, str]] = {}
    for tensor in external:
        info = {entry.key: entry.value for entry in tensor.external_data}
        location = info.get("location", "")
        if not location:
            raise ModelError(f"{where}: initializer {tensor.name!r} is marked external but names no data file")
        relative = Path(location)
        if relative.is_absolute() or ".." in relative.parts:
            raise ModelError(f"{where}: external data location {location!r} (initializer {tensor.name!r}) "
                             "points outside the model's folder")
        data_file = folder / relative
        if not data_file.is_file():
            raise ModelError(f"{where}: external data file {location!r} (needed by initializer {tensor.name!r}) "
                             f"not found in {folder}")
        need = _raw_bytes_needed(tensor)
        try:
            offset = int(info.get("offset", 0))
            length = int(info["length"]) if "length" in info else need
        except ValueError:
            raise ModelError(f"{where}: initializer {tensor.name!r} has a malformed external data offset or "
                             "length") from None
        size = data_file.stat().st_size
        if length is not None and offset + length > size:
            raise ModelError(f"{where}: external data file {location!r} is truncated: initializer {tensor.name!r} "
                             f"needs bytes {offset} to {offset + length}, the file has {size}")
        if need is not None:
            expected[tensor.name] = (need, location)
    try:
        onnx.external_data_helper.load_external_data_for_model(model, str(folder))
    except Exception as exc:
        raise ModelError(f"{where}: cannot read external data: {_first_line(exc)}") from None
    for tensor in external:
        if tensor.name in expected:
            need, location = expected[tensor.name]
            if len(tensor.raw_data) < need:
                raise ModelError(f"{where}: external data file {location!r} is truncated: initializer "
                                 f"{tensor.name!r} needs {need} bytes, found {len(tensor.raw_data)}")
    return True


_PACKED_4BIT = {getattr(onnx.TensorProto, name) for name in ("INT4", "UINT4", "FLOAT4E2M1")
                if hasattr(onnx.TensorProto, name)}


def _raw_bytes_needed(tensor: onnx.TensorProto) -> int | None:
    """Bytes of raw data a tensor of this shape and type needs (None for strings or unknown types)."""
    if tensor.data_type == onnx.TensorProto.STRING:
        return None
    try:
        itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
    except Exception:
        return None
    if tensor.data_type in _PACKED_4BIT:
        return (_numel(tensor) + 1) // 2
    return _numel(tensor) * itemsize


def _check(model: onnx.ModelProto, where: str, path: Path) -> RawWeights:
    """``onnx.checker.check_model`` on a copy whose large raw weights are typed graph inputs; returns
    those weights' bytes, which it reads to see their size.

    Checking the full 100 MB ResNet-50 costs 0.7 s (0.3 s by path), almost all of it serialising and
    walking weight bytes; the graph, nodes, attributes, opsets and small tensors are what the checker
    validates, and those are all in the copy (a few milliseconds). The one tensor check the copy
    skips, raw data too short for the declared shape, is done here with the checker's own words.
    Should even the copy exceed protobuf's 2 GB, the file is checked by path.
    """
    light = onnx.ModelProto()
    for field in ("ir_version", "producer_name", "producer_version", "domain", "model_version", "doc_string"):
        if model.HasField(field):
            setattr(light, field, getattr(model, field))
    light.opset_import.extend(model.opset_import)
    light.functions.extend(model.functions)
    graph, source = light.graph, model.graph
    graph.name = source.name
    graph.node.extend(source.node)
    graph.input.extend(source.input)
    graph.output.extend(source.output)
    graph.value_info.extend(source.value_info)
    graph.sparse_initializer.extend(source.sparse_initializer)
    declared = {vi.name for vi in source.input}
    raw = RawWeights()
    for tensor in source.initializer:
        data = tensor.raw_data
        if len(data) <= _DETACH_BYTES or tensor.data_type == onnx.TensorProto.STRING:
            graph.initializer.append(tensor)
            continue
        raw[tensor.name] = (tensor, data)
        need = _raw_bytes_needed(tensor)
        if need is not None and len(data) < need:  # what the checker says of a short tensor
            raise ModelError(f"{where}: ONNX checker: TensorProto (tensor name: {tensor.name}) raw_data size "
                             f"({len(data)} bytes) is too small for the declared shape and type "
                             f"({need} bytes required).")
        if tensor.name not in declared:  # an old-style model lists its initializers as inputs already
            graph.input.append(helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims)))
    try:
        if light.ByteSize() > 2**31 - 1:
            onnx.checker.check_model(str(path))
        else:
            onnx.checker.check_model(light)
    except Exception as exc:  # ValidationError, and C++ errors for malformed protos
        raise ModelError(f"{where}: ONNX checker: {_first_line(exc)}") from None
    return raw


# Element types whose raw data numpy reads as it is (numpy_helper.to_array: np.frombuffer, reshaped).
_PLAIN_TYPES = frozenset({onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16,
                          onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.INT16,
                          onnx.TensorProto.UINT16, onnx.TensorProto.INT32, onnx.TensorProto.UINT32,
                          onnx.TensorProto.INT64, onnx.TensorProto.UINT64, onnx.TensorProto.BOOL})


def tensor_array(tensor: onnx.TensorProto, raw: RawWeights) -> np.ndarray:
    """``numpy_helper.to_array(tensor)``, from the bytes in ``raw`` when they were read from this very
    tensor (initializer protos are never changed in place: rewrites add new ones)."""
    fetched = raw.get(tensor.name)
    if (fetched is not None and fetched[0] is tensor and tensor.data_type in _PLAIN_TYPES
            and sys.byteorder == "little" and not tensor.HasField("segment")):
        return np.frombuffer(fetched[1], dtype=helper.tensor_dtype_to_np_dtype(tensor.data_type)).reshape(tensor.dims)
    return numpy_helper.to_array(tensor)


# ---------------------------------------------------------------------------------------------
# Opset conversion and the static input


def _convert_opset(model: onnx.ModelProto, where: str, opset: int) -> onnx.ModelProto:
    from onnx import version_converter

    for node in model.graph.node:
        if node.domain in _DEFAULT_DOMAINS:
            try:
                onnx.defs.get_schema(node.op_type, opset, "")
            except Exception:
                raise _node_error(where, node, f"no such op in opset {opset}; cannot convert the model to "
                                               f"opset {TARGET_OPSET}") from None
    # Detach large raw weights: the converter serialises the model, and no upgrade adapter reads
    # weight values (only small shape/scale tensors, which stay attached).
    detached: dict[str, bytes] = {}
    stripped = onnx.ModelProto()
    stripped.CopyFrom(model)
    for tensor in stripped.graph.initializer:
        if len(tensor.raw_data) > _DETACH_BYTES:
            detached[tensor.name] = tensor.raw_data
            tensor.ClearField("raw_data")
    try:
        converted = version_converter.convert_version(stripped, TARGET_OPSET)
    except Exception as exc:
        raise ModelError(f"{where}: cannot convert opset {opset} to {TARGET_OPSET} with onnx.version_converter: "
                         f"{_first_line(exc)}") from None
    for tensor in converted.graph.initializer:
        if tensor.name in detached and not tensor.raw_data and not _has_typed_data(tensor):
            tensor.raw_data = detached[tensor.name]
    # The converter turns Upsample (and opset-10 Resize) into Resize without saying how coordinates
    # map, so the opset-11 default (half_pixel) silently changes every bilinear upsampling. Opset <= 10
    # resizing is asymmetric (x_in = x_out / scale), nearest rounding down; every Resize here came
    # from such a node, so state it.
    for node in converted.graph.node:
        if node.op_type == "Resize" and node.domain in _DEFAULT_DOMAINS:
            names = {a.name for a in node.attribute}
            mode = next((a.s for a in node.attribute if a.name == "mode"), b"nearest")
            if "coordinate_transformation_mode" not in names:
                node.attribute.append(helper.make_attribute("coordinate_transformation_mode", "asymmetric"))
            if mode == b"nearest" and "nearest_mode" not in names:
                node.attribute.append(helper.make_attribute("nearest_mode", "floor"))
    return converted


def _has_typed_data(tensor: onnx.TensorProto) -> bool:
    return any(len(getattr(tensor, f)) for f in ("float_data", "int32_data", "int64_data", "double_data",
                                                  "uint64_data", "string_data"))


def _static_input(where: str, value_info: onnx.ValueInfoProto, batch: int | None,
                  input_shape: tuple[int, ...] | None) -> tuple[tuple[int, ...], int | None]:
    name = value_info.name
    if not value_info.type.HasField("tensor_type"):
        raise ModelError(f"{where}: input {name!r} is not a tensor")
    tensor_type = value_info.type.tensor_type
    has_shape = tensor_type.HasField("shape")
    declared: list[int | str | None] = []
    for d in tensor_type.shape.dim:
        declared.append(int(d.dim_value) if d.HasField("dim_value") and d.dim_value > 0
                        else (d.dim_param or None))
    original_batch = declared[0] if declared and isinstance(declared[0], int) else None
    if batch is not None and batch < 1:
        raise ModelError(f"{where}: batch must be >= 1, got {batch}")
    if input_shape is not None:
        shape = tuple(int(d) for d in input_shape)
        if has_shape and len(shape) != len(declared):
            raise ModelError(f"{where}: --input-shape {','.join(map(str, shape))} has rank {len(shape)}, but input "
                             f"{name!r} has rank {len(declared)} (shape {_dims_text(declared)})")
        if any(d < 1 for d in shape):
            raise ModelError(f"{where}: --input-shape {','.join(map(str, shape))} has a dimension < 1")
    else:
        if not has_shape:
            raise ModelError(f"{where}: input {name!r} declares no shape; pass --input-shape, e.g. 1,3,224,224")
        dynamic = [i for i, d in enumerate(declared) if not isinstance(d, int) and i > 0]
        if dynamic:
            example = ",".join(str(d) if isinstance(d, int) else ("1" if i == 0 else "224")
                               for i, d in enumerate(declared))
            raise ModelError(f"{where}: input {name!r} has dynamic dims {dynamic} (shape {_dims_text(declared)}); "
                             f"pass --input-shape, e.g. {example}")
        shape = tuple(d if isinstance(d, int) else 1 for d in declared)
    if batch is not None:
        if not shape:
            raise ModelError(f"{where}: input {name!r} is a scalar; a batch size does not apply")
        shape = (batch, *shape[1:])
    return shape, original_batch


# ---------------------------------------------------------------------------------------------
# The working graph


class _Work:
    """The graph being canonicalised: node copies, initializer protos (never mutated), one input."""

    def __init__(self, where: str, model: onnx.ModelProto, input_info: onnx.ValueInfoProto, opset: int):
        self.where = where
        self.opset = opset
        self.opset_import = list(model.opset_import)
        self.ir_version = max(int(model.ir_version), 4)
        self.input = input_info
        graph = model.graph
        self.output_names = [o.name for o in graph.output]
        self.output_types = {o.name: o.type.tensor_type.elem_type for o in graph.output
                             if o.type.HasField("tensor_type")}
        self.inits: dict[str, onnx.TensorProto] = {t.name: t for t in graph.initializer}
        for sparse in graph.sparse_initializer:
            self.inits[sparse.values.name] = numpy_helper.from_array(_dense(sparse), sparse.values.name)
        self.arrays: dict[str, np.ndarray] = {}
        self.nodes: list[onnx.NodeProto] = []
        names = {n.name for n in graph.node if n.name}
        for index, source in enumerate(graph.node):
            node = onnx.NodeProto()
            node.CopyFrom(source)
            if not node.name:
                candidate = f"{node.op_type}_{index}"
                while candidate in names:
                    candidate += "_"
                node.name = candidate
                names.add(candidate)
            self.nodes.append(node)
        self.types: dict[str, _Type] = {}
        self._fresh = 0

    # -- constants -------------------------------------------------------------------------

    def array(self, name: str) -> np.ndarray:
        if name not in self.arrays:
            self.arrays[name] = numpy_helper.to_array(self.inits[name])
        return self.arrays[name]

    def add_constant(self, name: str, value: np.ndarray | onnx.TensorProto) -> None:
        if isinstance(value, onnx.TensorProto):
            self.inits[name] = value
            self.arrays.pop(name, None)
        else:
            array = np.asarray(value)
            self.inits[name] = numpy_helper.from_array(array, name)
            self.arrays[name] = array

    def fresh_name(self, base: str) -> str:
        taken = set(self.inits) | {o for n in self.nodes for o in n.output} | {self.input.name}
        while True:
            self._fresh += 1
            name = f"{base}__c{self._fresh}"
            if name not in taken:
                return name

    def elem_type(self, name: str) -> int | None:
        if name in self.inits:
            return self.inits[name].data_type
        if name == self.input.name:
            return self.input.type.tensor_type.elem_type
        info = self.types.get(name)
        return info.elem_type if info is not None and info.elem_type else None

    def shape(self, name: str) -> tuple[int | None, ...] | None:
        if name in self.inits:
            return tuple(int(d) for d in self.inits[name].dims)
        if name == self.input.name:
            return tuple(int(d.dim_value) for d in self.input.type.tensor_type.shape.dim)
        info = self.types.get(name)
        return None if info is None else info.shape

    # -- bookkeeping ------------------------------------------------------------------------

    def use_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for node in self.nodes:
            for name in node.input:
                if name:
                    counts[name] = counts.get(name, 0) + 1
            for sub in _subgraphs(node):
                for name in _outer_names(sub):
                    counts[name] = counts.get(name, 0) + 1
        for name in self.output_names:
            counts[name] = counts.get(name, 0) + 1
        return counts

    def apply_aliases(self, alias: dict[str, str]) -> None:
        if not alias:
            return

        def resolve(name: str) -> str:
            seen = 0
            while name in alias and seen <= len(alias):
                name = alias[name]
                seen += 1
            return name

        for node in self.nodes:
            for i, name in enumerate(node.input):
                if name in alias:
                    node.input[i] = resolve(name)
            _rename_in_subgraphs(node, resolve)

    def toposort(self) -> None:
        """Stable topological order (a rewrite may have moved a producer after its reader)."""
        index_of = {id(n): i for i, n in enumerate(self.nodes)}
        producer = {o: n for n in self.nodes for o in n.output if o}
        readers: dict[int, list[onnx.NodeProto]] = {}
        pending: dict[int, int] = {}
        for node in self.nodes:
            deps = {id(producer[name]) for name in _node_inputs(node) if name in producer
                    and producer[name] is not node}
            pending[id(node)] = len(deps)
            for dep in deps:
                readers.setdefault(dep, []).append(node)
        ready = [(index_of[id(n)], id(n), n) for n in self.nodes if not pending[id(n)]]
        heapq.heapify(ready)
        ordered = []
        while ready:
            _, _, node = heapq.heappop(ready)
            ordered.append(node)
            for reader in readers.get(id(node), ()):
                pending[id(reader)] -= 1
                if not pending[id(reader)]:
                    heapq.heappush(ready, (index_of[id(reader)], id(reader), reader))
        if len(ordered) != len(self.nodes):
            stuck = next(n for n in self.nodes if pending[id(n)])
            raise _node_error(self.where, stuck, "the graph has a cycle")
        self.nodes = ordered

    def prune(self) -> bool:
        needed = set(self.output_names)
        kept = []
        for node in reversed(self.nodes):
            if any(o in needed for o in node.output if o):
                kept.append(node)
                needed |= _node_inputs(node)
        kept.reverse()
        changed = len(kept) != len(self.nodes)
        self.nodes = kept
        dead = [name for name in self.inits if name not in needed]
        for name in dead:
            del self.inits[name]
            self.arrays.pop(name, None)
        return changed or bool(dead)

    # -- shape inference on a weight-free copy ----------------------------------------------

    def inference_model(self) -> onnx.ModelProto:
        model = onnx.ModelProto()
        model.ir_version = self.ir_version
        model.opset_import.extend(self.opset_import)
        graph = model.graph
        graph.name = "canonical"
        graph.node.extend(self.nodes)
        graph.input.append(self.input)
        for name, tensor in self.inits.items():
            if _numel(tensor) <= SMALL_INITIALIZER:
                graph.initializer.append(tensor)
            else:
                graph.input.append(helper.make_tensor_value_info(name, tensor.data_type, list(tensor.dims)))
        for name in self.output_names:
            graph.output.append(onnx.ValueInfoProto(name=name))
        return model

    def infer(self, strict: bool) -> None:
        try:
            inferred = onnx.shape_inference.infer_shapes(self.inference_model(), check_type=strict,
                                                         strict_mode=strict, data_prop=True)
        except Exception as exc:
            message = _first_line(exc)
            match = re.search(r"\(op_type:(\w+), node name: ([^)]*)\):\s*(.*)", message)
            if match:
                op_type, name, rest = match.groups()
                rest = re.sub(r"^\[\w+\]\s*", "", rest)
                raise ModelError(f"{self.where}: node {name!r} ({op_type}): shape inference: {rest}") from None
            raise ModelError(f"{self.where}: shape inference: {message}") from None
        types: dict[str, _Type] = {}
        for value_info in list(inferred.graph.value_info) + list(inferred.graph.output):
            info = _type_of(value_info)
            if info is not None:
                types[value_info.name] = info
        self.types = types


# ---------------------------------------------------------------------------------------------
# The passes


def _constant_nodes(work: _Work) -> bool:
    kept, changed = [], False
    for node in work.nodes:
        if node.op_type == "Constant" and node.domain in _DEFAULT_DOMAINS:
            work.add_constant(node.output[0], _constant_tensor(work.where, node))
            changed = True
        else:
            kept.append(node)
    work.nodes = kept
    return changed


def _perm(work: _Work, node: onnx.NodeProto) -> list[int] | None:
    for attr in node.attribute:
        if attr.name == "perm":
            return [int(p) for p in attr.ints]
    shape = work.shape(node.input[0])
    return None if shape is None else list(reversed(range(len(shape))))


def _set_perm(node: onnx.NodeProto, perm: list[int]) -> None:
    for i, attr in enumerate(node.attribute):
        if attr.name == "perm":
            del node.attribute[i]
            break
    node.attribute.append(helper.make_attribute("perm", perm))


def _is_noop(work: _Work, node: onnx.NodeProto) -> bool:
    """True when ``node``'s first output equals its first input (and any extra output is unused)."""
    if node.domain not in _DEFAULT_DOMAINS or not node.input or not node.input[0]:
        return False
    op = node.op_type
    if op == "Identity":
        return True
    if op == "Dropout":
        if len(node.input) > 2 and node.input[2]:
            mode = node.input[2]
            if mode not in work.inits:
                raise _node_error(work.where, node, f"training_mode {mode!r} is computed; only inference "
                                                    "(training_mode false) is supported")
            if bool(np.asarray(work.array(mode)).reshape(-1)[0]):
                raise _node_error(work.where, node, "training_mode is true; only inference graphs are supported")
        return True
    if op == "Cast":
        to = next((a.i for a in node.attribute if a.name == "to"), None)
        return to is not None and to == work.elem_type(node.input[0])
    if op == "CastLike":
        source, like = work.elem_type(node.input[0]), work.elem_type(node.input[1])
        return source is not None and source == like
    if op == "Transpose":
        perm = _perm(work, node)
        return perm is not None and perm == list(range(len(perm)))
    return False


def _remove_noops(work: _Work) -> bool:
    uses = work.use_counts()
    outputs = set(work.output_names)
    producer = {o: n for n in work.nodes for o in n.output if o}
    constant_or_input = set(work.inits) | {work.input.name}
    alias: dict[str, str] = {}

    def resolve(name: str) -> str:
        while name in alias:
            name = alias[name]
        return name

    kept, changed = [], False
    for node in work.nodes:
        for i, name in enumerate(node.input):
            if name in alias:
                node.input[i] = resolve(name)
        if not _is_noop(work, node):
            kept.append(node)
            continue
        for extra in node.output[1:]:
            if extra and uses.get(extra, 0):
                raise _node_error(work.where, node, f"output {extra!r} (the dropout mask) is read; only inference "
                                                    "graphs are supported")
        source, result = node.input[0], node.output[0]
        if result in outputs:
            # Keep the graph output's name: rename the producer's output instead of dropping ours.
            owner = producer.get(source)
            if owner is None or source in outputs or source in constant_or_input or owner is node:
                kept.append(node)
                continue
            owner.output[list(owner.output).index(source)] = result
            producer[result] = owner
            del producer[source]
            alias[source] = result
        else:
            alias[result] = source
        changed = True
    work.nodes = kept
    work.apply_aliases(alias)
    return changed


def _simplify_transposes(work: _Work) -> bool:
    """Compose consecutive Transposes (an inverse pair composes to the identity, removed as a no-op)
    and move a Transpose past an elementwise op when it then meets another Transpose."""
    uses = work.use_counts()
    producer = {o: n for n in work.nodes for o in n.output if o}
    touched: set[int] = set()
    dropped: set[int] = set()
    changed = False

    def free(node: onnx.NodeProto | None) -> bool:
        return node is not None and id(node) not in touched

    def transpose_feeding(name: str) -> onnx.NodeProto | None:
        """The Transpose producing ``name`` if nothing else reads ``name``."""
        t = producer.get(name)
        if free(t) and t.op_type == "Transpose" and t.domain in _DEFAULT_DOMAINS and uses.get(name, 0) == 1 \
                and _perm(work, t) is not None:
            return t
        return None

    for node in work.nodes:
        if node.op_type != "Transpose" or node.domain not in _DEFAULT_DOMAINS or not free(node):
            continue
        perm = _perm(work, node)
        if perm is None:
            continue
        source = producer.get(node.input[0])
        if not free(source):
            continue
        if source.op_type == "Transpose" and source.domain in _DEFAULT_DOMAINS:
            first = _perm(work, source)
            if first is not None and len(first) == len(perm):
                # y = x.transpose(p1), z = y.transpose(p2)  =>  z = x.transpose(p1[p2])
                node.input[0] = source.input[0]
                _set_perm(node, [first[j] for j in perm])
                touched.update((id(node), id(source)))
                changed = True
            continue
        if source.domain not in _DEFAULT_DOMAINS or uses.get(source.output[0], 0) != 1 or len(source.output) != 1:
            continue
        if source.op_type in _UNARY_ELEMENTWISE:
            inner = transpose_feeding(source.input[0])
            if inner is None:
                continue
            # x -T1-> y -U-> u -T2->   becomes   x -U-> y -T1-> u -T2->  (T1 and T2 then compose)
            x, y, u = inner.input[0], inner.output[0], source.output[0]
            source.input[0], source.output[0] = x, y
            inner.input[0], inner.output[0] = y, u
            touched.update((id(node), id(source), id(inner)))
            changed = True
        elif source.op_type in _BINARY_ELEMENTWISE and len(source.input) == 2:
            if _pull_through_binary(work, source, transpose_feeding, dropped, touched):
                touched.add(id(node))
                changed = True
    if changed:
        work.nodes = [n for n in work.nodes if id(n) not in dropped]
        work.toposort()
    return changed


def _pull_through_binary(work: _Work, op: onnx.NodeProto, transpose_feeding, dropped: set[int],
                         touched: set[int]) -> bool:
    """``B(T(a), T(b))`` or ``B(T(a), C)`` becomes ``T(B(a, b))`` / ``T(B(a, T^-1(C)))``."""
    a_name, b_name = op.input[0], op.input[1]
    if a_name == b_name:
        return False
    ta, tb = transpose_feeding(a_name), transpose_feeding(b_name)
    if ta is not None and tb is not None:
        perm = _perm(work, ta)
        if perm != _perm(work, tb):
            return False
        rank_a, rank_b = work.shape(ta.input[0]), work.shape(tb.input[0])
        if rank_a is None or rank_b is None or len(rank_a) != len(perm) or len(rank_b) != len(perm):
            return False
        new_inputs = [ta.input[0], tb.input[0]]
        dropped.add(id(tb))
        touched.add(id(tb))
        keep = ta
    else:
        keep = ta if ta is not None else tb
        if keep is None:
            return False
        const_name = b_name if keep is ta else a_name
        if const_name not in work.inits:
            return False
        perm = _perm(work, keep)
        value = work.array(const_name)
        if value.ndim > len(perm):
            return False
        inverse = [perm.index(i) for i in range(len(perm))]
        aligned = value.reshape((1,) * (len(perm) - value.ndim) + value.shape).transpose(inverse)
        moved = work.fresh_name(const_name)
        work.add_constant(moved, np.ascontiguousarray(aligned))
        new_inputs = [keep.input[0], moved] if keep is ta else [moved, keep.input[0]]
    # B now computes in the untransposed layout into T's old output name; T transposes into B's output.
    inner_name, result = keep.output[0], op.output[0]
    op.input[0], op.input[1] = new_inputs
    op.output[0] = inner_name
    keep.input[0], keep.output[0] = inner_name, result
    touched.update((id(op), id(keep)))
    return True


_RESHAPING = ("Reshape", "Flatten", "Squeeze", "Unsqueeze")


def _static(shape) -> bool:
    return shape is not None and all(isinstance(d, int) and d > 0 for d in shape)


def _simplify_reshapes(work: _Work) -> bool:
    """Exporter detours through other shapes: a Gather whose constant indices are ``arange`` of the
    gathered axis is a Reshape (torch's as_strided of a pooled tensor exports that way), and a
    reshaping op whose only reader reshapes again collapses into one Reshape to the final shape
    (so an intermediate 1-D view that drops the batch axis never reaches the lowering)."""
    changed = False
    for node in work.nodes:
        if node.op_type != "Gather" or node.domain not in _DEFAULT_DOMAINS or node.input[1] not in work.inits:
            continue
        shape = work.shape(node.input[0])
        if not _static(shape) or node.input[0] in work.inits:
            continue
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0) % len(shape)
        indices = np.asarray(work.array(node.input[1]))
        if indices.size != shape[axis] or not np.array_equal(indices.reshape(-1), np.arange(shape[axis])):
            continue
        target = work.fresh_name(f"{node.output[0]}_shape")
        work.add_constant(target, np.array([*shape[:axis], *indices.shape, *shape[axis + 1:]], np.int64))
        node.op_type = "Reshape"
        del node.attribute[:]
        node.input[1] = target
        changed = True
    producers = {o: n for n in work.nodes for o in n.output if o}
    uses = work.use_counts()
    outputs = set(work.output_names)
    for node in work.nodes:
        if node.op_type != "Reshape" or node.domain not in _DEFAULT_DOMAINS:
            continue
        first = producers.get(node.input[0])
        if (first is None or first.op_type not in _RESHAPING or first.domain not in _DEFAULT_DOMAINS
                or uses.get(first.output[0], 0) != 1 or first.output[0] in outputs or first.input[0] in work.inits):
            continue
        final = work.shape(node.output[0])
        if not _static(final):
            continue
        target = work.fresh_name(f"{node.output[0]}_shape")
        work.add_constant(target, np.array(final, np.int64))
        node.input[0] = first.input[0]
        node.input[1] = target
        changed = True
    return changed


def _retarget_reshapes(work: _Work, batch: int, original_batch: int | None) -> bool:
    """A Reshape target that hard-codes the file's batch (``[1, 2048]``) copies dim 0 instead (``[0, 2048]``)
    when the run changes the batch, so the canonical model is consistent at the new batch."""
    if original_batch is None or batch == original_batch:
        return False
    changed = False
    for node in work.nodes:
        if node.op_type != "Reshape" or len(node.input) < 2 or node.input[1] not in work.inits \
                or node.input[0] in work.inits:
            continue
        if any(a.name == "allowzero" and a.i for a in node.attribute):
            continue
        target = np.asarray(work.array(node.input[1]))
        if target.ndim != 1 or not target.size or int(target[0]) != original_batch:
            continue
        shape = work.shape(node.input[0])
        if shape and shape[0] is not None and shape[0] != batch:
            continue  # its dim 0 is not the batch
        retargeted = target.astype(np.int64).copy()
        retargeted[0] = 0
        name = work.fresh_name(node.input[1])
        work.add_constant(name, retargeted)
        node.input[1] = name
        changed = True
    return changed


def _fold(work: _Work) -> bool:
    kept, changed = [], False
    for node in work.nodes:
        values = _fold_node(work, node)
        if values is None:
            kept.append(node)
            continue
        for name, value in zip(node.output, values):
            if name and value is not None:
                work.add_constant(name, value)
        changed = True
    work.nodes = kept
    return changed


def _fold_node(work: _Work, node: onnx.NodeProto) -> list[np.ndarray | None] | None:
    if node.domain not in _DEFAULT_DOMAINS or node.op_type in _NEVER_FOLD or any(True for _ in _subgraphs(node)):
        return None
    op = node.op_type
    if op in ("Shape", "Size") and node.input and node.input[0]:
        shape = work.shape(node.input[0])
        if shape is None or any(d is None for d in shape):
            return None
        if op == "Size":
            return [np.array(math.prod(shape), dtype=np.int64)]
        attrs = {a.name: a.i for a in node.attribute}
        start, end = attrs.get("start", 0), attrs.get("end", len(shape))
        # Python slicing clamps exactly as ONNX specifies (negative from the end, then to [0, rank]).
        return [np.array(shape[start:end], dtype=np.int64)]
    inputs = [name for name in node.input if name]
    if not inputs or not all(name in work.inits for name in inputs):
        return None
    if op == "GatherElements":
        return [_gather_elements(work, node)]
    from onnx.reference import ReferenceEvaluator

    # A one-node model, not the bare NodeProto: given a node, the evaluator ignores ``opsets`` and
    # runs the newest version of the op (an opset-11 Unsqueeze with an axes attribute then fails).
    single = onnx.ModelProto()
    single.ir_version = work.ir_version
    single.opset_import.extend(work.opset_import)
    single.graph.name = "fold"
    single.graph.node.append(node)
    single.graph.input.extend(onnx.ValueInfoProto(name=name) for name in dict.fromkeys(inputs))
    outputs = [name for name in node.output if name]
    single.graph.output.extend(onnx.ValueInfoProto(name=name) for name in outputs)
    try:
        feeds = {name: work.array(name) for name in inputs}
        results = dict(zip(outputs, ReferenceEvaluator(single).run(None, feeds)))
    except Exception as exc:
        raise _node_error(work.where, node, f"cannot fold this constant computation: {_first_line(exc)}") from None
    return [np.asarray(results[name]) if name else None for name in node.output]


def _gather_elements(work: _Work, node: onnx.NodeProto) -> np.ndarray:
    """GatherElements of constants in numpy: onnx's reference evaluator (1.23) fails whenever the indices
    are shorter than the data along the axis (HF BERT's ``token_type_ids`` buffer gathered at the
    position ids)."""
    data, indices = work.array(node.input[0]), work.array(node.input[1]).astype(np.int64)
    if data.ndim != indices.ndim:
        raise _node_error(work.where, node, f"cannot fold: data of rank {data.ndim}, indices of rank {indices.ndim}")
    axis = next((a.i for a in node.attribute if a.name == "axis"), 0) % data.ndim
    if any(i > d for k, (i, d) in enumerate(zip(indices.shape, data.shape)) if k != axis):
        raise _node_error(work.where, node, f"cannot fold: indices {indices.shape} exceed data {data.shape}")
    window = tuple(slice(None) if k == axis else slice(0, n) for k, n in enumerate(indices.shape))
    dim = data.shape[axis]
    if np.any(indices < -dim) or np.any(indices >= dim):
        raise _node_error(work.where, node, f"cannot fold: an index is out of range for axis {axis} of size {dim}")
    return np.take_along_axis(data[window], np.where(indices < 0, indices + dim, indices), axis)


# ---------------------------------------------------------------------------------------------
# The entry point


def canonicalize(model: onnx.ModelProto, where: str, batch: int | None = None,
                 input_shape: tuple[int, ...] | None = None, consume: bool = False) -> Canonical:
    """Turn an exported ONNX model into a clean, static-shaped one the lowering can read op by op.

    ``where`` names the file in error messages. ``input_shape`` (rank as declared) replaces the
    declared input shape; ``batch`` then replaces its first dim. The input model is not modified,
    unless ``consume``: then the caller hands it over (and must not read it again), and the canonical
    model is built in it, keeping its weights where they are instead of copying them (ResNet-50:
    100 MB, 50-60 ms).
    """
    try:
        return _canonicalize(model, where, batch, input_shape, consume)
    except ModelError:
        raise
    except Exception as exc:  # a library failure we did not foresee: still one line
        raise ModelError(f"{where}: cannot canonicalise the model: {type(exc).__name__}: {_first_line(exc)}") from None


def _canonicalize(model: onnx.ModelProto, where: str, batch: int | None,
                  input_shape: tuple[int, ...] | None, consume: bool) -> Canonical:
    given = model
    source_opset = _default_opset(model)
    newest = onnx.defs.onnx_opset_version()
    if source_opset is None:
        raise ModelError(f"{where}: the model imports no ai.onnx opset")
    if source_opset > newest:
        raise ModelError(f"{where}: opset {source_opset} is newer than the installed onnx {onnx.__version__} "
                         f"knows (up to {newest}); upgrade onnx or export with opset <= {newest}")
    for tensor in model.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            raise ModelError(f"{where}: initializer {tensor.name!r} keeps its data in an external file that was "
                             "not loaded (read the model with tpusim.frontend.canonical.load_model)")
    if model.functions:
        try:
            from onnx import inliner

            model = inliner.inline_local_functions(model)
        except Exception as exc:
            raise ModelError(f"{where}: cannot inline the model's local functions: {_first_line(exc)}") from None
    if source_opset < MIN_OPSET:
        model = _convert_opset(model, where, source_opset)
    opset = _default_opset(model) or source_opset

    graph = model.graph
    constant_names = {t.name for t in graph.initializer} | {s.values.name for s in graph.sparse_initializer}
    inputs = [vi for vi in graph.input if vi.name not in constant_names]
    if len(inputs) != 1:
        raise ModelError(f"{where}: expected exactly one input tensor, found {[vi.name for vi in inputs]}")
    shape, original_batch = _static_input(where, inputs[0], batch, input_shape)
    elem_type = inputs[0].type.tensor_type.elem_type
    input_info = helper.make_tensor_value_info(inputs[0].name, elem_type, list(shape))

    work = _Work(where, model, input_info, opset)
    work.prune()
    run_batch = shape[0] if shape else 1
    for _ in range(_MAX_ROUNDS):
        changed = _constant_nodes(work)
        changed |= _remove_noops(work)
        changed |= _simplify_transposes(work)
        work.infer(strict=False)
        if _simplify_reshapes(work):
            changed = True
            work.prune()
            work.infer(strict=False)
        if _retarget_reshapes(work, run_batch, original_batch):
            changed = True
            work.infer(strict=False)
        changed |= _fold(work)
        changed |= work.prune()
        if not changed:
            break
    work.infer(strict=True)
    _require_static(work)
    # A model inlined or converted here is a copy of our own, as free to build in as a consumed one.
    return Canonical(model=_assemble(model, work, reuse=consume or model is not given),
                     input_name=input_info.name, input_shape=shape,
                     original_batch=original_batch, source_opset=source_opset)


def _require_static(work: _Work) -> None:
    for node in work.nodes:
        for name in node.output:
            if not name:
                continue
            info = work.types.get(name)
            if info is not None and info.static:
                continue
            if node.domain not in _DEFAULT_DOMAINS:
                return  # custom ops have no shape functions; the lowering names them
            raise _node_error(work.where, node, f"output {name!r} has no static shape after canonicalisation "
                                                "(it depends on data, or on an op shape inference cannot follow)")


def _assemble(source: onnx.ModelProto, work: _Work, reuse: bool) -> onnx.ModelProto:
    """The canonical model: a new one, or with ``reuse`` (``source`` is ours to change) ``source`` itself
    rebuilt around the initializers it already holds, which then are not copied."""
    model = onnx.ModelProto()
    for field in ("producer_name", "producer_version", "domain", "model_version", "doc_string"):
        if source.HasField(field):
            setattr(model, field, getattr(source, field))
    model.metadata_props.extend(source.metadata_props)
    model.opset_import.extend(work.opset_import)
    try:
        needed_ir = helper.find_min_ir_version_for(list(work.opset_import), ignore_unknown=True)
    except Exception:
        needed_ir = 0
    model.ir_version = max(work.ir_version, needed_ir)
    graph = model.graph
    graph.name = source.graph.name or "canonical"
    graph.doc_string = source.graph.doc_string
    graph.node.extend(work.nodes)
    graph.input.append(work.input)
    for name in work.output_names:
        info = work.types.get(name)
        if name in work.inits:
            tensor = work.inits[name]
            graph.output.append(helper.make_tensor_value_info(name, tensor.data_type, list(tensor.dims)))
        elif info is not None and info.elem_type:
            graph.output.append(helper.make_tensor_value_info(name, info.elem_type, info.shape))
        else:
            graph.output.append(helper.make_tensor_value_info(name, work.output_types.get(name, 0), None))
    outputs = set(work.output_names)
    for node in work.nodes:
        for name in node.output:
            info = work.types.get(name)
            if name and name not in outputs and info is not None and info.elem_type:
                graph.value_info.append(helper.make_tensor_value_info(name, info.elem_type, info.shape))
    if reuse and _keep_initializers(source, work):
        for message, keep in ((source, "graph"), (source.graph, "initializer")):
            for field, _ in message.ListFields():
                if field.name != keep:
                    message.ClearField(field.name)
        source.MergeFrom(model)  # everything but the initializers, which ``source`` now holds in order
        return source
    graph.initializer.extend(work.inits.values())
    return model


def _keep_initializers(source: onnx.ModelProto, work: _Work) -> bool:
    """Make ``source``'s initializers those of ``work``, in its order, by deleting the pruned ones and
    appending the new (folded) ones; False, changing nothing, when the tensors ``source`` keeps are not
    the first of ``work``'s in the same order (a constant replaced under its old name)."""
    initializers = source.graph.initializer
    kept = [i for i, tensor in enumerate(initializers) if work.inits.get(tensor.name) is tensor]
    ordered = list(work.inits.values())
    if any(ordered[k] is not initializers[i] for k, i in enumerate(kept)):
        return False
    survivors = set(kept)
    for i in reversed(range(len(initializers))):
        if i not in survivors:
            del initializers[i]
    initializers.extend(ordered[len(kept):])
    return True
