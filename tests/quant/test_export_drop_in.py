"""The user-facing QDQ export (``export_qdq(..., like=source)``, what `tpusim quantize` writes) drops in
for the FP32 file: same input and output names, float outputs, the source's dynamic batch; ONNX
Runtime gives the FP32 model's answer on it, and tpusim reads it back with the very same integers."""
from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto
from onnx_graphs import ORT_INT8_GEMM_SATURATES, SATURATES_HERE, GraphBuilder

from tpusim.cli import main
from tpusim.config import load_config
from tpusim.frontend import load_onnx, lower_model
from tpusim.quant.execute import run_integer
from tpusim.quant.export import export_qdq, quantized_name, with_outputs
from tpusim.quant.stage import calibrate_and_quantize
from tpusim.workloads import workload_file

TPU_V1 = "configs/tpu_v1.yaml"


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _io(model: onnx.ModelProto) -> list[tuple[str, int, list]]:
    constants = {i.name for i in model.graph.initializer}
    values = [vi for vi in model.graph.input if vi.name not in constants] + list(model.graph.output)
    return [(vi.name, vi.type.tensor_type.elem_type,
             [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]) for vi in values]


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.reshape(-1).astype(np.float64), b.reshape(-1).astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _export(source: onnx.ModelProto, where: str):
    config = load_config(TPU_V1, {"quant.calibration_samples": 8})
    graph = lower_model(source, where, batch=1)
    quantized = calibrate_and_quantize(graph, source, config, None)
    return quantized, export_qdq(quantized.qgraph, quantized.graph, like=source)


@pytest.fixture(scope="module")
def tiny():
    path = workload_file("tiny_cnn")
    source = onnx.load(str(path))
    quantized, exported = _export(source, str(path))
    return path, source, quantized, exported


def test_io_names_types_and_dynamic_batch_are_the_sources(tiny):
    _, source, _, exported = tiny
    assert _io(exported) == _io(source)
    assert _io(source)[0][2][0] == "batch"  # the check means something: the source's batch is symbolic
    assert all(vi.type.tensor_type.elem_type == TensorProto.FLOAT for vi in exported.graph.output)


def test_onnxruntime_gives_the_fp32_answer_at_any_batch(tiny):
    _, source, _, exported = tiny
    x = np.random.default_rng(5).standard_normal((3, 3, 32, 32)).astype(np.float32)
    (want,) = _session(source).run(None, {"input": x})
    (got,) = _session(exported).run(None, {"input": x})
    assert got.shape == want.shape and got.dtype == np.float32
    assert _cosine(got, want) > 0.99
    assert np.array_equal(np.argmax(got, 1), np.argmax(want, 1))


@pytest.mark.skipif(ORT_INT8_GEMM_SATURATES, reason=SATURATES_HERE)
def test_the_integer_tensors_are_still_inside(tiny):
    _, _, quantized, exported = tiny
    first = quantized.graph.layers[0].output  # before any rounding tie (see test_export.py): bit-identical
    x = np.random.default_rng(6).standard_normal((1, 3, 32, 32)).astype(np.float32)
    session = _session(with_outputs(exported, [quantized_name(first)]))
    results = dict(zip([o.name for o in session.get_outputs()], session.run(None, {"input": x})))
    ours = run_integer(quantized.qgraph, x, keep_all=True).tensors[first]
    np.testing.assert_array_equal(results[quantized_name(first)], ours)


def test_tpusim_reads_the_export_back_with_the_same_integers(tiny, tmp_path):
    _, _, quantized, exported = tiny
    path = tmp_path / "tiny_int8.onnx"
    onnx.save(exported, str(path))
    again = load_onnx(path, batch=1)
    assert again.model_grids is not None
    from_model = calibrate_and_quantize(again, exported, load_config(TPU_V1), None)
    x = np.random.default_rng(7).standard_normal((1, 3, 32, 32)).astype(np.float32)
    ours = run_integer(quantized.qgraph, x).outputs
    theirs = run_integer(from_model.qgraph, x).outputs
    assert list(ours) == list(theirs)
    for name in ours:
        np.testing.assert_array_equal(theirs[name], ours[name])


def test_a_resize_by_sizes_follows_the_batch():
    b = GraphBuilder((1, 4, 8, 8))
    y = b.conv("input", 4, 8, pads=[1, 1, 1, 1])
    shape = b.node("Shape", [y])
    batch_and_channels = b.node("Slice", [shape, b.const(np.array([0], np.int64)), b.const(np.array([2], np.int64))])
    sizes = b.node("Concat", [batch_and_channels, b.const(np.array([16, 16], np.int64))], axis=0)
    y = b.node("Resize", [y, "", "", sizes], mode="nearest")
    y = b.node("Flatten", [b.node("GlobalAveragePool", [b.conv(y, 8, 8, pads=[1, 1, 1, 1])])])
    source = b.model(b.node("Gemm", [y, b.weight((5, 8))], transB=1))
    try:
        _, exported = _export(source, "resize.onnx")
    except Exception as exc:  # this op's lowering is not there (or not for this form): nothing to check
        pytest.skip(f"Resize by sizes does not lower here: {exc}")
    x = np.random.default_rng(8).standard_normal((2, 4, 8, 8)).astype(np.float32)
    (want,) = _session(source).run(None, {"input": x})
    (got,) = _session(exported).run(None, {"input": x})
    assert got.shape == want.shape == (2, 5)
    if not ORT_INT8_GEMM_SATURATES:  # where ONNX Runtime's int8 convs saturate, its answer is not the export's
        assert _cosine(got, want) > 0.98


def test_cli_quantize_then_run_reports_the_models_quantization(tmp_path, capsys):
    path = tmp_path / "tiny_int8.onnx"
    assert main(["quantize", TPU_V1, "--model", "tiny_cnn", "--set", "quant.calibration_samples=8", "-o",
                 str(path)]) == 0
    out = tmp_path / "run"
    assert main(["run", TPU_V1, "--model", str(path), "--out", str(out), "--eval-samples", "2",
                 "--no-progress"]) == 0
    stdout = capsys.readouterr().out
    assert "int8 (quantization from the model)" in stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["calibration"]["quantization_source"] == "model"
    assert summary["fidelity"]["cosine"] > 0.999
