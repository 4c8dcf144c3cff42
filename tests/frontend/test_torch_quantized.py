"""Models quantized by PyTorch run on their own integers: the files in ``tests/data/torch_quantized/``.

They are what ``torch.onnx.export`` wrote for eager/FX post-training quantization (TorchScript
exporter), PT2E quantization (dynamo exporter) and fake-quantized QAT models
(``tools/export_torch_quantized.py`` made them; the folder's README.md says what each one holds).
Each one lowers with the model's own grids, integer weights and biases, runs the pipeline with
``quantization_source == "model"``, and our integers match ONNX Runtime's execution of the same file
layer by layer. The torchvision models' int8 weights were stripped to keep the files small; they are
refilled here with seeded integers of the spread PyTorch wrote (scales, zero points and int32 biases
are PyTorch's).
"""
from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, numpy_helper

from tpusim import pipeline
from tpusim.config import load_config
from tpusim.errors import ModelError
from tpusim.frontend import load_onnx
from tpusim.quant.calibrate import collect_statistics, synthetic_inputs
from tpusim.quant.execute import run_integer
from tpusim.quant.quantize import quantize_from_model, unquantized_tensors

import op_checks

DATA = Path(__file__).resolve().parents[1] / "data" / "torch_quantized"
STRIPPED = "stripped by tools/export_torch_quantized.py"
CONFIG = Path(__file__).resolve().parents[2] / "configs" / "tpu_v1.yaml"
QUANT = load_config(CONFIG).quant

# file stem -> (weights per channel, activation integer type, tensors the model leaves in float).
QDQ_FILES = {
    "smallcnn_eager_x86_ts17": (True, np.uint8, 0),
    "smallcnn_eager_fbgemm_ts13": (True, np.uint8, 0),
    "smallcnn_eager_qnnpack_ts17": (False, np.uint8, 0),
    "smallcnn_fx_x86_ts17": (True, np.uint8, 0),
    # X86InductorQuantizer quantizes conv/linear inputs, not every output: a conv output that only a
    # residual Add reads and the Linear's output stay float and are calibrated.
    "smallcnn_pt2e_x86_dynamo18": (True, np.uint8, 2),
    "smallcnn_pt2e_xnnpack_dynamo18": (True, np.int8, 0),
    "smallcnn_pt2e_xnnpack_pertensor_dynamo18": (False, np.int8, 0),
    # QAT's fused Conv-BN keeps BatchNormalization after a float conv output (Conv -> Div -> Add -> BN,
    # 3 of them); eager QAT puts no fake quantization after Hardtanh and the global average pool.
    "smallcnn_qat_fakequant_ts17": (True, np.uint8, 5),
    "smallcnn_qat_fakequant_fullrange_ts17": (True, np.uint8, 5),
    "resnet18_eager_x86_ts17": (True, np.uint8, 0),
    "resnet18_fx_x86_ts17": (True, np.uint8, 0),
    "mobilenet_v2_eager_x86_ts17": (True, np.uint8, 0),
    "resnet18_pt2e_xnnpack_dynamo18": (True, np.int8, 0),
    "mobilenet_v2_pt2e_x86_dynamo18": (True, np.uint8, 11),   # 10 convs before a residual Add, the Linear
}


def refill(model: onnx.ModelProto, seed: int = 0) -> int:
    """Give every stripped int8/uint8 tensor seeded integers with the spread written in its doc_string
    (``"...; std <s>"``); returns how many were filled."""
    filled = 0
    for tensor in model.graph.initializer:
        if not tensor.doc_string.startswith(STRIPPED):
            continue
        std = float(tensor.doc_string.rsplit("std ", 1)[1])
        dtype = np.int8 if tensor.data_type == TensorProto.INT8 else np.uint8
        info = np.iinfo(dtype)
        rng = np.random.default_rng([seed, zlib.crc32(tensor.name.encode())])
        values = np.rint(rng.standard_normal(tuple(tensor.dims)) * std)
        # Symmetric int8 weights: PyTorch's per-channel observers use [-128, 127], the chip [-127, 127].
        values = np.clip(values, max(info.min, -127), info.max).astype(dtype)
        tensor.CopyFrom(numpy_helper.from_array(values, tensor.name))
        filled += 1
    return filled


