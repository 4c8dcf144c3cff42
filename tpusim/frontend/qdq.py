"""Read a model that is already quantized (QDQ format): a float graph plus the model's own parameters.

A *QDQ model* is what ONNX Runtime's ``quantize_static(..., quant_format=QuantFormat.QDQ)``, PyTorch's
quantized ONNX export and most other toolchains write: a float graph in which quantization is
spelled with two standard ops, ``QuantizeLinear`` (``q = saturate(round(x / s) + z)``, round half to
even) and ``DequantizeLinear`` (``x = (q - z) * s`` in float32):

- a quantized *constant* is stored as integers followed by ``DequantizeLinear`` (DQ): int8/uint8
  weights with one scale per tensor or one per channel along ``axis``, int32 biases;
- a quantized *activation* ``x`` goes through ``QuantizeLinear -> DequantizeLinear`` (Q -> DQ) with one
  per-tensor (scale, zero point) before the ops that read it. The float ops in between compute on
  dequantized values; an integer back end runs them on the integers instead.

:func:`strip_qdq` separates such a model into

(a) a plain float model that the front end lowers as usual: every ``DQ(constant)`` becomes a float
    initializer named like the DQ output, holding exactly ``(q - z) * s`` in float32 (ONNX's formula,
    bit for bit what ONNX Runtime computes), and every Q -> DQ pair on an activation is removed, its
    readers reading the float tensor itself; a graph output keeps its name;
(b) the parameters it carried, keyed by tensor names of that float model: ``activations`` (tensor ->
    :class:`TensorQuant`, the grid the model quantizes it to) and ``constants`` (float initializer ->
    :class:`WeightQuant`: the integers as stored, scale, zero point and axis).

A tensor the model leaves in float (no Q on it) is simply absent from ``activations``; a constant it
leaves in float is an ordinary float initializer, absent from ``constants``. Also handled: a weight
stored in float and quantized in the graph (``Q(W) -> DQ``; its integers are computed with ONNX's
formula), Identity/Constant nodes between a constant and its DQ, one Q feeding several DQs and several
Qs on one tensor (all must agree), Q/DQ in the ``com.microsoft`` domain (ONNX Runtime's contrib
versions), an integer graph input read through DQ and a graph output ending in Q without DQ (both
then exchange the dequantized float values; their names are in ``integer_io``), and a ``Clip`` with
constant integer bounds between a Q and its DQ (``Q -> Clip -> DQ``): a grid narrower than its
integer type. PyTorch's TorchScript exporter writes that for a fake-quantized tensor whose range is
[0, 127] (``reduce_range=True``, the x86/fbgemm default for activations): uint8 Q, then Clip to 127.
A node that reads a quantized tensor directly in float, bypassing its Q -> DQ, is listed in
``float_readers``.

Removing a Q -> DQ pair removes its rounding *and its clamping*. ONNX Runtime relies on the clamping:
when a Relu's (or ReLU6 Clip's) output grid is asymmetric with its zero point at the lowest integer,
it deletes the Relu/Clip and quantizes its producer's output to that grid, so the float model has no
Relu there and only the recorded grid says that the output is clamped at 0.

Not supported, each one :class:`~tpusim.errors.ModelError` line: QOperator models (QLinearConv,
QLinearMatMul, QGemm, ConvInteger, ... : re-quantize the float model in QDQ format), non-constant
scales or zero points, other integer types than int8/uint8 (int32 for constants), block quantization,
per-channel activations, integer ops between Q and DQ, and one tensor quantized to two grids.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from tpusim.errors import ModelError

if TYPE_CHECKING:  # the quantization stage imports Numba, which lowering a float model does not need
    from tpusim.quant.arithmetic import QParams

QDQ_DOMAINS = ("", "ai.onnx", "com.microsoft")
QOPERATOR_OPS = frozenset({
    "QLinearConv", "QLinearMatMul", "QGemm", "ConvInteger", "MatMulInteger", "MatMulIntegerToFloat",
    "DynamicQuantizeLinear", "DynamicQuantizeMatMul", "DynamicQuantizeLSTM", "QAttention",
    "QEmbedLayerNormalization", "QOrderedMatMul", "QOrderedGelu", "QOrderedLayerNormalization",
})
CONVERT_HINT = ("re-quantize the float model with onnxruntime.quantization.quantize_static(..., "
                "quant_format=QuantFormat.QDQ)")
_ACTIVATION_TYPES = (TensorProto.INT8, TensorProto.UINT8)
_CONSTANT_TYPES = (TensorProto.INT8, TensorProto.UINT8, TensorProto.INT32)


def _type_name(code: int) -> str:
    return TensorProto.DataType.Name(code).lower()


def _frozen(array: np.ndarray, dtype=None) -> np.ndarray:
    array = np.array(array, dtype=dtype)
    array.setflags(write=False)
    return array


@dataclass(frozen=True, eq=False)
class TensorQuant:
    """An activation tensor's grid, as the model's QuantizeLinear stores it: ``x ~ scale * (q - zero_point)``.

    ``q`` saturates to the full range of ``dtype`` (int8 [-128, 127], uint8 [0, 255]), as
    QuantizeLinear does, or to ``qrange`` when the model clips the integers further (Q -> Clip -> DQ).
    """

    scale: float          # a float32 value
    zero_point: int
    dtype: np.dtype       # np.int8 or np.uint8
    qrange: tuple[int, int] | None = None   # integer bounds narrower than dtype's, else None

    @property
    def qmin(self) -> int:
        return int(np.iinfo(self.dtype).min) if self.qrange is None else self.qrange[0]

    @property
    def qmax(self) -> int:
        return int(np.iinfo(self.dtype).max) if self.qrange is None else self.qrange[1]

    def qparams(self) -> QParams:
        """The same grid as tpusim's :class:`~tpusim.quant.arithmetic.QParams` (``qmin``/``qmax`` as above)."""
        from tpusim.quant.arithmetic import QParams
        return QParams(np.array(self.scale), np.array(self.zero_point), self.qmin, self.qmax)

    def same_grid(self, other: "TensorQuant") -> bool:
        return (np.float32(self.scale) == np.float32(other.scale) and self.zero_point == other.zero_point
                and self.dtype == other.dtype and (self.qmin, self.qmax) == (other.qmin, other.qmax))

    def describe(self) -> str:
        clipped = "" if self.qrange is None else f", clipped to [{self.qmin}, {self.qmax}]"
        return (f"scale {np.format_float_positional(np.float32(self.scale))}, zero point {self.zero_point} "
                f"({self.dtype}{clipped})")


