"""ONNX exports of a lowered graph, for cross-checking the integer model against ONNX Runtime.

- :func:`export_fp32`: the lowered (BN-folded) graph as a plain FP32 ONNX model; a fused activation
  becomes a Relu/Clip after its producer, whose own output is named ``<tensor>__preact``.
- :func:`export_qdq`: the same graph in the standard QDQ format with our parameters:
  QuantizeLinear/DequantizeLinear around every activation, int8 weight initializers with a
  (per-channel, axis 0) DequantizeLinear, int32 biases with a DequantizeLinear at ``s_x * s_w``.
  A fused activation that tightens the output grid (ReLU on a signed grid, ReLU6 below the
  calibrated maximum) is written as Q -> DQ -> Relu/Clip -> Q on the output's grid, which is
  exactly the integer clamp of the chip.
- :func:`ort_quantize_static`: ONNX Runtime's own quantizer run on :func:`export_fp32`, with our
  activation parameters passed as ``TensorQuantOverrides``; weights and biases it quantizes itself.

Integer tensors are exposed under :func:`quantized_name` (our export) or as the output of the
QuantizeLinear ORT inserted (:func:`ort_quantized_outputs`).
"""
from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from tpusim import ops
from tpusim.ir import Graph, Layer
from tpusim.ops.activation import activation_node
from tpusim.quant.arithmetic import QParams
from tpusim.quant.qlayer import QuantizedGraph
from tpusim.quant.quantize import own_params_tensors
from tpusim.frontend.lowering import index_rows

OPSET = 17
PREACT_SUFFIX = "__preact"


def quantized_name(tensor: str) -> str:
    return f"{tensor}__q"


def _separate_activation(layer: Layer) -> bool:
    """The layer's fused clamp is written as its own Relu/Clip node after the layer's op."""
    return layer.activation.kind != "none" and not ops.op(layer.op).applies_activation


def preact_name(layer: Layer) -> str:
    return layer.output + PREACT_SUFFIX if _separate_activation(layer) else layer.output


class _Builder:
    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._names: set[str] = set()

    def const(self, name: str, array: np.ndarray) -> str:
        if name not in self._names:
            self._names.add(name)
            self.initializers.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def node(self, op: str, inputs: Sequence[str], output: str, name: str, **attrs) -> str:
        self.nodes.append(helper.make_node(op, list(inputs), [output], name=name, **attrs))
        return output


def _model(b: _Builder, graph: Graph, outputs: list[onnx.ValueInfoProto], name: str) -> onnx.ModelProto:
    inp = helper.make_tensor_value_info(graph.input_name, _input_type(graph), list(graph.input_shape))
    g = helper.make_graph(b.nodes, name, [inp], outputs, b.initializers)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="tpusim")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def export_fp32(graph: Graph) -> onnx.ModelProto:
    """The lowered graph (BN folded, activations as separate Relu/Clip nodes) as an FP32 ONNX model."""
    b = _Builder()
    for layer in graph.layers:
        weight = b.const(f"{layer.name}_W", layer.weight) if layer.weight is not None else None
        bias = b.const(f"{layer.name}_B", layer.bias) if layer.bias is not None else None
        ops.op(layer.op).export(b, layer, list(layer.inputs), weight, bias, preact_name(layer))
        if _separate_activation(layer):
            activation_node(b, layer.activation, preact_name(layer), layer.output, f"{layer.name}_act")
    outputs = [helper.make_tensor_value_info(o, TensorProto.FLOAT, list(graph.shape_of(o))) for o in graph.outputs]
    return _model(b, graph, outputs, graph.name)


def _input_type(graph: Graph) -> int:
    """FLOAT, or INT64 for a graph input of token ids (read by embedding lookups only)."""
    return TensorProto.INT64 if index_rows(graph) is not None else TensorProto.FLOAT


def _onnx_type(qp: QParams) -> int:
    return TensorProto.UINT8 if qp.storage_dtype == np.uint8 else TensorProto.INT8


def _qparam_consts(b: _Builder, tensor: str, qp: QParams) -> tuple[str, str]:
    scale = b.const(f"{tensor}_scale", qp.scale.astype(np.float32))
    zero = b.const(f"{tensor}_zero_point", qp.zero_point.astype(qp.storage_dtype))
    return scale, zero


