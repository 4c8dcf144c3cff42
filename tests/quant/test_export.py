"""Our integer execution against ONNX Runtime running (a) our QDQ export and (b) its own quantize_static.

Where they may differ, and why: ONNX Runtime requantizes accumulators in float32 (multiplier
float32(s_x * s_w / s_y), round half to even); we use a 31-bit dyadic multiplier and round half away
from zero. So a conv/gemm/add output can differ by one LSB when the exact value lies within float32
precision of a rounding boundary (a few elements per million). AveragePool keeps its input's scale,
so its rescale is 1/count, and the exact value is often a tie (sum/count = k + 1/2 at windows of 4 or
6 elements): half-to-even vs half-away for 1/4, and for 1/6 the float32 and the dyadic approximations
of 1/6 put the product on opposite sides of the tie.
ORT's QLinearSoftmax uses an exp table, ours float32. Symmetric int8 outputs saturate at -128 in ORT's
QuantizeLinear and at -127 on our restricted grid. Differences cascade through later layers, so
each layer is also compared on identical (ORT's) integer inputs.
"""
import dataclasses

import numpy as np
import onnxruntime as ort
from onnx import numpy_helper
import pytest
from onnx_graphs import ADD_TIE_BAND, ORT_INT8_GEMM_SATURATES, SATURATES_HERE, assert_add_differences_are_near_ties

from tpusim import tensor_ops
from tpusim.config import load_config
from tpusim.frontend import lower_model, run_reference
from tpusim.quant.calibrate import collect_statistics, synthetic_inputs
from tpusim.quant.execute import run_integer, run_layer
from tpusim.quant.export import (export_fp32, export_qdq, ort_quantize_static, ort_quantized_outputs,
                                 quantized_name, with_outputs)
from tpusim.quant.quantize import quantize_graph
from tpusim.workloads import build_model

QUANT = load_config("configs/tpu_v1.yaml").quant
COMBOS = [(a, w) for a in ("asymmetric-uint8", "symmetric-int8") for w in ("per-tensor", "per-channel")]


def session(model):
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def calibrated(name, samples):
    model = build_model(name)
    graph = lower_model(model, name)
    data = synthetic_inputs(graph.input_shape[1:], samples, seed=0)
    return graph, collect_statistics(model, graph, data, 2048), data


@pytest.fixture(scope="module")
def tiny():
    return calibrated("tiny_cnn", 3)


@pytest.fixture(scope="module")
def mobilenet():
    return calibrated("mobilenet_v2", 2)


def tensors_of(graph):
    return [graph.input_name] + [layer.output for layer in graph.layers]


def ort_static_tensors(qgraph, data, x):
    model = ort_quantize_static(qgraph, data.inputs)
    names = ort_quantized_outputs(model, tensors_of(qgraph.graph))
    assert set(names) == set(tensors_of(qgraph.graph))
    exposed = with_outputs(model, list(names.values()))
    results = dict(zip([o.name for o in exposed.graph.output], session(exposed).run(None, {qgraph.graph.input_name: x})))
    return model, {t: results[n] for t, n in names.items()}


def isolated_differences(qgraph, ort_tensors):
    """Per op: (elements, elements 1 LSB apart, elements further apart), each layer run on ORT's inputs."""
    by_op = {}
    for ql in qgraph.layers:
        ours, _ = run_layer(ql, [ort_tensors[name] for name in ql.layer.inputs])
        theirs = ort_tensors[ql.layer.output]
        assert ours.dtype == theirs.dtype, ql.name
        diff = np.abs(ours.astype(np.int64) - theirs.astype(np.int64))
        diff[(ours.astype(np.int64) == -127) & (theirs.astype(np.int64) == -128)] = 0  # grid edge, see above
        total, one, more = by_op.get(ql.layer.op, (0, 0, 0))
        by_op[ql.layer.op] = (total + diff.size, one + int(np.sum(diff == 1)), more + int(np.sum(diff > 1)))
        if ql.layer.op == "avgpool":
            assert_avgpool_differences_are_ties(ql, ort_tensors[ql.layer.inputs[0]], ours, theirs)
        if ql.layer.op == "add":
            assert_add_differences_are_near_ties(ql, [ort_tensors[n] for n in ql.layer.inputs], ours, theirs)
        if ql.layer.op in ("conv", "gemm"):
            assert_matrix_differences_are_near_ties(ql, ort_tensors[ql.layer.inputs[0]], ours, theirs)
    return by_op


