import dataclasses

import numpy as np
import pytest

from tpusim.config import load_config
from tpusim.frontend import lower_model
from tpusim.quant.calibrate import collect_statistics, synthetic_inputs
from tpusim.quant.execute import run_integer, run_layer
from tpusim.quant.fixed_point import requantize_reference
from tpusim.ops.add import ADD_LEFT_SHIFT
from tpusim.quant.quantize import quantize_graph
from tpusim.workloads import build_model

QUANT = load_config("configs/tpu_v1.yaml").quant
COMBOS = [(a, w) for a in ("asymmetric-uint8", "symmetric-int8") for w in ("per-tensor", "per-channel")]


@pytest.fixture(scope="module")
def tiny():
    model = build_model("tiny_cnn")
    graph = lower_model(model, "tiny_cnn")
    data = synthetic_inputs(graph.input_shape[1:], 3, seed=0)
    return graph, collect_statistics(model, graph, data, 2048), data


def qgraph_of(tiny, acts, weights):
    graph, stats, _ = tiny
    return quantize_graph(graph, stats, dataclasses.replace(QUANT, activations=acts, weights=weights))


def naive_conv_acc(x, ql):
    """int64 sum over (c, i, j) of (x - z_x) * W_q + bias_q, padding with real zero, by explicit windows."""
    conv = ql.layer.conv
    z = int(ql.input_qparams[0].zero_point)
    xc = np.pad(x.astype(np.int64) - z, ((0, 0), (0, 0), (conv.pads[0], conv.pads[2]), (conv.pads[1], conv.pads[3])))
    w = ql.weight_q.astype(np.int64)
    n_out, c_g, kh, kw = w.shape
    b, _, h_out, w_out = ql.layer.output_shape
    (sh, sw), (dh, dw) = conv.strides, conv.dilations
    out = np.zeros((b, n_out, h_out, w_out), np.int64)
    for n in range(n_out):
        g = n // (n_out // conv.groups)
        for i in range(kh):
            for j in range(kw):
                patch = xc[:, g * c_g : (g + 1) * c_g, i * dh : i * dh + sh * (h_out - 1) + 1 : sh,
                           j * dw : j * dw + sw * (w_out - 1) + 1 : sw]
                out[:, n] += np.einsum("bchw,c->bhw", patch, w[n, :, i, j])
    return out + ql.bias_q.astype(np.int64).reshape(1, -1, 1, 1)


def oracle(ql, inputs):
    """Naive numpy model of the same integer arithmetic, layer by layer."""
    op = ql.layer.op
    zp = int(ql.output_qparams.zero_point)
    r = ql.requant
    if op == "conv":
        acc = naive_conv_acc(inputs[0], ql)
        return requantize_reference(acc.astype(np.int32), r.m0, r.shift, zp, ql.out_qmin, ql.out_qmax, 1)
    if op == "gemm":
        z = int(ql.input_qparams[0].zero_point)
        acc = (inputs[0].astype(np.int64) - z) @ ql.weight_q.astype(np.int64).T + ql.bias_q
        return requantize_reference(acc.astype(np.int32), r.m0, r.shift, zp, ql.out_qmin, ql.out_qmax, -1)
    if op == "add":
        total = 0
        for q, qp, rescale in zip(inputs, ql.input_qparams, ql.input_rescales):
            shifted = ((q.astype(np.int64) - int(qp.zero_point)) * 2**ADD_LEFT_SHIFT).astype(np.int32)
            total = total + requantize_reference(shifted, rescale.m0, rescale.shift, 0, -(2**31), 2**31 - 1).astype(np.int64)
        return requantize_reference(total.astype(np.int32), r.m0, r.shift, zp, ql.out_qmin, ql.out_qmax)
    if op == "global_avgpool":
        sums = (inputs[0].astype(np.int64) - int(ql.input_qparams[0].zero_point)).sum(axis=(2, 3), keepdims=True)
        return requantize_reference(sums.astype(np.int32), r.m0, r.shift, zp, ql.out_qmin, ql.out_qmax, 1)
    if op == "avgpool":
        pool = ql.layer.pool
        x = inputs[0].astype(np.int64) - int(ql.input_qparams[0].zero_point)
        b, c, h, w = x.shape
        out = np.empty(ql.layer.output_shape, inputs[0].dtype)
        for oh in range(out.shape[2]):
            for ow in range(out.shape[3]):
                top, left = oh * pool.strides[0] - pool.pads[0], ow * pool.strides[1] - pool.pads[1]
                window = x[:, :, max(top, 0) : top + pool.kernel[0], max(left, 0) : left + pool.kernel[1]]
                count = window.shape[2] * window.shape[3]
                out[:, :, oh, ow] = requantize_reference(window.sum(axis=(2, 3)).astype(np.int32), r.m0[count],
                                                         r.shift[count], zp, ql.out_qmin, ql.out_qmax)
        return out
    if op == "maxpool":
        return None  # max of integers: covered by the end-to-end ORT comparison
    return None