def export_qdq(qgraph: QuantizedGraph, graph: Graph, expose: Sequence[str] = (), *,
               like: onnx.ModelProto | None = None) -> onnx.ModelProto:
    """A QDQ ONNX model of ``graph`` with ``qgraph``'s scales, zero points, int8 weights and int32 biases.

    Without ``like``, its outputs are the integer graph outputs (named by :func:`quantized_name`), plus
    the integer tensors named in ``expose``: the form the cross-checks against ONNX Runtime read.

    With ``like`` (the source FP32 model), it is a drop-in replacement for that file: each graph
    output is dequantized back to float and takes the source output's name and element type, the
    input keeps the source's name, and a symbolic batch dimension of the source stays symbolic
    (batch-sized constants of Reshape/Resize follow the input's batch at run time). The integer
    tensors are still inside, under :func:`quantized_name`, and ``expose`` adds them as outputs too.
    """
    b = _Builder()
    params = qgraph.tensor_qparams

    def quantize_to(x: str, tensor: str, q_out: str, node: str) -> str:
        scale, zero = _qparam_consts(b, tensor, params[tensor])
        return b.node("QuantizeLinear", [x, scale, zero], q_out, node)

    def dequantize_for(tensor: str, consumer: str) -> str:
        if tensor == graph.input_name and ids:
            return graph.input_name  # token ids are read as they come
        scale, zero = _qparam_consts(b, tensor, params[tensor])
        return b.node("DequantizeLinear", [quantized_name(tensor), scale, zero], f"{tensor}__dq_{consumer}",
                      f"{tensor}_DQ_{consumer}")

    ids = index_rows(graph) is not None
    if ids:  # an int64 input of token ids keeps its integers (the identity grid): nothing to quantize
        b.node("Identity", [graph.input_name], quantized_name(graph.input_name), f"{graph.input_name}_ids")
    else:
        quantize_to(graph.input_name, graph.input_name, quantized_name(graph.input_name), f"{graph.input_name}_Q")
    for ql, layer in zip(qgraph.layers, graph.layers):
        name = layer.name
        inputs = [dequantize_for(t, f"{name}_{i}") for i, t in enumerate(layer.inputs)]
        weight = bias = None
        if layer.is_matrix:
            w_qp = ql.weight_qparams
            axis = {} if w_qp.axis is None else {"axis": 0}
            w_scale = b.const(f"{name}_W_scale", w_qp.scale.astype(np.float32))
            w_zero = b.const(f"{name}_W_zero_point", w_qp.zero_point.astype(np.int8))
            weight = b.node("DequantizeLinear", [b.const(f"{name}_W_quantized", ql.weight_q), w_scale, w_zero],
                            f"{name}_W_dq", f"{name}_W_DQ", **axis)
            s_x = float(params[layer.inputs[0]].scale)
            bias_scale = (np.broadcast_to(w_qp.scale, ql.bias_q.shape) * s_x).astype(np.float32)
            b_scale = b.const(f"{name}_B_scale", bias_scale)
            b_zero = b.const(f"{name}_B_zero_point", np.zeros(ql.bias_q.shape, np.int32))
            bias = b.node("DequantizeLinear", [b.const(f"{name}_B_quantized", ql.bias_q), b_scale, b_zero],
                          f"{name}_B_dq", f"{name}_B_DQ", axis=0)
        out = layer.output
        y_qp = params[out]
        tightened = (ql.out_qmin, ql.out_qmax) != (y_qp.qmin, y_qp.qmax)
        ops.op(layer.op).export(b, layer, inputs, weight, bias, f"{out}__float")
        if tightened and _separate_activation(layer):
            quantize_to(f"{out}__float", out, f"{out}__q_preact", f"{out}_Q_preact")
            scale, zero = _qparam_consts(b, out, y_qp)
            b.node("DequantizeLinear", [f"{out}__q_preact", scale, zero], f"{out}__dq_preact", f"{out}_DQ_preact")
            activation_node(b, layer.activation, f"{out}__dq_preact", f"{out}__float_act", f"{name}_act")
            quantize_to(f"{out}__float_act", out, quantized_name(out), f"{out}_Q")
        else:
            quantize_to(f"{out}__float", out, quantized_name(out), f"{out}_Q")
    if like is not None:
        return _drop_in(b, graph, params, expose, like)
    names = list(dict.fromkeys(list(graph.outputs) + list(expose)))
    outputs = [helper.make_tensor_value_info(quantized_name(t), _onnx_type(params[t]), list(graph.shape_of(t)))
               for t in names]
    return _model(b, graph, outputs, f"{graph.name}_qdq")


