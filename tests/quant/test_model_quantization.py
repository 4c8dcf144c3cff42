"""A model already quantized by ONNX Runtime runs with its own grids, integer weights and biases.

The QDQ files are ONNX Runtime's own ``quantize_static`` output (after its ``quant_pre_process``, which
folds BatchNormalization as ORT recommends). Our integers are compared with ORT's execution of the
same file layer by layer, each layer run on ORT's integer inputs (``op_checks.assert_layers_match``).
"""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process

from tpusim.config import load_config
from tpusim.errors import ModelError
from tpusim.frontend import load_onnx
from tpusim.quant.execute import run_integer, run_layer
from tpusim.quant.quantize import quantize_from_model
from tpusim.workloads import build_model, save_model

from op_checks import assert_layers_match, ort_qdq_integers

QUANT = load_config("configs/tpu_v1.yaml").quant


class _Reader(CalibrationDataReader):
    def __init__(self, name, shape, samples=4):
        self._batches = iter([{name: np.random.default_rng(i).standard_normal(shape).astype(np.float32)}
                              for i in range(samples)])

    def get_next(self):
        return next(self._batches, None)


def ort_qdq(tmp_path, workload, per_channel, activation_type, symmetric=False, preprocess=True):
    model = build_model(workload)
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
    source = tmp_path / "fp32.onnx"
    save_model(model, source)
    if preprocess:
        quant_pre_process(str(source), str(tmp_path / "pre.onnx"))
        source = tmp_path / "pre.onnx"
    shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    out = tmp_path / "qdq.onnx"
    quantize_static(str(source), str(out), _Reader(model.graph.input[0].name, shape), quant_format=QuantFormat.QDQ,
                    per_channel=per_channel, activation_type=activation_type, weight_type=QuantType.QInt8,
                    extra_options={"ActivationSymmetric": symmetric})
    return out


@pytest.mark.parametrize("workload", ["tiny_cnn", "mobilenet_v2"])
@pytest.mark.parametrize("per_channel,activation_type,symmetric", [
    (True, QuantType.QUInt8, False), (False, QuantType.QUInt8, False), (True, QuantType.QInt8, True)])
def test_ort_qdq_model_runs_with_its_own_integers(tmp_path, workload, per_channel, activation_type, symmetric):
    path = ort_qdq(tmp_path, workload, per_channel, activation_type, symmetric)
    graph = load_onnx(path)
    assert graph.model_grids is not None
    qgraph = quantize_from_model(graph, QUANT)
    x = np.random.default_rng(7).standard_normal(graph.input_shape).astype(np.float32)
    for name, grid in graph.model_grids.items():
        if name in qgraph.tensor_qparams:
            assert float(qgraph.tensor_qparams[name].scale) == float(grid.scale)
    assert all(ql.weight_qparams.axis == (0 if per_channel else None) for ql in qgraph.layers if ql.layer.is_matrix)
    assert_layers_match(qgraph, ort_qdq_integers(path, x))
    run = run_integer(qgraph, x)
    assert run.outputs[graph.outputs[0]].dtype == qgraph.tensor_qparams[graph.outputs[0]].storage_dtype


def test_unprocessed_model_keeps_its_conv_integers_and_runs_its_batchnorm_as_affine(tmp_path):
    """Without quant_pre_process ORT quantizes the conv output and a BatchNormalization after it; folding
    the BN would change the model's integer weights, so it stays a per-channel affine layer."""
    path = ort_qdq(tmp_path, "tiny_cnn", True, QuantType.QUInt8, preprocess=False)
    graph = load_onnx(path)
    assert "affine" in [layer.op for layer in graph.layers]
    qgraph = quantize_from_model(graph, QUANT)
    x = np.random.default_rng(7).standard_normal(graph.input_shape).astype(np.float32)
    ort_tensors = ort_qdq_integers(path, x)
    for ql in qgraph.layers:
        if ql.layer.is_matrix and all(n in ort_tensors for n in ql.layer.inputs) and ql.layer.output in ort_tensors:
            ours, _ = run_layer(ql, [ort_tensors[n] for n in ql.layer.inputs])
            assert np.abs(ours.astype(int) - ort_tensors[ql.layer.output].astype(int)).max() <= 1, ql.name
    ours = run_integer(qgraph, x).dequantized[graph.outputs[0]].ravel()
    theirs = ort_qdq_integers(path, x)[graph.outputs[0]]
    grid = qgraph.tensor_qparams[graph.outputs[0]]
    theirs = (theirs.astype(np.float64).ravel() - int(grid.zero_point)) * float(grid.scale)
    assert ours @ theirs / (np.linalg.norm(ours) * np.linalg.norm(theirs)) > 0.99


def test_qoperator_model_is_one_line_naming_its_ops(tmp_path):
    model = build_model("tiny_cnn")
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
    save_model(model, tmp_path / "fp32.onnx")
    quantize_static(str(tmp_path / "fp32.onnx"), str(tmp_path / "qop.onnx"),
                    _Reader(model.graph.input[0].name, [1, 3, 32, 32]), quant_format=QuantFormat.QOperator)
    with pytest.raises(ModelError) as info:
        load_onnx(tmp_path / "qop.onnx")
    message = str(info.value)
    assert "QLinearConv x" in message and "quant_format=QuantFormat.QDQ" in message and "\n" not in message
