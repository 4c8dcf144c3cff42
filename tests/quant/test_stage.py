"""The quantization stage's choice of FP32 reference: ONNX Runtime's run of the model that calibrated
wherever it computes the graph's own tensors, tpusim's numpy evaluator elsewhere."""
from __future__ import annotations

import dataclasses

import numpy as np
from onnx_graphs import GraphBuilder

from tpusim.config import load_config
from tpusim.frontend import lower_model
from tpusim.quant.calibrate import synthetic_inputs
from tpusim.quant.stage import calibrate_and_quantize, fp32_reference
from tpusim.workloads import build_model

CONFIG = load_config("configs/tpu_v1.yaml")


def _quantized(model, name):
    graph = lower_model(model, name, batch=1)
    return calibrate_and_quantize(graph, model, dataclasses.replace(CONFIG, quant=dataclasses.replace(
        CONFIG.quant, calibration_samples=4)), None), np.asarray(synthetic_inputs(graph.input_shape[1:], 1, 9).inputs)


def test_onnx_runtime_is_the_reference_where_it_computes_the_graphs_tensors(monkeypatch):
    quantized, x = _quantized(build_model("tiny_cnn"), "tiny_cnn")
    other = x[..., ::-1].copy()
    expected = {batch.tobytes(): quantized.float_model.reference(batch) for batch in (x, other)}
    reference = fp32_reference(quantized, x)
    runs = []
    monkeypatch.setattr(quantized.float_model, "run", lambda batch: runs.append(batch) or {})
    first = reference(x)  # the checked batch: its tensors from the check, not from another run
    assert runs == [] and first.keys() == expected[x.tobytes()].keys()
    assert all(np.array_equal(first[name], values) for name, values in expected[x.tobytes()].items())
    reference(other)
    reference(x)  # handed over once: asked again, it is run
    assert [batch.tobytes() for batch in runs] == [other.tobytes(), x.tobytes()]


def test_a_tensor_kept_in_another_layout_leaves_the_reference_to_our_evaluator():
    # torch's batch-first LSTM: the lowering drops the Transposes around the time-major ONNX LSTM, so the
    # LSTM's Y keeps its ONNX name in the batch-first layout (1, 12, 1, 32), not ONNX Runtime's (12, 1, 1, 32)
    g = GraphBuilder((1, 12, 16))
    w = lambda *shape: g.const((g.rng.uniform(-0.18, 0.18, shape)).astype(np.float32), "w")  # noqa: E731
    y = g.node("LSTM", [g.node("Transpose", [g.input_name], perm=[1, 0, 2]), w(1, 128, 16), w(1, 128, 32), w(1, 256)],
               hidden_size=32)
    model = g.model(g.node("Transpose", [g.node("Squeeze", [y, g.const(np.array([1], np.int64))])], perm=[1, 0, 2]))
    quantized, x = _quantized(model, "lstm")
    assert quantized.float_model.covers_graph and fp32_reference(quantized, x) is None


def test_a_reference_of_the_same_shapes_but_other_values_is_not_taken():
    quantized, x = _quantized(build_model("tiny_cnn"), "tiny_cnn")

    class Reversed:
        covers_graph, fixed_batch = True, None

        def reference(self, batch):
            return {k: v[..., ::-1] for k, v in quantized.float_model.reference(batch).items()}

    assert fp32_reference(dataclasses.replace(quantized, float_model=Reversed()), x) is None