def _source_io(like: onnx.ModelProto) -> tuple[onnx.ValueInfoProto | None, list[onnx.ValueInfoProto]]:
    constants = {init.name for init in like.graph.initializer}
    inputs = [vi for vi in like.graph.input if vi.name not in constants]
    return (inputs[0] if len(inputs) == 1 else None), list(like.graph.output)


def _symbolic_batch(value_info: onnx.ValueInfoProto | None) -> str | None:
    """The name of a value's symbolic first dimension ("N" when it is unnamed), or None when it is fixed."""
    if value_info is None or not value_info.type.HasField("tensor_type"):
        return None
    dims = value_info.type.tensor_type.shape.dim
    if not dims or dims[0].HasField("dim_value"):
        return None
    return dims[0].dim_param or "N"


def _float_type(value_info: onnx.ValueInfoProto | None) -> int:
    elem = value_info.type.tensor_type.elem_type if value_info is not None else TensorProto.FLOAT
    return elem if elem in (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16) \
        else TensorProto.FLOAT


def _value_info(name: str, elem: int, shape: Sequence[int], batch: str | None) -> onnx.ValueInfoProto:
    dims: list[int | str] = list(shape)
    if batch is not None and dims:
        dims[0] = batch
    return helper.make_tensor_value_info(name, elem, dims)


def _follow_input_batch(b: _Builder, graph: Graph) -> None:
    """Make shape constants that hold the export's batch follow the input's batch instead."""
    consts = {init.name: init for init in b.initializers}
    batch = graph.input_shape[0]
    for node in list(b.nodes):
        if node.op_type == "Reshape" and len(node.input) > 1 and node.input[1] in consts:
            shape = numpy_helper.to_array(consts[node.input[1]]).copy()
            if shape.size and shape[0] == batch:
                shape[0] = 0  # Reshape's 0: copy the input's first dimension (its batch)
                consts[node.input[1]].CopyFrom(numpy_helper.from_array(shape.astype(np.int64), node.input[1]))
        elif node.op_type == "Resize" and len(node.input) > 3 and node.input[3] in consts:
            sizes = numpy_helper.to_array(consts[node.input[3]])
            if sizes.size and sizes[0] == batch:
                # sizes = concat(shape(x)[0:1], the constant's other entries), computed before the Resize
                stem = f"{node.name}_sizes"
                start, stop = (b.const(f"{stem}_{i}", np.array([i], np.int64)) for i in (0, 1))
                rest = b.const(f"{stem}_rest", sizes[1:].astype(np.int64))
                at = b.nodes.index(node)
                b.nodes[at:at] = [
                    helper.make_node("Shape", [node.input[0]], [f"{stem}_shape"], name=f"{stem}_Shape"),
                    helper.make_node("Slice", [f"{stem}_shape", start, stop], [f"{stem}_batch"], name=f"{stem}_Slice"),
                    helper.make_node("Concat", [f"{stem}_batch", rest], [f"{stem}_run"], name=f"{stem}_Concat", axis=0),
                ]
                node.input[3] = f"{stem}_run"