@dataclass(frozen=True, eq=False)
class WeightQuant:
    """A constant the model stores as integers + DequantizeLinear: ``float = (values - zero_point) * scale``."""

    values: np.ndarray       # the integer array as stored (int8/uint8 weights, int32 biases)
    scale: np.ndarray        # float32, 0-d (per tensor) or 1-d (one per slice along axis)
    zero_point: np.ndarray   # same shape as scale, same dtype as values
    axis: int | None         # None for per-tensor, else in [0, values.ndim)

    def __post_init__(self) -> None:
        object.__setattr__(self, "values", _frozen(self.values))
        object.__setattr__(self, "scale", _frozen(self.scale, np.float32))
        object.__setattr__(self, "zero_point", _frozen(self.zero_point, self.values.dtype))

    @property
    def dtype(self) -> np.dtype:
        return self.values.dtype

    @property
    def qmin(self) -> int:
        return int(np.iinfo(self.dtype).min)

    @property
    def qmax(self) -> int:
        return int(np.iinfo(self.dtype).max)

    def qparams(self) -> QParams:
        """The same parameters as tpusim's :class:`~tpusim.quant.arithmetic.QParams`."""
        from tpusim.quant.arithmetic import QParams
        return QParams(self.scale.astype(np.float64), self.zero_point.astype(np.int64), self.qmin, self.qmax,
                       axis=self.axis)

    def dequantize(self) -> np.ndarray:
        """``(values - zero_point) * scale`` in float32, broadcast along ``axis``: ONNX DequantizeLinear."""
        return _dequantize(self.values, self.scale, self.zero_point, self.axis)


