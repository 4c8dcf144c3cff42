import dataclasses

import numpy as np
import pytest

from tpusim.config import load_config
from tpusim.frontend import lower_model
from tpusim.quant.arithmetic import QParams
from tpusim.quant.calibrate import FloatModel, collect_statistics, synthetic_inputs
from tpusim.quant.fidelity import fidelity, output_agreement, signal_and_noise, signal_and_noise_reference
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


@pytest.mark.parametrize("dtype", [np.int8, np.uint8, np.int16, np.int32])
def test_signal_and_noise_is_exact_on_values_whose_sums_are_exact(dtype):
    # quarters times small integers: every product and sum is exact in float64, whatever the order
    rng = np.random.default_rng(0)
    q = rng.integers(0 if dtype == np.uint8 else -100, 100, size=(2, 3, 5), dtype=dtype)
    reference = (rng.integers(-400, 400, size=q.shape) / 8).astype(np.float32)
    for qp in (QParams(np.array(0.25), np.array(3), -128, 255),
               QParams(np.array([0.25, 0.5, 2.0]), np.array([0, 1, -2]), -128, 255, axis=1),
               QParams(np.array([0.25, 0.5, 1.0, 2.0, 4.0]), np.array([0, 1, 2, 3, 4]), -128, 255, axis=-1)):
        assert signal_and_noise(reference, q, qp) == signal_and_noise_reference(reference, q, qp)


def test_signal_and_noise_agrees_with_its_oracle_on_random_floats():
    rng = np.random.default_rng(1)
    q = rng.integers(-128, 128, size=(4, 8, 3, 3), dtype=np.int8)
    reference = rng.standard_normal(q.shape).astype(np.float32)
    qp = QParams(np.float32(rng.uniform(0.01, 0.1, 8)).astype(np.float64), np.zeros(8, np.int32), -128, 127, axis=1)
    assert signal_and_noise(reference, q, qp) == pytest.approx(signal_and_noise_reference(reference, q, qp), rel=1e-12)
    with pytest.raises(ValueError, match="shape"):
        signal_and_noise(reference[:2], q, qp)


def _tiny_cnn_in_onnxruntime():
    """(graph, its quantized graph, 3 synthetic samples, the FP32 model in ONNX Runtime that calibrated it)."""
    model = build_model("tiny_cnn")
    graph = lower_model(model, "tiny_cnn")
    data = synthetic_inputs(graph.input_shape[1:], 3, seed=0)
    float_model = FloatModel(model, graph)
    qgraph = quantize_graph(graph, collect_statistics(model, graph, data, 2048, float_model=float_model), QUANT)
    return graph, qgraph, data, float_model


def test_fidelity_measures_against_the_reference_it_is_given():
    graph, qgraph, data, float_model = _tiny_cnn_in_onnxruntime()
    ours, theirs = fidelity(graph, qgraph, data.inputs[:2]), fidelity(graph, qgraph, data.inputs[:2],
                                                                       reference=float_model.reference)
    assert theirs.layer_sqnr_db.keys() == ours.layer_sqnr_db.keys()
    assert all(theirs.layer_sqnr_db[n] == pytest.approx(ours.layer_sqnr_db[n], abs=1e-3) for n in ours.layer_sqnr_db)
    shifted = fidelity(graph, qgraph, data.inputs[:2],
                       reference=lambda x: {k: v + np.float32(1.0) for k, v in float_model.reference(x).items()})
    assert all(shifted.layer_sqnr_db[n] < ours.layer_sqnr_db[n] - 3.0 for n in ours.layer_sqnr_db)


def test_fidelity_lets_go_of_a_batchs_tensors_before_the_next_batch_is_computed():
    # ONNX Runtime gives a run's tensors memory of its own: held across the next run, that run takes and faults in more
    import weakref

    graph, qgraph, data, float_model = _tiny_cnn_in_onnxruntime()
    final = graph.outputs[-1]
    earlier: list[weakref.ref] = []
    alive_at_each_call = []

    def reference(x):
        alive_at_each_call.append(sum(tensor() is not None for tensor in earlier))
        tensors = float_model.reference(x)
        earlier.extend(weakref.ref(t) for name, t in tensors.items() if name not in (final, graph.input_name))
        return tensors

    fidelity(graph, qgraph, data.inputs[:3], reference=reference)
    assert alive_at_each_call == [0, 0, 0] and len(earlier) == 3 * (len({layer.output for layer in graph.layers}) - 1)
