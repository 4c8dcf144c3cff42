import dataclasses

import numpy as np
import pytest

from tpusim.config import load_config
from tpusim.frontend import lower_model
from tpusim.quant.calibrate import collect_statistics, synthetic_inputs
from tpusim.quant.fidelity import fidelity, output_agreement
from tpusim.quant.quantize import quantize_graph
from tpusim.workloads import build_model

QUANT = load_config("configs/tpu_v1.yaml").quant


def test_output_agreement_exact_values():
    reference = np.array([[0.0, 1.0, 2.0, 3.0, 4.0, 5.0], [5.0, 4.0, 3.0, 2.0, 1.0, 0.0]])
    approx = np.array([[0.0, 1.0, 2.0, 3.0, 4.0, 5.5], [0.0, 4.0, 3.0, 2.0, 1.0, 6.0]])
    top1, top5, cosine, max_err = output_agreement(reference, approx)
    assert (top1, top5, max_err) == (0.5, 0.5, 6.0)
    r, a = reference[0], approx[0]
    first = r @ a / (np.linalg.norm(r) * np.linalg.norm(a))
    second = reference[1] @ approx[1] / (np.linalg.norm(reference[1]) * np.linalg.norm(approx[1]))
    assert cosine == pytest.approx((first + second) / 2)


def test_tiny_cnn_report():
    model = build_model("tiny_cnn")
    graph = lower_model(model, "tiny_cnn")
    data = synthetic_inputs(graph.input_shape[1:], 3, seed=0)
    qgraph = quantize_graph(graph, collect_statistics(model, graph, data, 2048), QUANT)
    report = fidelity(graph, qgraph, data.inputs[:2])
    assert set(report.layer_sqnr_db) == {layer.name for layer in graph.layers}
    assert all(20.0 < v < 60.0 for v in report.layer_sqnr_db.values())
    assert report.samples == report.agreement_rows == 2 and report.top1_agreement == 1.0
    assert report.top5_agreement == 1.0 and report.cosine_similarity > 0.999 and report.max_abs_error < 0.05


def test_per_channel_beats_per_tensor_on_mobilenet_v2_depthwise_layers():
    model = build_model("mobilenet_v2")
    graph = lower_model(model, "mobilenet_v2")
    data = synthetic_inputs(graph.input_shape[1:], 2, seed=0)
    stats = collect_statistics(model, graph, data, 2048)
    depthwise = [layer.name for layer in graph.layers if layer.op == "conv" and layer.conv.groups > 1]
    sqnr = {}
    for weights in ("per-tensor", "per-channel"):
        qgraph = quantize_graph(graph, stats, dataclasses.replace(QUANT, weights=weights))
        sqnr[weights] = fidelity(graph, qgraph, data.inputs[:1]).layer_sqnr_db
    better = [name for name in depthwise if sqnr["per-channel"][name] > sqnr["per-tensor"][name]]
    assert len(depthwise) == 17 and len(better) == len(depthwise)
    assert np.mean([sqnr["per-channel"][n] - sqnr["per-tensor"][n] for n in depthwise]) > 3.0


def test_agreement_is_counted_over_output_rows_one_per_position():
    # a model with an output per token agrees or not per token: 2 samples x 3 positions are 6 rows
    from onnx_graphs import GraphBuilder

    b = GraphBuilder((1, 3, 8))
    model = b.model(b.node("MatMul", ["input", b.weight((8, 4))]))
    graph = lower_model(model, "tokens")
    data = synthetic_inputs(graph.input_shape[1:], 4, seed=0)
    qgraph = quantize_graph(graph, collect_statistics(model, graph, data, 2048), QUANT)
    report = fidelity(graph, qgraph, data.inputs[:2])
    assert (report.samples, report.agreement_rows) == (2, 6)