@dataclass(frozen=True, eq=False)
class StrippedModel:
    """A QDQ model separated into a float model and the quantization parameters it carried."""

    model: onnx.ModelProto                 # float: no QuantizeLinear/DequantizeLinear left
    activations: dict[str, TensorQuant]    # float tensor name -> the grid the model quantized it to
    constants: dict[str, WeightQuant]      # float initializer name (the former DQ output) -> integers and params
    format: str                            # "qdq", or "float" (nothing to strip: model is the input itself)
    # Quantized tensors that some nodes read in float, bypassing the Q -> DQ (tensor -> those node names).
    float_readers: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # Graph inputs/outputs the original model exchanged as integers; the float model exchanges
    # their dequantized values (the grid is in ``activations``).
    integer_io: frozenset[str] = frozenset()


def _is_q(node: onnx.NodeProto) -> bool:
    return node.op_type == "QuantizeLinear" and node.domain in QDQ_DOMAINS


def _is_dq(node: onnx.NodeProto) -> bool:
    return node.op_type == "DequantizeLinear" and node.domain in QDQ_DOMAINS


def _is_qoperator(node: onnx.NodeProto) -> bool:
    return node.op_type in QOPERATOR_OPS or node.op_type.startswith("QLinear")


def is_quantized(model: onnx.ModelProto) -> bool:
    """True if the model carries quantization: any Q/DQ node (QDQ format) or QOperator op."""
    return any(_is_q(n) or _is_dq(n) or _is_qoperator(n) for n in model.graph.node)


def _along(params: np.ndarray, ndim: int, axis: int | None) -> np.ndarray:
    """Per-tensor (0-d) or per-channel parameters shaped to broadcast against an ``ndim`` tensor."""
    if axis is None:
        return params.reshape(())
    shape = [1] * ndim
    shape[axis] = params.size
    return params.reshape(shape)


def _dequantize(values: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, axis: int | None) -> np.ndarray:
    """ONNX DequantizeLinear: ``(q - zero_point) * scale``, the difference exact, the product in float32."""
    diff = values.astype(np.int64) - _along(zero_point.astype(np.int64), values.ndim, axis)
    return diff.astype(np.float32) * _along(scale.astype(np.float32), values.ndim, axis)


def _quantize(x: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, axis: int | None, dtype: np.dtype) -> np.ndarray:
    """ONNX QuantizeLinear: ``saturate(round_half_even(x / scale) + zero_point)``, the division in float32."""
    q = np.rint(x.astype(np.float32) / _along(scale.astype(np.float32), x.ndim, axis)).astype(np.float64)
    q = q + _along(zero_point.astype(np.float64), x.ndim, axis)
    info = np.iinfo(dtype)
    return np.clip(q, info.min, info.max).astype(dtype)


@dataclass(frozen=True)
class _Params:
    scale: np.ndarray        # float32, 0-d or 1-d
    zero_point: np.ndarray   # same shape, integer
    dtype_code: int          # TensorProto element type of the integers
    axis: int | None         # as written (not normalized), None for per tensor
    qrange: tuple[int, int] | None = None   # a Clip between Q and DQ narrows the integers to this

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(helper.tensor_dtype_to_np_dtype(self.dtype_code))

    def same(self, other: "_Params") -> bool:
        return (self.dtype_code == other.dtype_code and self.scale.shape == other.scale.shape
                and np.array_equal(self.scale, other.scale) and np.array_equal(self.zero_point, other.zero_point)
                and (self.axis is None) == (other.axis is None))

    def same_grid(self, other: "_Params") -> bool:
        """The same parameters and the same integer range (two Qs of one tensor)."""
        return self.same(other) and self.qrange == other.qrange

    def tensor_quant(self) -> TensorQuant:
        return TensorQuant(scale=float(self.scale), zero_point=int(self.zero_point), dtype=self.dtype,
                           qrange=self.qrange)

    def describe(self) -> str:
        if self.axis is None:
            return self.tensor_quant().describe()
        return f"{self.scale.size} per-channel scales (axis {self.axis}, {_type_name(self.dtype_code)})"


