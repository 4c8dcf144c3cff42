"""The built-in workloads through the front end: counts, BN folding, and agreement with ONNX Runtime."""
from __future__ import annotations

import numpy as np
import pytest
from onnx_graphs import run_onnxruntime

from tpusim import workloads
from tpusim.frontend import lower_model, run_reference


FLOAT_INPUT = [name for name, w in workloads.WORKLOADS.items() if w.input_dtype == "float32"]  # BERTs: test_bert.py


@pytest.fixture(scope="module")
def built(generated_workload):
    return {name: generated_workload(name).model for name in FLOAT_INPUT}


@pytest.mark.parametrize("name", FLOAT_INPUT)
def test_lowered_graph_matches_onnxruntime(built, name):
    model = built[name]
    graph = lower_model(model, f"{name}.onnx", batch=1)
    x = np.random.default_rng(3).standard_normal(graph.input_shape).astype(np.float32)
    (want,) = run_onnxruntime(model, x)
    got = run_reference(graph, x)[graph.outputs[0]]
    span = float(want.max() - want.min())
    assert span > 0
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * span)


def test_resnet50_counts_after_lowering(built):
    graph = lower_model(built["resnet50"], "resnet50.onnx", batch=1)
    assert graph.macs == 4_089_184_256
    assert len(graph.matrix_layers) == 54
    assert not any(layer.op == "activation" for layer in graph.layers)  # every Relu fused
    assert lower_model(built["resnet50"], "resnet50.onnx", batch=4).macs == 4 * 4_089_184_256


def test_mobilenet_v2_depthwise_and_relu6(built):
    graph = lower_model(built["mobilenet_v2"], "mobilenet_v2.onnx")
    depthwise = [l for l in graph.layers if l.op == "conv" and l.conv.groups > 1]
    assert len(depthwise) == 17 and all(l.gemm.n == 1 for l in depthwise)
    assert sum(l.activation.label == "relu6" for l in graph.layers) == 35