def _drop_in(b: _Builder, graph: Graph, params: dict[str, QParams], expose: Sequence[str],
             like: onnx.ModelProto) -> onnx.ModelProto:
    source_input, source_outputs = _source_io(like)
    batch = _symbolic_batch(source_input)
    input_name = source_input.name if source_input is not None else graph.input_name
    if input_name != graph.input_name:
        for node in b.nodes:
            node.input[:] = [input_name if name == graph.input_name else name for name in node.input]
    if batch is not None:
        _follow_input_batch(b, graph)
    if len(source_outputs) != len(graph.outputs):
        source_outputs = [None] * len(graph.outputs)
    outputs = []
    for tensor, source in zip(graph.outputs, source_outputs):
        name = source.name if source is not None else tensor
        elem = _float_type(source)
        scale, zero = _qparam_consts(b, tensor, params[tensor])
        as_float = name if elem == TensorProto.FLOAT else f"{name}__float32"
        b.node("DequantizeLinear", [quantized_name(tensor), scale, zero], as_float, f"{tensor}_DQ_output")
        if elem != TensorProto.FLOAT:
            b.node("Cast", [as_float], name, f"{tensor}_Cast_output", to=elem)
        outputs.append(_value_info(name, elem, graph.shape_of(tensor), batch))
    for tensor in dict.fromkeys(expose):
        outputs.append(_value_info(quantized_name(tensor), _onnx_type(params[tensor]), graph.shape_of(tensor), batch))
    inp = _value_info(input_name, _input_type(graph), graph.input_shape, batch)
    g = helper.make_graph(b.nodes, like.graph.name or graph.name, [inp], outputs, b.initializers)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="tpusim")
    model.ir_version = 8
    model.doc_string = ("int8 QDQ model written by tpusim: int8 weights, int32 biases and every activation "
                        "quantized with tpusim's scales; float inputs and outputs as in the source model")
    onnx.checker.check_model(model)
    return model


def _override(qp: QParams) -> list[dict]:
    return [{"scale": np.asarray(qp.scale, np.float32), "zero_point": np.asarray(qp.zero_point).astype(qp.storage_dtype)}]


def ort_quantize_static(qgraph: QuantizedGraph, calibration: np.ndarray) -> onnx.ModelProto:
    """ONNX Runtime's ``quantize_static`` (QDQ) of :func:`export_fp32` with our activation parameters.

    Weight granularity and activation type follow ``qgraph.quant``; weights are symmetric int8.
    Pre-activation tensors (``__preact``) get their output's parameters, so a Relu/Clip that ORT
    keeps (it keeps them for signed activations) is a clamp on the output's grid, as on the chip.
    ``calibration`` only feeds ORT's calibrator, whose ranges the overrides replace.
    """
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    graph = qgraph.graph
    params = qgraph.tensor_qparams
    overrides = {t: _override(params[t]) for t in own_params_tensors(graph)}
    for layer in graph.layers:
        if preact_name(layer) != layer.output:
            overrides[preact_name(layer)] = _override(params[layer.output])
        elif ops.op(layer.op).applies_activation:
            overrides[layer.output] = _override(params[layer.output])

    class _Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._batches = iter([{graph.input_name: calibration[i : i + graph.batch]}
                                  for i in range(0, len(calibration) - graph.batch + 1, graph.batch)])

        def get_next(self):
            return next(self._batches, None)

    symmetric = qgraph.quant.activations == "symmetric-int8"
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "qdq.onnx"
        onnx.save(export_fp32(graph), str(src))
        quantize_static(
            str(src), str(dst), _Reader(), quant_format=QuantFormat.QDQ,
            per_channel=qgraph.quant.weights == "per-channel", reduce_range=False,
            activation_type=QuantType.QInt8 if symmetric else QuantType.QUInt8, weight_type=QuantType.QInt8,
            extra_options={"ActivationSymmetric": symmetric, "WeightSymmetric": True,
                           "TensorQuantOverrides": overrides},
        )
        return onnx.load(str(dst))


def ort_quantized_outputs(model: onnx.ModelProto, tensors: Sequence[str]) -> dict[str, str]:
    """Name of the integer tensor ORT's quantizer made for each float tensor (its QuantizeLinear output)."""
    found = {node.input[0]: node.output[0] for node in model.graph.node if node.op_type == "QuantizeLinear"}
    # A graph output keeps its float name: ORT renames the producer's tensor and ends with a DequantizeLinear.
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear" and node.output[0] in {o.name for o in model.graph.output}:
            found.setdefault(node.output[0], node.input[0])
    return {t: found[t] for t in tensors if t in found}


def with_outputs(model: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    """A copy of ``model`` that also outputs the tensors ``names`` (type left to ONNX Runtime)."""
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    present = {o.name for o in exposed.graph.output}
    for name in names:
        if name not in present:
            exposed.graph.output.append(helper.make_empty_tensor_value_info(name))
    return exposed
