"""Reading already-quantized (QDQ) models: ONNX Runtime's own quantize_static output, and hand-built graphs."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx_graphs import GraphBuilder
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

from tpusim.errors import ModelError
from tpusim.frontend import lower_model
from tpusim.frontend.qdq import StrippedModel, is_quantized, strip_qdq

INPUT_SHAPE = (1, 3, 8, 8)


# --- a small float CNN and ONNX Runtime's quantizations of it --------------------------------------------
def _fold_bn_conv(b: GraphBuilder, x: str, channels: int) -> str:
    """A depthwise conv whose batch norm was folded into it offline (what a pre-processed model holds)."""
    r = b.rng
    w = r.standard_normal((channels, 1, 3, 3)) * 0.3
    gamma, beta = r.uniform(0.5, 2.0, channels), r.normal(0, 0.3, channels)
    mean, var = r.normal(0, 0.5, channels), r.uniform(0.2, 3.0, channels)
    factor = gamma / np.sqrt(var + 1e-5)
    weight = b.const((w * factor.reshape(-1, 1, 1, 1)).astype(np.float32), "w")
    bias = b.const((beta - mean * factor).astype(np.float32), "b")
    return b.node("Conv", [x, weight, bias], group=channels, pads=[1, 1, 1, 1])


def _float_cnn() -> onnx.ModelProto:
    b = GraphBuilder(INPUT_SHAPE, seed=3)
    c1 = b.node("Relu", [b.conv("input", 3, 8, pads=[1, 1, 1, 1])])                     # conv + relu
    c2 = b.node("Relu", [b.batchnorm(b.conv(c1, 8, 8, pads=[1, 1, 1, 1]), 8)])           # conv + bn (in the graph)
    c3 = _fold_bn_conv(b, c2, 8)                                                          # conv + bn folded
    res = b.node("Add", [c3, c1])                                                         # residual add
    mp = b.node("MaxPool", [res], kernel_shape=[2, 2], strides=[2, 2])
    ap = b.node("AveragePool", [res], kernel_shape=[2, 2], strides=[2, 2])
    cat = b.node("Concat", [mp, ap], axis=1)
    flat = b.node("Flatten", [b.node("GlobalAveragePool", [cat])])
    mm = b.node("Add", [b.node("MatMul", [flat, b.weight((16, 10))]),                     # matmul + add
                        b.const((b.rng.standard_normal(10) * 0.1).astype(np.float32))])
    gm = b.node("Gemm", [mm, b.weight((4, 10)), b.const(np.full(4, 0.05, np.float32))], transB=1)
    sm = b.node("Softmax", [gm])
    return b.model([sm, gm])  # the Gemm output is a graph output and read by Softmax


class _Reader(CalibrationDataReader):
    def __init__(self, batches: int = 4, seed: int = 0):
        rng = np.random.default_rng(seed)
        self._data = iter([{"input": rng.standard_normal(INPUT_SHAPE).astype(np.float32)} for _ in range(batches)])

    def get_next(self):
        return next(self._data, None)


CONFIGS = {
    # name: (per_channel, activation type, extra options, weight type)
    "uint8-asym-per-tensor": (False, QuantType.QUInt8, {"ActivationSymmetric": False}, QuantType.QInt8),
    "uint8-asym-per-channel": (True, QuantType.QUInt8, {"ActivationSymmetric": False}, QuantType.QInt8),
    "uint8-sym-per-channel": (True, QuantType.QUInt8, {"ActivationSymmetric": True}, QuantType.QInt8),
    "int8-sym-per-tensor": (False, QuantType.QInt8, {"ActivationSymmetric": True}, QuantType.QInt8),
    "int8-sym-per-channel": (True, QuantType.QInt8, {"ActivationSymmetric": True}, QuantType.QInt8),
    "int8-asym-per-channel": (True, QuantType.QInt8, {"ActivationSymmetric": False}, QuantType.QInt8),
    "dedicated-qdq-pairs": (True, QuantType.QUInt8, {"DedicatedQDQPair": True}, QuantType.QInt8),
    "uint8-asym-weights": (False, QuantType.QUInt8, {"WeightSymmetric": False}, QuantType.QUInt8),
}


def _ort_quantize(tmp_path, float_model, fmt=QuantFormat.QDQ, per_channel=True, act=QuantType.QUInt8,
                  extra=None, weight_type=QuantType.QInt8) -> onnx.ModelProto:
    src, dst = tmp_path / "float.onnx", tmp_path / "quantized.onnx"
    onnx.save(float_model, src)
    options = {"WeightSymmetric": True, **(extra or {})}
    quantize_static(str(src), str(dst), _Reader(), quant_format=fmt, per_channel=per_channel,
                    activation_type=act, weight_type=weight_type, extra_options=options)
    return onnx.load(str(dst))


@pytest.fixture(scope="module")
def float_cnn():
    return _float_cnn()


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def quantized(request, float_cnn, tmp_path_factory):
    per_channel, act, extra, weight_type = CONFIGS[request.param]
    qdq = _ort_quantize(tmp_path_factory.mktemp(request.param), float_cnn, per_channel=per_channel, act=act,
                        extra=extra, weight_type=weight_type)
    return request.param, qdq, strip_qdq(qdq, "cnn_qdq.onnx")


def _arrays(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}


def _run(model: onnx.ModelProto, feeds) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    if not isinstance(feeds, dict):
        feeds = {session.get_inputs()[0].name: feeds}
    return session.run(None, feeds)


def _dequantize(values, scale, zero_point, axis):
    shape = [1] * values.ndim
    if axis is not None:
        shape[axis] = -1
    diff = (values.astype(np.int64) - np.reshape(zero_point, shape if axis is not None else ()).astype(np.int64))
    return diff.astype(np.float32) * np.reshape(scale, shape if axis is not None else ()).astype(np.float32)


def _requantize(stripped: StrippedModel) -> onnx.ModelProto:
    """Put a Q -> DQ pair back on every recorded activation (constants stay the float initializers)."""
    assert not stripped.float_readers and not stripped.integer_io
    model = onnx.ModelProto()
    model.CopyFrom(stripped.model)
    graph = model.graph
    acts = stripped.activations
    outputs = {o.name for o in graph.output}
    inputs = {i.name for i in graph.input}
    value = {t: f"{t}__float" if t in outputs else t for t in acts}     # where the float value lives
    dequantized = {t: t if t in outputs else f"{t}__dq" for t in acts}  # what readers read
    for t, tq in acts.items():
        graph.initializer.extend([numpy_helper.from_array(np.array(tq.scale, np.float32), f"{t}__s"),
                                  numpy_helper.from_array(np.array(tq.zero_point, tq.dtype), f"{t}__z")])

    def pair(t):
        return [helper.make_node("QuantizeLinear", [value[t], f"{t}__s", f"{t}__z"], [f"{t}__q"], name=f"{t}__Q"),
                helper.make_node("DequantizeLinear", [f"{t}__q", f"{t}__s", f"{t}__z"], [dequantized[t]],
                                 name=f"{t}__DQ")]

    nodes = [n for t in acts if t in inputs for n in pair(t)]
    for node in graph.node:
        new = onnx.NodeProto()
        new.CopyFrom(node)
        new.ClearField("input")
        new.input.extend(dequantized.get(i, i) for i in node.input)
        new.ClearField("output")
        new.output.extend(value.get(o, o) for o in node.output)
        nodes.append(new)
        nodes += [n for o in node.output if o in acts for n in pair(o)]
    graph.ClearField("node")
    graph.node.extend(nodes)
    graph.ClearField("value_info")
    return model


# --- ONNX Runtime's QDQ output -----------------------------------------------------------------------------
def test_stripped_model_is_a_checked_float_model(quantized):
    _, qdq, stripped = quantized
    assert stripped.format == "qdq"
    ops = {n.op_type for n in stripped.model.graph.node}
    assert not ops & {"QuantizeLinear", "DequantizeLinear"}
    onnx.checker.check_model(stripped.model, full_check=True)
    assert [o.name for o in stripped.model.graph.output] == [o.name for o in qdq.graph.output]
    assert all(o.type.tensor_type.elem_type == TensorProto.FLOAT for o in stripped.model.graph.output)
    assert not stripped.float_readers and not stripped.integer_io
    assert is_quantized(qdq) and not is_quantized(stripped.model)


def test_constants_dequantize_exactly_and_keep_the_files_integers(quantized):
    _, qdq, stripped = quantized
    file_arrays, floats = _arrays(qdq), _arrays(stripped.model)
    folded = {n.output[0]: n for n in qdq.graph.node
              if n.op_type == "DequantizeLinear" and n.input[0] in file_arrays}
    assert set(stripped.constants) == set(folded)
    for name, wq in stripped.constants.items():
        node = folded[name]
        assert np.array_equal(wq.values, file_arrays[node.input[0]]) and wq.values.dtype == file_arrays[node.input[0]].dtype
        assert np.array_equal(wq.scale.reshape(-1), file_arrays[node.input[1]].reshape(-1))
        assert np.array_equal(wq.zero_point.reshape(-1), file_arrays[node.input[2]].reshape(-1))
        expected = _dequantize(wq.values, wq.scale, wq.zero_point, wq.axis)
        assert floats[name].dtype == np.float32
        assert np.array_equal(floats[name].view(np.uint32), expected.view(np.uint32))
        assert np.array_equal(wq.dequantize(), floats[name])


def test_activations_are_the_grids_of_the_files_quantize_nodes(quantized):
    _, qdq, stripped = quantized
    arrays = _arrays(qdq)
    outputs = {o.name for o in qdq.graph.output}
    expected = {}
    for q in qdq.graph.node:
        if q.op_type != "QuantizeLinear" or q.input[0] in arrays:
            continue
        dq_outputs = [n.output[0] for n in qdq.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == q.output[0]]
        renamed = [o for o in dq_outputs if o in outputs]  # a graph output keeps its DQ output's name
        name = renamed[0] if renamed else q.input[0]
        expected[name] = (float(arrays[q.input[1]]), int(arrays[q.input[2]]), arrays[q.input[2]].dtype)
    got = {t: (tq.scale, tq.zero_point, tq.dtype) for t, tq in stripped.activations.items()}
    assert got == expected
    assert "input" in stripped.activations
    tensors = {o for n in stripped.model.graph.node for o in n.output} | {"input"}
    assert set(stripped.activations) <= tensors


def test_weight_granularity_and_int32_biases_at_input_times_weight_scale(quantized):
    name, _, stripped = quantized
    per_channel = CONFIGS[name][0]
    for node in stripped.model.graph.node:
        if node.op_type not in ("Conv", "Gemm", "MatMul", "BatchNormalization"):
            continue
        weight = stripped.constants[node.input[1]]
        if node.op_type == "Conv":
            out_channels = weight.values.shape[0]
            assert (weight.axis, weight.scale.shape) == ((0, (out_channels,)) if per_channel else (None, ()))
        elif node.op_type == "MatMul":  # (K, N): one scale per output column
            assert (weight.axis, weight.scale.shape) == ((1, (weight.values.shape[1],)) if per_channel else (None, ()))
        elif node.op_type == "Gemm":    # transB=1: (N, K)
            assert (weight.axis, weight.scale.shape) == ((0, (weight.values.shape[0],)) if per_channel else (None, ()))
        else:                           # ORT quantizes a BN's scale vector like a per-tensor weight
            assert weight.axis is None
        weight_type = CONFIGS[name][3]
        assert weight.dtype == (np.uint8 if weight_type == QuantType.QUInt8 else np.int8)
        if name != "uint8-asym-weights":
            assert np.all(weight.zero_point == 0)
        elif node.op_type != "BatchNormalization":  # (a BN's scale vector is positive: zero point 0)
            assert np.any(weight.zero_point != 0)
        if len(node.input) > 2 and node.input[2]:
            bias = stripped.constants[node.input[2]]
            s_x = np.float32(stripped.activations[node.input[0]].scale)
            assert bias.dtype == np.int32 and np.all(bias.zero_point == 0)
            assert np.array_equal(np.broadcast_to(bias.scale, weight.scale.shape), s_x * weight.scale)


def test_put_back_on_the_float_model_the_params_reproduce_onnxruntime_bit_for_bit(quantized):
    _, qdq, stripped = quantized
    x = np.random.default_rng(7).standard_normal((2,) + INPUT_SHAPE[1:]).astype(np.float32)
    want = _run(qdq, x)
    got = _run(_requantize(stripped), x)
    for a, b in zip(want, got):
        assert a.dtype == b.dtype == np.float32 and np.array_equal(a.view(np.uint32), b.view(np.uint32))


def test_stripped_model_lowers_and_every_layer_output_has_the_models_grid(quantized):
    _, _, stripped = quantized
    graph = lower_model(stripped.model, "cnn_qdq.onnx", batch=2)
    assert [layer.op for layer in graph.layers].count("conv") == 3
    for layer in graph.layers:
        assert layer.output in stripped.activations, layer.name


def test_onnxruntime_patterns(quantized, float_cnn):
    """What ONNX Runtime's QDQ quantizer does, which a run with the model's own parameters relies on."""
    name, _, stripped = quantized
    acts = stripped.activations
    relus_before = sum(n.op_type == "Relu" for n in float_cnn.graph.node)
    relus_after = sum(n.op_type == "Relu" for n in stripped.model.graph.node)
    relu_outputs = [n.output[0] for n in float_cnn.graph.node if n.op_type == "Relu"]
    # Relu is dropped, its clamp left to the grid, exactly when that grid starts at real 0.
    clamps = [acts[t].zero_point == acts[t].qmin for t in relu_outputs]
    assert relus_after == relus_before - sum(clamps)
    assert all(clamps) == (name in ("uint8-asym-per-tensor", "uint8-asym-per-channel", "int8-asym-per-channel",
                                    "dedicated-qdq-pairs", "uint8-asym-weights"))
    # MaxPool, AveragePool and Flatten keep their input's grid; Add, Concat and GlobalAveragePool get their own.
    for node in stripped.model.graph.node:
        if node.op_type in ("MaxPool", "AveragePool", "Flatten"):
            assert acts[node.output[0]].same_grid(acts[node.input[0]])
    # Softmax outputs get a fixed range, not a calibrated one: [0, 1], or [-1, 1] with symmetric activations.
    softmax = acts[next(n.output[0] for n in stripped.model.graph.node if n.op_type == "Softmax")]
    symmetric = CONFIGS[name][2].get("ActivationSymmetric", False)
    steps = 255 if not symmetric else 127 if softmax.dtype == np.int8 else 255 / 2
    assert np.float32(softmax.scale) == np.float32(1.0 / steps)
    assert softmax.zero_point == (softmax.qmin if not symmetric else 0 if softmax.dtype == np.int8 else 128)


def test_ops_left_in_float_have_no_grid_and_keep_float_weights(tmp_path, float_cnn):
    """ORT leaves excluded nodes in float: their outputs get no grid, their weights stay float initializers."""
    excluded = [n for n in float_cnn.graph.node if n.op_type in ("Gemm", "Softmax")]
    src, dst = tmp_path / "float.onnx", tmp_path / "partial.onnx"
    onnx.save(float_cnn, src)
    quantize_static(str(src), str(dst), _Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    nodes_to_exclude=[n.name for n in excluded], extra_options={"WeightSymmetric": True})
    stripped = strip_qdq(onnx.load(str(dst)), "partial.onnx")
    gemm, softmax = excluded
    assert gemm.input[0] in stripped.activations  # the Add before it is still quantized (output side)
    assert gemm.output[0] not in stripped.activations and softmax.output[0] not in stripped.activations
    assert not set(gemm.input[1:]) & set(stripped.constants)
    floats = _arrays(stripped.model)
    assert all(floats[w].dtype == np.float32 for w in gemm.input[1:])
    assert np.array_equal(floats[gemm.input[1]], _arrays(float_cnn)[gemm.input[1]])


def test_params_convert_to_tpusim_qparams(quantized):
    _, _, stripped = quantized
    tq = stripped.activations["input"]
    qp = tq.qparams()
    assert (float(qp.scale), int(qp.zero_point), qp.qmin, qp.qmax) == (tq.scale, tq.zero_point, tq.qmin, tq.qmax)
    assert (qp.qmin, qp.qmax) == ((0, 255) if tq.dtype == np.uint8 else (-128, 127))
    for wq in stripped.constants.values():
        qp = wq.qparams()
        assert qp.axis == wq.axis and np.array_equal(qp.scale, wq.scale) and np.array_equal(qp.zero_point, wq.zero_point)
        assert qp.storage_dtype == wq.dtype


# --- models with nothing to strip, and QOperator models -----------------------------------------------------
def test_float_model_is_returned_as_is(float_cnn):
    stripped = strip_qdq(float_cnn, "float.onnx")
    assert stripped.format == "float" and stripped.model is float_cnn
    assert stripped.activations == {} and stripped.constants == {} and not is_quantized(float_cnn)


def test_qoperator_model_is_one_error_line_naming_ops_and_the_conversion(tmp_path, float_cnn):
    qop = _ort_quantize(tmp_path, float_cnn, fmt=QuantFormat.QOperator)
    assert is_quantized(qop)
    with pytest.raises(ModelError) as info:
        strip_qdq(qop, "cnn_qop.onnx")
    assert str(info.value) == (
        "cnn_qop.onnx: QOperator-format quantized model (QGemm x1, QLinearAdd x2, QLinearAveragePool x1, "
        "QLinearConcat x1, QLinearConv x3, QLinearGlobalAveragePool x1, QLinearMatMul x1, QLinearSoftmax x1) "
        "is not supported; tpusim reads QDQ models: re-quantize the float model with "
        "onnxruntime.quantization.quantize_static(..., quant_format=QuantFormat.QDQ)")


# --- hand-built QDQ graphs ------------------------------------------------------------------------------------
def _init(name, value, dtype=None):
    return numpy_helper.from_array(np.asarray(value, dtype=dtype), name)


def _graph_model(nodes, inits, inputs=(("x", TensorProto.FLOAT, [1, 2, 4, 4]),), outputs=(("y", TensorProto.FLOAT),),
                 opset=17) -> onnx.ModelProto:
    graph = helper.make_graph(
        list(nodes), "hand_qdq",
        [helper.make_tensor_value_info(n, t, shape) for n, t, shape in inputs],
        [helper.make_tensor_value_info(o[0], o[1], o[2] if len(o) > 2 else None) for o in outputs], list(inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 10
    inferred = {vi.name: vi for vi in onnx.shape_inference.infer_shapes(model).graph.output}
    for output in model.graph.output:
        if not output.type.tensor_type.HasField("shape") and inferred[output.name].type.tensor_type.HasField("shape"):
            output.type.CopyFrom(inferred[output.name].type)
    onnx.checker.check_model(model)
    return model


def _q(name, x, y, s="s", z="z", **attrs):
    return helper.make_node("QuantizeLinear", [x, s, z], [y], name=name, **attrs)


def _dq(name, x, y, s="s", z="z", **attrs):
    return helper.make_node("DequantizeLinear", [x, s, z], [y], name=name, **attrs)


S, Z = _init("s", 0.05, np.float32), _init("z", 128, np.uint8)
RNG = np.random.default_rng(11)
W_Q = RNG.integers(-127, 128, (3, 2, 3, 3)).astype(np.int8)
W_S = np.array([0.01, 0.02, 0.03], np.float32)


def _conv_weight_inits():
    return [_init("wq", W_Q), _init("ws", W_S), _init("wz", np.zeros(3, np.int8))]


def _weight_dq():
    return _dq("w_DQ", "wq", "w", "ws", "wz", axis=0)


def test_integer_input_and_integer_output(tmp_path):
    """uint8 in, uint8 out (a model that expects quantized input and ends with a Q): both become float."""
    nodes = [_dq("x_DQ", "x", "xf"), _weight_dq(), helper.make_node("Conv", ["xf", "w"], ["c"], name="conv"),
             _q("c_Q", "c", "y", "cs", "cz")]
    inits = [S, Z, *_conv_weight_inits(), _init("cs", 0.2, np.float32), _init("cz", 100, np.uint8)]
    model = _graph_model(nodes, inits, inputs=[("x", TensorProto.UINT8, [1, 2, 4, 4])], outputs=[("y", TensorProto.UINT8)])
    stripped = strip_qdq(model, "int_io.onnx")
    g = stripped.model.graph
    assert [(n.op_type, list(n.input), list(n.output)) for n in g.node] == [("Conv", ["x", "w"], ["y"])]
    assert g.input[0].type.tensor_type.elem_type == g.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert stripped.integer_io == {"x", "y"}
    assert (stripped.activations["x"].scale, stripped.activations["x"].zero_point) == (np.float32(0.05), 128)
    assert (stripped.activations["y"].scale, stripped.activations["y"].zero_point) == (np.float32(0.2), 100)
    onnx.checker.check_model(stripped.model, full_check=True)
    x_q = RNG.integers(0, 256, (1, 2, 4, 4)).astype(np.uint8)
    y_q = _run(model, x_q)[0]
    y = _run(stripped.model, _dequantize(x_q, np.float32(0.05), 128, None))[0]
    tq = stripped.activations["y"]
    assert np.array_equal(np.clip(np.rint(y / np.float32(tq.scale)) + tq.zero_point, 0, 255).astype(np.uint8), y_q)


def test_fake_quantized_weight_identity_constant_and_shared_q(tmp_path):
    """Q(float W) -> DQ per channel; an integer weight behind an Identity with a Constant scale; one Q, two DQs."""
    w_float = (RNG.standard_normal((3, 2, 3, 3)) * 0.3).astype(np.float32)
    nodes = [
        _q("x_Q", "x", "xq"), _dq("x_DQ_1", "xq", "xa"), _dq("x_DQ_2", "xq", "xb"),
        _q("wf_Q", "wf", "wfq", "ws", "wz", axis=0), _dq("wf_DQ", "wfq", "w1", "ws", "wz", axis=0),
        helper.make_node("Identity", ["wq"], ["wq_id"], name="wq_identity"),
        helper.make_node("Constant", [], ["ws_const"], name="ws_constant", value=_init("v", W_S)),
        _dq("w2_DQ", "wq_id", "w2", "ws_const", "wz", axis=0),
        helper.make_node("Conv", ["xa", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["xb", "w2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["c1", "c2"], ["y"], name="add"),
    ]
    inits = [S, Z, _init("wf", w_float), *_conv_weight_inits()]
    model = _graph_model(nodes, inits)
    stripped = strip_qdq(model, "fake.onnx")
    g = stripped.model.graph
    assert [n.op_type for n in g.node] == ["Conv", "Conv", "Add"]
    assert [list(n.input) for n in g.node[:2]] == [["x", "w1"], ["x", "w2"]]
    assert sorted(i.name for i in g.initializer) == ["w1", "w2"]
    assert set(stripped.activations) == {"x"} and set(stripped.constants) == {"w1", "w2"}
    assert np.array_equal(stripped.constants["w2"].values, W_Q) and stripped.constants["w2"].axis == 0
    # The integers of Q(W) are what ONNX Runtime's QuantizeLinear computes.
    q_model = _graph_model([_q("Q", "x", "y", "ws", "wz", axis=0)], [_init("ws", W_S), _init("wz", np.zeros(3, np.int8))],
                           inputs=[("x", TensorProto.FLOAT, [3, 2, 3, 3])], outputs=[("y", TensorProto.INT8)])
    assert np.array_equal(stripped.constants["w1"].values, _run(q_model, w_float)[0])
    x = RNG.standard_normal((1, 2, 4, 4)).astype(np.float32)
    requantized = _run(_requantize(stripped), x)[0]
    assert np.array_equal(requantized.view(np.uint32), _run(model, x)[0].view(np.uint32))


def test_float_reader_and_graph_outputs_that_keep_their_names():
    """A tensor read in float by one node and through Q/DQ by another; DQ outputs that are graph outputs."""
    nodes = [
        helper.make_node("Relu", ["x"], ["r"], name="relu"),
        _q("r_Q", "r", "rq"), _dq("r_DQ", "rq", "rdq"),
        helper.make_node("Sigmoid", ["r"], ["sig"], name="sigmoid"),     # reads r in float
        helper.make_node("Tanh", ["rdq"], ["t"], name="tanh"),
        _q("t_Q", "t", "tq"), _dq("t_DQ", "tq", "y"),                    # graph output y = DQ(Q(t))
        _dq("r_DQ_out", "rq", "r_out"),                                  # a second output of r's grid
        _q("x_Q", "x", "xq"), _dq("x_DQ", "xq", "x_out"),                # the graph input straight out
    ]
    model = _graph_model(nodes, [S, Z], outputs=[("y", TensorProto.FLOAT), ("sig", TensorProto.FLOAT),
                                                 ("r_out", TensorProto.FLOAT), ("x_out", TensorProto.FLOAT)])
    stripped = strip_qdq(model, "outputs.onnx")
    g = stripped.model.graph
    assert [(n.op_type, list(n.input), list(n.output)) for n in g.node] == [
        ("Relu", ["x"], ["r_out"]), ("Sigmoid", ["r_out"], ["sig"]), ("Tanh", ["r_out"], ["y"]),
        ("Identity", ["x"], ["x_out"])]
    assert [o.name for o in g.output] == ["y", "sig", "r_out", "x_out"]
    assert set(stripped.activations) == {"r_out", "y", "x", "x_out"}
    assert stripped.float_readers == {"r_out": ("sigmoid",), "x": ("relu",)}  # relu reads x before its Q
    onnx.checker.check_model(stripped.model, full_check=True)


def test_com_microsoft_qdq_ops_are_stripped_and_their_opset_dropped():
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"], name="x_Q", domain="com.microsoft"),
             helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"], name="x_DQ", domain="com.microsoft"),
             helper.make_node("Relu", ["xd"], ["y"], name="relu")]
    graph = helper.make_graph(nodes, "ms", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [S, Z])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    stripped = strip_qdq(model, "ms.onnx")
    assert [n.op_type for n in stripped.model.graph.node] == ["Relu"]
    assert [o.domain for o in stripped.model.opset_import] == [""]
    assert stripped.activations["x"].zero_point == 128


# --- errors: one line each, naming the file and the node ---------------------------------------------------------
def _relu_qdq(q_node, dq_node, inits, opset=17):
    nodes = [q_node, dq_node, helper.make_node("Relu", [dq_node.output[0]], ["y"], name="relu")]
    return _graph_model(nodes, inits, opset=opset, outputs=[("y", TensorProto.FLOAT, [1, 2, 4, 4])])


ERRORS = {
    "computed scale": (
        lambda: _graph_model([helper.make_node("Abs", ["s"], ["s_abs"], name="abs"), _q("x_Q", "x", "xq", "s_abs"),
                              _dq("x_DQ", "xq", "y")], [S, Z]),
        "m.onnx: node 'x_Q' (QuantizeLinear): scale 's_abs' is not a constant (initializer or Constant); "
        "tpusim needs static quantization parameters"),
    "two grids on one tensor": (
        lambda: _graph_model([_q("x_Q_1", "x", "xq1"), _dq("x_DQ_1", "xq1", "a"), _q("x_Q_2", "x", "xq2", "s2"),
                              _dq("x_DQ_2", "xq2", "b", "s2"), helper.make_node("Add", ["a", "b"], ["y"], name="add")],
                             [S, Z, _init("s2", 0.1, np.float32)]),
        "m.onnx: node 'x_Q_2' (QuantizeLinear): tensor 'x' is quantized with scale 0.1, zero point 128 "
        "(uint8) here but with scale 0.05, zero point 128 (uint8) by node 'x_Q_1'; "
        "tpusim keeps one grid per tensor"),
    "DQ params differ from its Q": (
        lambda: _relu_qdq(_q("x_Q", "x", "xq"), _dq("x_DQ", "xq", "xd", "s", "z2"), [S, Z, _init("z2", 127, np.uint8)]),
        "m.onnx: node 'x_DQ' (DequantizeLinear): its parameters (scale 0.05, zero point 127 (uint8)) "
        "differ from those of its QuantizeLinear 'x_Q' (scale 0.05, zero point 128 (uint8)); "
        "tpusim keeps one grid per tensor"),
    "int16 activation": (
        lambda: _relu_qdq(_q("x_Q", "x", "xq", "s", "z16"), _dq("x_DQ", "xq", "xd", "s", "z16"),
                          [S, _init("z16", 0, np.int16)], opset=21),
        "m.onnx: node 'x_Q' (QuantizeLinear): int16 quantization is not supported; tpusim runs int8/uint8 "
        "tensors (int32 only for constants such as biases)"),
    "int4 weight": (
        lambda: _graph_model([_dq("w_DQ", "w4", "w", "ws", "wz4", axis=0),
                              helper.make_node("Conv", ["x", "w"], ["y"], name="conv")],
                             [helper.make_tensor("w4", TensorProto.INT4, [3, 2, 1, 1], [1, -2, 3, -4, 5, -6]),
                              _init("ws", W_S), helper.make_tensor("wz4", TensorProto.INT4, [3], [0, 0, 0])], opset=21),
        "m.onnx: node 'w_DQ' (DequantizeLinear): int4 constant 'w4' is not supported; tpusim runs int8/uint8 "
        "tensors (int32 only for constants such as biases)"),
    "block quantization": (
        lambda: _graph_model([_dq("w_DQ", "wq", "w", "ws", "wz", axis=1, block_size=2),
                              helper.make_node("Conv", ["x", "w"], ["y"], name="conv")],
                             [_init("wq", np.zeros((3, 2, 1, 1), np.int8)), _init("ws", np.ones((3, 1, 1, 1), np.float32)),
                              _init("wz", np.zeros((3, 1, 1, 1), np.int8))], opset=21),
        "m.onnx: node 'w_DQ' (DequantizeLinear): block quantization (block_size=2) is not supported; "
        "only per-tensor or per-channel (axis) parameters"),
    "per-channel activation": (
        lambda: _relu_qdq(_q("x_Q", "x", "xq", "s2", "z2", axis=1), _dq("x_DQ", "xq", "xd", "s2", "z2", axis=1),
                          [_init("s2", [0.1, 0.2], np.float32), _init("z2", [0, 0], np.uint8)]),
        "m.onnx: node 'x_Q' (QuantizeLinear): per-channel quantization (axis 1) of activation 'x' is not "
        "supported; an activation needs one scale and zero point"),
    "integer op between Q and DQ": (
        lambda: _graph_model([_q("x_Q", "x", "xq"),
                              helper.make_node("MaxPool", ["xq"], ["pq"], name="pool", kernel_shape=[2, 2]),
                              _dq("p_DQ", "pq", "y")], [S, Z]),
        "m.onnx: node 'pool' (MaxPool): input 'xq' is the integer output of QuantizeLinear 'x_Q'; "
        "in a QDQ model only DequantizeLinear reads it"),
    "integer input read in integers": (
        lambda: _graph_model([_dq("x_DQ", "x", "xd"),
                              helper.make_node("Cast", ["x"], ["xc"], name="cast", to=TensorProto.FLOAT),
                              helper.make_node("Add", ["xd", "xc"], ["y"], name="add")], [S, Z],
                             inputs=[("x", TensorProto.UINT8, [1, 2, 4, 4])]),
        "m.onnx: node 'cast' (Cast): input 'x' is the integer graph input; "
        "in a QDQ model only DequantizeLinear reads it"),
    "float16 scale": (
        lambda: _relu_qdq(_q("x_Q", "x", "xq", "s16"), _dq("x_DQ", "xq", "xd", "s16"), [_init("s16", 0.1, np.float16), Z],
                          opset=21),
        "m.onnx: node 'x_Q' (QuantizeLinear): scale 's16' is float16; only float32 scales are supported"),
    "zero scale": (
        lambda: _relu_qdq(_q("x_Q", "x", "xq", "s0"), _dq("x_DQ", "xq", "xd", "s0"), [_init("s0", 0.0, np.float32), Z]),
        "m.onnx: node 'x_Q' (QuantizeLinear): scales must be finite and positive, got [0.0]"),
}


@pytest.mark.parametrize("case", sorted(ERRORS))
def test_error_is_one_exact_line(case):
    build, message = ERRORS[case]
    with pytest.raises(ModelError) as info:
        strip_qdq(build(), "m.onnx")
    assert str(info.value) == message