@pytest.mark.parametrize("acts,weights", COMBOS)
def test_integer_layers_equal_a_naive_oracle(tiny, acts, weights):
    qgraph = qgraph_of(tiny, acts, weights)
    run = run_integer(qgraph, tiny[2].inputs[:1], keep_all=True)
    checked = set()
    for ql in qgraph.layers:
        inputs = [run.tensors[name] for name in ql.layer.inputs]
        expected = oracle(ql, inputs)
        if expected is None:
            continue
        np.testing.assert_array_equal(run.tensors[ql.layer.output], expected, err_msg=ql.name)
        assert run.tensors[ql.layer.output].dtype == ql.output_qparams.storage_dtype
        checked.add(ql.layer.op)
    assert checked == {"conv", "gemm", "add", "avgpool", "global_avgpool"}


def test_conv_padding_holds_the_zero_point(tiny):
    qgraph = qgraph_of(tiny, "asymmetric-uint8", "per-channel")
    stem = qgraph.layer("stem.conv")
    z_x = int(stem.input_qparams[0].zero_point)
    assert z_x != 0
    # A real-zero input quantizes to z_x everywhere; with padding = z_x every output, borders
    # included, is the requantized bias alone.
    x = np.full(stem.layer.input_shapes[0], z_x, np.uint8)
    y, _ = run_layer(stem, [x])
    r = stem.requant
    expected = requantize_reference(stem.bias_q.reshape(1, -1, 1, 1).astype(np.int32), r.m0, r.shift,
                                    int(stem.output_qparams.zero_point), stem.out_qmin, stem.out_qmax, 1)
    np.testing.assert_array_equal(y, np.broadcast_to(expected, y.shape))


@pytest.mark.parametrize("acc_bits", [32, 16])
def test_engines_agree_and_wraparounds_are_counted(tiny, acc_bits):
    qgraph = qgraph_of(tiny, "asymmetric-uint8", "per-channel")
    x = tiny[2].inputs[:1]
    fast = run_integer(qgraph, x, keep_all=True, acc_bits=acc_bits, engine="exact-blas")
    kernel = run_integer(qgraph, x, keep_all=True, acc_bits=acc_bits, engine="int8-gemm")
    assert fast.wrapped == kernel.wrapped
    for name, q in fast.tensors.items():
        np.testing.assert_array_equal(q, kernel.tensors[name], err_msg=name)
    half = 2 ** (acc_bits - 1)
    for ql in qgraph.layers:
        if ql.layer.op != "conv":
            continue
        # sum (x - z) w + b == sum x w + acc_bias: exactly what the accumulators hold.
        exact = naive_conv_acc(fast.tensors[ql.layer.inputs[0]], ql)
        assert fast.wrapped[ql.name] == int(np.count_nonzero((exact < -half) | (exact >= half))), ql.name
    assert (sum(fast.wrapped.values()) > 0) == (acc_bits < 32)


def test_progress_is_reported_per_layer(tiny):
    qgraph = qgraph_of(tiny, "asymmetric-uint8", "per-tensor")
    calls = []
    run = run_integer(qgraph, tiny[2].inputs[:1], progress=lambda done, total, name: calls.append((done, total, name)))
    assert calls == [(i + 1, len(qgraph.layers), ql.name) for i, ql in enumerate(qgraph.layers)]
    assert set(run.tensors) == set(qgraph.graph.outputs)
    assert run.outputs[qgraph.graph.outputs[0]].dtype == np.uint8