@dataclass
class _QOut:
    """What one QuantizeLinear output holds."""

    index: int                    # of the QuantizeLinear node
    params: _Params
    source: str | None            # the float activation it quantizes
    integers: np.ndarray | None   # or: the integers of a quantized constant


class _Stripper:
    def __init__(self, model: onnx.ModelProto, where: str):
        self.model = model
        self.where = where
        graph = model.graph
        self.nodes = list(graph.node)
        self.names = [n.name or f"{n.op_type}_{i}" for i, n in enumerate(self.nodes)]
        self.initializers = {init.name: init for init in graph.initializer}
        self.producer: dict[str, int] = {}
        self.readers: dict[str, list[int]] = {}
        for index, node in enumerate(self.nodes):
            for out in node.output:
                if out:
                    self.producer[out] = index
            for name in node.input:
                if name:
                    self.readers.setdefault(name, []).append(index)
        self.graph_inputs = {vi.name: vi for vi in graph.input if vi.name not in self.initializers}
        self.output_names = [o.name for o in graph.output]
        # Results
        self.alias: dict[str, str] = {}               # removed tensor -> the float tensor that replaces it
        self.q_outputs: dict[str, _QOut] = {}
        self.activations: dict[str, tuple[_Params, int]] = {}
        self.folded: dict[str, np.ndarray] = {}       # DQ output -> float initializer values
        self.constants: dict[str, WeightQuant] = {}
        self.removed: set[int] = set()
        self.integer_io: set[str] = set()

    # --- helpers -------------------------------------------------------------------------------
    def channel_axis(self, index: int, params: "_Params", shape: tuple[int, ...]) -> int | None:
        """The per-channel axis of ``params`` on a constant of ``shape``, normalized; None per tensor."""
        axis = params.axis
        if axis is None:
            return None
        if not -len(shape) <= axis < len(shape) or shape[axis] != params.scale.size:
            raise self.fail(index, f"{params.scale.size} per-channel scales do not fit axis {axis} of shape {shape}")
        return axis % len(shape)

    def fail(self, index: int, message: str) -> ModelError:
        node = self.nodes[index]
        return ModelError(f"{self.where}: node {self.names[index]!r} ({node.op_type}): {message}")

    def resolve(self, name: str) -> str:
        while name in self.alias:
            name = self.alias[name]
        return name

    def constant(self, name: str) -> TensorProto | None:
        """The tensor behind ``name`` if it is an initializer or a Constant, looking through Identity."""
        seen = 0
        while name in self.producer and name not in self.initializers and seen < len(self.nodes):
            node = self.nodes[self.producer[name]]
            if node.op_type == "Identity" and node.domain in ("", "ai.onnx"):
                name = node.input[0]
                seen += 1
                continue
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
                return _constant_tensor(node)
            return None
        return self.initializers.get(name)

    def read_params(self, index: int, x_type: int | None) -> _Params:
        node = self.nodes[index]
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        block = int(attrs.get("block_size", 0))
        if block:
            raise self.fail(index, f"block quantization (block_size={block}) is not supported; "
                                   "only per-tensor or per-channel (axis) parameters")
        if len(node.input) < 2 or not node.input[1]:
            raise self.fail(index, "missing scale")
        scale_t = self.constant(node.input[1])
        if scale_t is None:
            raise self.fail(index, f"scale {node.input[1]!r} is not a constant (initializer or Constant); "
                                   "tpusim needs static quantization parameters")
        if scale_t.data_type != TensorProto.FLOAT:
            raise self.fail(index, f"scale {node.input[1]!r} is {_type_name(scale_t.data_type)}; "
                                   "only float32 scales are supported")
        zp_name = node.input[2] if len(node.input) > 2 else ""
        zp_t = None
        if zp_name:
            zp_t = self.constant(zp_name)
            if zp_t is None:
                raise self.fail(index, f"zero point {zp_name!r} is not a constant (initializer or Constant); "
                                       "tpusim needs static quantization parameters")
            dtype_code = zp_t.data_type
        elif _is_q(node):
            dtype_code = int(attrs.get("output_dtype", 0)) or TensorProto.UINT8
        else:
            dtype_code = x_type if x_type is not None else TensorProto.UINT8
        allowed = _ACTIVATION_TYPES if _is_q(node) else _CONSTANT_TYPES
        if dtype_code not in allowed:
            raise self.fail(index, f"{_type_name(dtype_code)} quantization is not supported; tpusim runs "
                                   "int8/uint8 tensors (int32 only for constants such as biases)")
        scale = numpy_helper.to_array(scale_t).astype(np.float32)
        zero_point = (numpy_helper.to_array(zp_t) if zp_t is not None
                      else np.zeros(scale.shape, helper.tensor_dtype_to_np_dtype(dtype_code)))
        if scale.ndim > 1:
            raise self.fail(index, f"scale of shape {scale.shape} (block quantization) is not supported; "
                                   "only per-tensor or per-channel (axis) parameters")
        if scale.size == 1:
            scale = scale.reshape(())
        if zero_point.size == 1 and scale.ndim == 0:
            zero_point = zero_point.reshape(())
        if zero_point.shape != scale.shape:
            raise self.fail(index, f"zero point of shape {zero_point.shape} does not match scale of shape {scale.shape}")
        if not np.all(np.isfinite(scale) & (scale > 0)):
            raise self.fail(index, f"scales must be finite and positive, got {scale.reshape(-1)[:4].tolist()}")
        axis = None if scale.ndim == 0 else int(attrs.get("axis", 1))
        return _Params(scale=scale, zero_point=zero_point, dtype_code=dtype_code, axis=axis)

    def record_activation(self, tensor: str, params: _Params, index: int) -> None:
        if params.axis is not None:
            raise self.fail(index, f"per-channel quantization (axis {params.axis}) of activation {tensor!r} is "
                                   "not supported; an activation needs one scale and zero point")
        if params.dtype_code not in _ACTIVATION_TYPES:
            raise self.fail(index, f"activation {tensor!r} is {_type_name(params.dtype_code)}; "
                                   "tpusim runs int8/uint8 activations")
        known = self.activations.get(tensor)
        if known is None:
            self.activations[tensor] = (params, index)
        elif not known[0].same_grid(params):
            raise self.fail(index, f"tensor {tensor!r} is quantized with {params.describe()} here but with "
                                   f"{known[0].describe()} by node {self.names[known[1]]!r}; "
                                   "tpusim keeps one grid per tensor")

    def fold(self, index: int, integers: np.ndarray, params: _Params) -> None:
        node = self.nodes[index]
        axis = self.channel_axis(index, params, integers.shape)
        values = integers.astype(params.dtype)
        zero_point = params.zero_point.astype(params.dtype)
        self.folded[node.output[0]] = _dequantize(values, params.scale, zero_point, axis)
        self.constants[node.output[0]] = WeightQuant(values=values, scale=params.scale, zero_point=zero_point,
                                                     axis=axis)

    # --- the pass ------------------------------------------------------------------------------
    def check_qoperator(self) -> None:
        found = Counter(n.op_type for n in self.nodes if _is_qoperator(n))
        if found:
            listed = ", ".join(f"{op} x{count}" for op, count in sorted(found.items()))
            raise ModelError(f"{self.where}: QOperator-format quantized model ({listed}) is not supported; "
                             f"tpusim reads QDQ models: {CONVERT_HINT}")

    def run(self) -> StrippedModel:
        self.check_qoperator()
        if not any(_is_q(n) or _is_dq(n) for n in self.nodes):
            return StrippedModel(model=self.model, activations={}, constants={}, format="float")
        dq_inputs = {n.input[0] for n in self.nodes if _is_dq(n)}
        integer_inputs = {name for name, vi in self.graph_inputs.items()
                          if name in dq_inputs and vi.type.tensor_type.elem_type in _CONSTANT_TYPES}
        for index, node in enumerate(self.nodes):
            if index in self.removed:
                continue  # an integer Clip, taken with its QuantizeLinear
            if _is_q(node):
                self.visit_q(index)
            elif _is_dq(node):
                self.visit_dq(index, integer_inputs)
            else:
                for name in node.input:
                    if name in self.q_outputs:
                        raise self.fail(index, f"input {name!r} is the integer output of QuantizeLinear "
                                               f"{self.names[self.q_outputs[name].index]!r}; "
                                               "in a QDQ model only DequantizeLinear reads it")
                    if name in integer_inputs:
                        raise self.fail(index, f"input {name!r} is the integer graph input; "
                                               "in a QDQ model only DequantizeLinear reads it")
        return self.build()

    def integer_clip(self, index: int, params: _Params) -> tuple[int, tuple[int, int]] | None:
        """A Clip that alone reads QuantizeLinear ``index``'s integers, with constant bounds: (its index,
        the integer range it leaves). The bounds are the integers' own type (ONNX's Clip requires it)."""
        node = self.nodes[index]
        readers = self.readers.get(node.output[0], [])
        if len(readers) != 1:
            return None
        clip_index = readers[0]
        clip = self.nodes[clip_index]
        if clip.op_type != "Clip" or clip.domain not in ("", "ai.onnx") or clip.input[0] != node.output[0]:
            return None
        info = np.iinfo(params.dtype)
        bounds = [int(info.min), int(info.max)]
        for slot in (1, 2):
            name = clip.input[slot] if len(clip.input) > slot else ""
            if not name:
                continue
            tensor = self.constant(name)
            if tensor is None or tensor.data_type != params.dtype_code:
                raise self.fail(clip_index, f"bound {name!r} on the integers of QuantizeLinear "
                                            f"{self.names[index]!r} is not a constant {_type_name(params.dtype_code)}")
            bound = numpy_helper.to_array(tensor)
            if bound.size != 1:
                raise self.fail(clip_index, f"bound {name!r} has {bound.size} values; expected one")
            value = int(bound.reshape(-1)[0])
            bounds[slot - 1] = max(bounds[0], value) if slot == 1 else min(bounds[1], value)
        low, high = bounds
        zero_points = params.zero_point.reshape(-1)
        if not low < high or np.any(zero_points < low) or np.any(zero_points > high):
            raise self.fail(clip_index, f"clips the integers of QuantizeLinear {self.names[index]!r} to "
                                        f"[{low}, {high}], which must be a range holding its zero point "
                                        f"{int(zero_points[0])}")
        return clip_index, (low, high)

    def visit_q(self, index: int) -> None:
        node = self.nodes[index]
        params = self.read_params(index, None)
        clip = self.integer_clip(index, params)
        if clip is not None and clip[1] != (int(np.iinfo(params.dtype).min), int(np.iinfo(params.dtype).max)):
            params = _Params(params.scale, params.zero_point, params.dtype_code, params.axis, clip[1])
        source = self.resolve(node.input[0])
        const = self.constant(source)
        if const is not None and const.data_type != TensorProto.FLOAT:
            raise self.fail(index, f"input {source!r} is {_type_name(const.data_type)}; expected float32")
        x = numpy_helper.to_array(const) if const is not None else self.folded.get(source)
        if x is not None:  # a float constant quantized in the graph (fake-quantized weight)
            axis = self.channel_axis(index, params, x.shape)
            integers = _quantize(x, params.scale, params.zero_point, axis, params.dtype)
            if params.qrange is not None:
                integers = np.clip(integers, *params.qrange).astype(params.dtype)
            out = _QOut(index, params, None, integers)
        else:
            self.record_activation(source, params, index)
            out = _QOut(index, params, source, None)
        self.q_outputs[node.output[0]] = out
        self.removed.add(index)
        if clip is not None:  # its DequantizeLinear reads the Clip's output: the same integers, narrowed
            clip_node = self.nodes[clip[0]]
            self.q_outputs[clip_node.output[0]] = out
            self.removed.add(clip[0])

    def visit_dq(self, index: int, integer_inputs: set[str]) -> None:
        node = self.nodes[index]
        x = node.input[0]
        if x in self.q_outputs:
            q = self.q_outputs[x]
            params = self.read_params(index, q.params.dtype_code)
            if not params.same(q.params):
                raise self.fail(index, f"its parameters ({params.describe()}) differ from those of its "
                                       f"QuantizeLinear {self.names[q.index]!r} "
                                       f"({q.params.describe()}); tpusim keeps one grid per tensor")
            if q.integers is not None:
                self.fold(index, q.integers, params)
            else:
                self.alias[node.output[0]] = q.source
        elif (const := self.constant(x)) is not None:
            if const.data_type not in _CONSTANT_TYPES:
                raise self.fail(index, f"{_type_name(const.data_type)} constant {x!r} is not supported; tpusim "
                                       "runs int8/uint8 tensors (int32 only for constants such as biases)")
            params = self.read_params(index, const.data_type)
            if params.dtype_code != const.data_type:
                raise self.fail(index, f"zero point is {_type_name(params.dtype_code)} but {x!r} is "
                                       f"{_type_name(const.data_type)}")
            self.fold(index, numpy_helper.to_array(const), params)
        elif x in integer_inputs:
            elem = self.graph_inputs[x].type.tensor_type.elem_type
            params = self.read_params(index, elem)
            if params.dtype_code != elem:
                raise self.fail(index, f"zero point is {_type_name(params.dtype_code)} but input {x!r} is "
                                       f"{_type_name(elem)}")
            self.record_activation(x, params, index)
            self.alias[node.output[0]] = x
            self.integer_io.add(x)
        else:
            raise self.fail(index, f"input {x!r} is neither a constant, a QuantizeLinear output nor an integer "
                                   "graph input; integer ops between QuantizeLinear and DequantizeLinear are "
                                   "not supported")
        self.removed.add(index)

    def build(self) -> StrippedModel:
        graph = self.model.graph
        output_set = set(self.output_names)
        # A graph output that is a Q output without DQ: the float model outputs the value it quantizes.
        for y in self.output_names:
            q = self.q_outputs.get(y)
            if q is not None:
                if q.source is None:
                    raise ModelError(f"{self.where}: graph output {y!r} is a quantized constant; not supported")
                self.alias[y] = q.source
                self.integer_io.add(y)
        # Graph outputs keep their names: rename the float tensor, or add an Identity when it must keep its own.
        rename: dict[str, str] = {}
        identities: list[tuple[str, str]] = []
        for y in self.output_names:
            if y not in self.alias:
                continue
            source = self.resolve(y)
            if source in rename or source in output_set or source in self.graph_inputs or source in self.initializers:
                identities.append((source, y))
            else:
                rename[source] = y

        def final(name: str) -> str:
            name = self.resolve(name) if name else name
            return rename.get(name, name)

        nodes = []
        for index, node in enumerate(self.nodes):
            if index in self.removed:
                continue
            new = onnx.NodeProto()
            new.CopyFrom(node)
            new.ClearField("input")
            new.input.extend(final(n) for n in node.input)
            new.ClearField("output")
            new.output.extend(rename.get(n, n) for n in node.output)
            nodes.append(new)
        taken = {n.name for n in self.nodes}
        for source, y in identities:
            name = f"{y}_DequantizeLinear_Identity"
            while name in taken:
                name += "_"
            taken.add(name)
            nodes.append(helper.make_node("Identity", [final(source)], [y], name=name))
        nodes = _drop_dead_constants(nodes, output_set)

        used = {n for node in nodes for n in node.input} | output_set
        initializers = [init for init in graph.initializer if init.name in used]
        initializers += [numpy_helper.from_array(values, name) for name, values in self.folded.items() if name in used]
        removed_tensors = set(self.alias) | set(self.q_outputs) | set(self.folded)

        out = onnx.ModelProto()
        out.CopyFrom(self.model)
        g = out.graph
        for name in ("node", "initializer", "value_info", "input"):
            g.ClearField(name)
        g.node.extend(nodes)
        g.initializer.extend(initializers)
        kept_inits = {init.name for init in initializers}
        for vi in graph.input:
            if vi.name in self.initializers and vi.name not in kept_inits:
                continue
            new = g.input.add()
            new.CopyFrom(vi)
            if vi.name in self.integer_io:
                new.type.tensor_type.elem_type = TensorProto.FLOAT
        for vi in g.output:
            if vi.name in self.integer_io:
                vi.type.tensor_type.elem_type = TensorProto.FLOAT
        for vi in graph.value_info:
            if vi.name in removed_tensors or rename.get(vi.name, vi.name) in output_set:
                continue
            new = g.value_info.add()
            new.CopyFrom(vi)
            new.name = rename.get(vi.name, vi.name)
        if not any(n.domain == "com.microsoft" for n in nodes):
            kept = [o for o in out.opset_import if o.domain != "com.microsoft"]
            out.ClearField("opset_import")
            out.opset_import.extend(kept)

        activations = {rename.get(t, t): p.tensor_quant() for t, (p, _) in self.activations.items()}
        for source, y in identities:
            if source in self.activations:
                activations[y] = self.activations[source][0].tensor_quant()
        readers: dict[str, list[str]] = {}
        for index, node in enumerate(self.nodes):
            if index in self.removed:
                continue
            for name in node.input:
                if name in self.activations:
                    readers.setdefault(rename.get(name, name), []).append(self.names[index])
        return StrippedModel(
            model=out,
            activations=activations,
            constants={name: wq for name, wq in self.constants.items() if name in kept_inits},
            format="qdq",
            float_readers={t: tuple(dict.fromkeys(r)) for t, r in readers.items()},
            integer_io=frozenset(rename.get(n, n) for n in self.integer_io),
        )