def model_file(name: str, tmp_path: Path) -> Path:
    """The committed file, or a refilled copy of it when its weights were stripped."""
    path = DATA / f"{name}.onnx"
    model = onnx.load(str(path))
    if not refill(model):
        return path
    out = tmp_path / path.name
    onnx.save(model, str(out))
    return out


def integer_clips(model: onnx.ModelProto) -> dict[str, tuple[int, int]]:
    """Q -> Clip -> DQ (PyTorch's fake-quantized [0, 127] range): the float tensor each such Q quantizes
    and the DQ output, with the bounds the Clip applies to the integers."""
    consts = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            consts[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    clips = {}
    for node in model.graph.node:
        if node.op_type != "QuantizeLinear":
            continue
        for clip in readers.get(node.output[0], []):
            if clip.op_type != "Clip":
                continue
            low = int(consts[clip.input[1]]) if len(clip.input) > 1 and clip.input[1] else -(2**31)
            high = int(consts[clip.input[2]]) if len(clip.input) > 2 and clip.input[2] else 2**31
            for dq in readers.get(clip.output[0], []):
                clips[dq.output[0]] = (low, high)
            clips[node.input[0]] = (low, high)
    return clips


def ort_integers(path: Path, x: np.ndarray) -> dict[str, np.ndarray]:
    """ONNX Runtime's integers for every quantized tensor (``op_checks.ort_qdq_integers``), with the
    integer Clip that PyTorch writes between some Q/DQ pairs applied, as the DQ reads them."""
    tensors = op_checks.ort_qdq_integers(path, x)
    for name, (low, high) in integer_clips(onnx.load(str(path))).items():
        if name in tensors:
            tensors[name] = np.clip(tensors[name], low, high).astype(tensors[name].dtype)
    return tensors


def quantized(path: Path):
    """The lowered graph and its quantization from the model (statistics only for tensors it left in float)."""
    graph = load_onnx(path)
    assert graph.model_grids is not None
    missing = unquantized_tensors(graph)
    stats = None
    if missing:
        data = synthetic_inputs(tuple(graph.input_shape[1:]), 4, 0)
        stats = collect_statistics(onnx.load(str(path)), graph, data, QUANT.histogram_bins,
                                   tensors=[graph.input_name] + missing)
    return graph, missing, quantize_from_model(graph, QUANT, stats)


def test_every_committed_file_is_listed():
    names = {p.stem for p in DATA.glob("*.onnx")}
    assert names == set(QDQ_FILES) | {"mlp_torchao_int8wo_dynamo18"}


@pytest.mark.parametrize("name", sorted(QDQ_FILES))
def test_pytorch_quantized_file_runs_on_its_own_integers(name, tmp_path):
    per_channel, activation_dtype, left_in_float = QDQ_FILES[name]
    path = model_file(name, tmp_path)
    graph, missing, qgraph = quantized(path)
    assert len(missing) == left_in_float, missing
    matrix = [ql for ql in qgraph.layers if ql.layer.is_matrix]
    assert matrix and all(ql.layer.attr("weight_scale") is not None for ql in matrix)
    assert all(ql.weight_qparams.axis == (0 if per_channel else None) for ql in matrix)
    assert qgraph.tensor_qparams[graph.input_name].storage_dtype == activation_dtype
    for tensor, grid in graph.model_grids.items():
        if tensor in qgraph.tensor_qparams:
            assert float(qgraph.tensor_qparams[tensor].scale) == float(grid.scale)
    x = np.random.default_rng(7).standard_normal(graph.input_shape).astype(np.float32)
    op_checks.assert_layers_match(qgraph, ort_integers(path, x))


@pytest.mark.parametrize("name", sorted(QDQ_FILES))
def test_pipeline_reports_the_quantization_came_from_the_model(name, tmp_path, monkeypatch):
    # The plots are two thirds of a small model's run and say nothing about its quantization.
    monkeypatch.setattr(pipeline, "run_figures", lambda *timing: {})
    path = model_file(name, tmp_path)
    result = pipeline.run(pipeline.RunOptions(config=CONFIG, model=str(path), out_dir=tmp_path / "out",
                                              eval_samples=1))
    calibration = result.summary["calibration"]
    assert calibration["quantization_source"] == "model"
    assert calibration["samples"] == (0 if QDQ_FILES[name][2] == 0 else QUANT.calibration_samples)
    assert result.summary["total_cycles"] > 0


def test_fake_quantized_reduced_range_is_a_clipped_grid():
    """PyTorch's default fake quantization of activations has reduce_range=True: integers [0, 127],
    written as a uint8 QuantizeLinear followed by Clip(max=127) before the DequantizeLinear. The grid
    stops at 127; on inputs large enough to reach past it, our integers are ORT's clipped ones."""
    path = DATA / "smallcnn_qat_fakequant_ts17.onnx"
    clipped = integer_clips(onnx.load(str(path)))
    assert clipped and set(clipped.values()) == {(-(2**31), 127)}
    graph, _, qgraph = quantized(path)
    narrowed = [name for name, grid in graph.model_grids.items() if grid.qmax == 127]
    assert graph.input_name in narrowed and all(graph.model_grids[n].qmin == 0 for n in narrowed)
    x = 4 * np.random.default_rng(7).standard_normal(graph.input_shape).astype(np.float32)
    unclipped = op_checks.ort_qdq_integers(path, x)
    assert unclipped[graph.input_name].max() == 255 and unclipped["/Relu_output_0"].max() > 127
    theirs = ort_integers(path, x)
    ours = run_integer(qgraph, x, keep_all=True).tensors
    np.testing.assert_array_equal(ours[graph.input_name], theirs[graph.input_name])
    op_checks.assert_layers_match(qgraph, theirs)
    full = load_onnx(DATA / "smallcnn_qat_fakequant_fullrange_ts17.onnx")
    assert all(grid.qmax == 255 for grid in full.model_grids.values())


def test_onnxruntime_optimised_copy_is_qoperator_and_one_line(tmp_path):
    """PyTorch writes QDQ only; ONNX Runtime's graph optimiser fuses such a file into QOperator ops
    (QLinearConv, QLinearAdd, QGemm, ...) when a user saves its optimised model. tpusim names them."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(tmp_path / "optimised.onnx")
    options.log_severity_level = 3
    ort.InferenceSession(str(DATA / "smallcnn_eager_x86_ts17.onnx"), options, providers=["CPUExecutionProvider"])
    with pytest.raises(ModelError) as info:
        load_onnx(tmp_path / "optimised.onnx")
    message = str(info.value)
    assert "QOperator" in message and "QLinearConv x" in message and "\n" not in message


def test_torchao_weight_only_export_is_a_float_model():
    """torchao's Int8WeightOnlyConfig exports no Q/DQ: the int8 values as float32 weights times a
    per-channel Mul. It is a float model to tpusim, calibrated like any other."""
    graph = load_onnx(DATA / "mlp_torchao_int8wo_dynamo18.onnx")
    assert graph.model_grids is None
    weights = [layer.weight for layer in graph.layers if layer.is_matrix]
    assert weights and all(np.array_equal(w, np.rint(w)) and np.abs(w).max() <= 128 for w in weights)


def _clipped_model(low: int, high: int) -> onnx.ModelProto:
    """input -> Q(uint8, zero point 3) -> Clip(low, high) -> DQ -> MaxPool -> output."""
    h = onnx.helper
    inits = [numpy_helper.from_array(np.array(value, dtype), name) for value, dtype, name in
             [(0.05, np.float32, "s"), (3, np.uint8, "z"), (low, np.uint8, "lo"), (high, np.uint8, "hi")]]
    nodes = [h.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]), h.make_node("Clip", ["xq", "lo", "hi"], ["xc"]),
             h.make_node("DequantizeLinear", ["xc", "s", "z"], ["xd"]),
             h.make_node("MaxPool", ["xd"], ["y"], kernel_shape=[2, 2], strides=[2, 2])]
    graph = h.make_graph(nodes, "clipped", [h.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4, 4])],
                         [h.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 2, 2])], inits)
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])


def test_integer_clip_between_q_and_dq_narrows_the_grid_or_is_one_line():
    from tpusim.frontend import lower_model

    graph = lower_model(_clipped_model(0, 100), "clipped")
    grid = graph.model_grids["x"]
    assert (grid.qmin, grid.qmax, int(grid.zero_point)) == (0, 100, 3)
    with pytest.raises(ModelError) as info:
        lower_model(_clipped_model(5, 100), "clipped")  # the zero point 3 is outside [5, 100]
    assert "[5, 100]" in str(info.value) and "zero point 3" in str(info.value) and "\n" not in str(info.value)