def assert_matrix_differences_are_near_ties(ql, x, ours, theirs):
    """Where a conv/gemm output differs, its exact value s_x s_w acc / s_y + z_y (acc from the int8 operands in
    float64, exact below 2**53) lies within ADD_TIE_BAND plus one accumulator unit (ORT rounds the bias
    itself, and may round it the other way) of a rounding boundary."""
    differ = (ours != theirs) & ~((ours.astype(np.int64) == -127) & (theirs.astype(np.int64) == -128))
    if not differ.any():
        return
    layer, x_qp, y_qp = ql.layer, ql.input_qparams[0], ql.output_qparams
    centred = x.astype(np.float64) - int(x_qp.zero_point)
    weight = ql.weight_q.astype(np.float64)
    if layer.op == "conv":
        acc = tensor_ops.conv2d(centred, weight, ql.bias_q.astype(np.float64), layer.conv)
        channel_axis = 1
    else:
        acc = centred.reshape(len(centred), -1) @ weight.T + ql.bias_q.astype(np.float64)
        channel_axis = acc.ndim - 1
    w_scale = np.asarray(ql.weight_qparams.scale, np.float64).reshape(-1)
    shape = [1] * acc.ndim
    shape[channel_axis] = -1
    unit = np.broadcast_to(float(x_qp.scale) * w_scale.reshape(shape) / float(y_qp.scale), acc.shape)
    exact = acc * unit + int(y_qp.zero_point)
    distance_to_boundary = np.abs(exact[differ] - np.floor(exact[differ]) - 0.5)
    assert np.all(distance_to_boundary < ADD_TIE_BAND + unit[differ]), (ql.name, float(distance_to_boundary.max()))


def assert_avgpool_differences_are_ties(ql, x, ours, theirs):
    z = int(ql.input_qparams[0].zero_point)
    pool = ql.layer.pool
    for b, c, oh, ow in zip(*np.nonzero(ours != theirs)):
        top, left = oh * pool.strides[0] - pool.pads[0], ow * pool.strides[1] - pool.pads[1]
        window = x[b, c, max(top, 0) : top + pool.kernel[0], max(left, 0) : left + pool.kernel[1]].astype(np.int64) - z
        total, count = int(window.sum()), window.size
        assert (2 * total) % count == 0 and total % count != 0  # exactly k + 1/2
        assert {int(ours[b, c, oh, ow]) - z, int(theirs[b, c, oh, ow]) - z} == {total // count, total // count + 1}


def assert_few_one_lsb(by_op, fraction):
    for op, (total, one, more) in by_op.items():
        assert more == 0, op
        if op not in ("avgpool", "softmax", "add"):  # their differences are each proven to be (near-)ties
            assert one <= fraction * total, (op, one, total)


@pytest.mark.parametrize("acts,weights", COMBOS)
def test_tiny_cnn_matches_onnxruntime(tiny, acts, weights):
    if ORT_INT8_GEMM_SATURATES and acts == "asymmetric-uint8":
        pytest.skip(SATURATES_HERE)
    graph, stats, data = tiny
    qgraph = quantize_graph(graph, stats, dataclasses.replace(QUANT, activations=acts, weights=weights))
    x = np.asarray(synthetic_inputs(graph.input_shape[1:], 1, seed=7).inputs)
    qdq = export_qdq(qgraph, graph, expose=tensors_of(graph))
    results = dict(zip([o.name for o in qdq.graph.output], session(qdq).run(None, {graph.input_name: x})))
    ort_model, ort_static = ort_static_tensors(qgraph, data, x)
    for t in tensors_of(graph):
        np.testing.assert_array_equal(results[quantized_name(t)], ort_static[t], err_msg=t)  # both exports agree
    by_op = isolated_differences(qgraph, ort_static)
    assert_few_one_lsb(by_op, fraction=1e-3)
    assert by_op["avgpool"][1] <= 0.1 * by_op["avgpool"][0]

    # ORT quantized the FP32 export's weights itself: same int8 values; biases within one accumulator LSB.
    initializers = {i.name: i for i in ort_model.graph.initializer}
    for ql in qgraph.layers:
        if ql.layer.is_matrix:
            np.testing.assert_array_equal(numpy_helper.to_array(initializers[f"{ql.name}_W_quantized"]), ql.weight_q)
            bias = numpy_helper.to_array(initializers[f"{ql.name}_B_quantized"]).astype(np.int64)
            assert np.abs(bias - ql.bias_q).max() <= 1


def test_fp32_export_runs_like_the_reference(tiny):
    graph, _, data = tiny
    (out,) = session(export_fp32(graph)).run(None, {graph.input_name: data.inputs[:1]})
    np.testing.assert_allclose(out, run_reference(graph, data.inputs[:1])[graph.outputs[0]], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("acts,weights", [("asymmetric-uint8", "per-channel"), ("symmetric-int8", "per-tensor")])
def test_mobilenet_v2_layers_match_onnxruntime_quantize_static(mobilenet, acts, weights):
    if ORT_INT8_GEMM_SATURATES and acts == "asymmetric-uint8":
        pytest.skip(SATURATES_HERE)
    graph, stats, data = mobilenet
    qgraph = quantize_graph(graph, stats, dataclasses.replace(QUANT, activations=acts, weights=weights))
    x = np.asarray(synthetic_inputs(graph.input_shape[1:], 1, seed=7).inputs)
    _, ort_static = ort_static_tensors(qgraph, data, x)
    ours = run_integer(qgraph, x, keep_all=True).tensors[graph.input_name].astype(np.int64)
    theirs = ort_static[graph.input_name].astype(np.int64)
    differ = ours != theirs  # only where ORT's int8 QuantizeLinear saturates at -128 and our grid at -127
    assert np.all(ours[differ] == -127) and np.all(theirs[differ] == -128)
    by_op = isolated_differences(qgraph, ort_static)
    assert_few_one_lsb(by_op, fraction=2e-5)