def _constant_tensor(node: onnx.NodeProto) -> TensorProto | None:
    for attr in node.attribute:
        value = helper.get_attribute_value(attr)
        if attr.name == "value":
            return value
        if attr.name in ("value_float", "value_floats"):
            return numpy_helper.from_array(np.array(value, dtype=np.float32))
        if attr.name in ("value_int", "value_ints"):
            return numpy_helper.from_array(np.array(value, dtype=np.int64))
    return None


def _drop_dead_constants(nodes: list[onnx.NodeProto], outputs: set[str]) -> list[onnx.NodeProto]:
    """Remove Constant/Identity nodes nobody reads any more (they fed the removed Q/DQ parameters)."""
    while True:
        read = {n for node in nodes for n in node.input} | outputs
        kept = [node for node in nodes
                if not (node.op_type in ("Constant", "Identity") and node.domain in ("", "ai.onnx")
                        and not any(o in read for o in node.output))]
        if len(kept) == len(nodes):
            return kept
        nodes = kept


def strip_qdq(model: onnx.ModelProto, where: str) -> StrippedModel:
    """Separate a QDQ model into a float model and its quantization parameters (see the module docstring).

    ``where`` names the model in error messages. The input model is not modified. A model without
    Q/DQ nodes comes back unchanged with ``format == "float"``; a QOperator model raises one
    :class:`ModelError` line listing its quantized ops and how to convert it.
    """
    return _Stripper(model, where).run()
