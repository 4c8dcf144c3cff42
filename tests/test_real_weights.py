"""Claims of the README's per-tensor vs per-channel conclusions, checked on real trained weights: MLPerf Tiny's
ResNet-8 and its TFLite int8 twin (``../shared/mlperf_tiny``; skipped where that folder is absent), and the
mechanism ``benchmarks/real_weights_compare.py`` uses to run a float model on the twin's activation ranges."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

import corpus
from tpusim.frontend import lower_model
from tpusim.quant.arithmetic import quantize, weight_qparams
from tpusim.quant.quantize import own_params_tensors

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import real_weights_compare  # noqa: E402

_TFLITE_CONV_2D = 3


def _tflite_conv_weights(path: Path) -> list[np.ndarray]:
    """The int8 weights of every CONV_2D of a full-int8 TFLite file, in graph order, as OIHW."""
    tflite = pytest.importorskip("tflite", reason="the tflite flatbuffer parser is not installed")
    model = tflite.Model.GetRootAsModel(path.read_bytes(), 0)
    graph = model.Subgraphs(0)
    weights = []
    for i in range(graph.OperatorsLength()):
        op = graph.Operators(i)
        if model.OperatorCodes(op.OpcodeIndex()).BuiltinCode() != _TFLITE_CONV_2D:
            continue
        tensor = graph.Tensors(op.Inputs(1))
        data = model.Buffers(tensor.Buffer()).DataAsNumpy()
        weights.append(np.frombuffer(data.tobytes(), np.int8).reshape(tensor.ShapeAsNumpy()).transpose(0, 3, 1, 2))
    return weights


@pytest.fixture(scope="module")
def resnet8_path(tmp_path_factory) -> Path:
    return corpus.mlperf_tiny_onnx("pretrainedResnet", tmp_path_factory.mktemp("resnet8"))


@pytest.fixture(scope="module")
def resnet8_onnx(resnet8_path) -> onnx.ModelProto:
    return onnx.load(str(resnet8_path))


@pytest.fixture(scope="module")
def resnet8(resnet8_onnx):
    return lower_model(resnet8_onnx, "resnet8", batch=1)


def test_per_channel_weights_are_the_ones_tflite_shipped(resnet8):
    """Our per-channel int8 weights of ResNet-8's 9 convs are MLPerf Tiny's own int8 model's: every value
    but 2 of 76,720, which are off by one."""
    theirs = _tflite_conv_weights(corpus.mlperf_tiny_dir() / "pretrainedResnet_quant.tflite")
    convs = [layer for layer in resnet8.layers if layer.op == "conv"]
    assert len(convs) == len(theirs) == 9
    differ = values = 0
    for layer, their_q in zip(convs, theirs):
        weight = np.asarray(layer.weight)
        our_q = quantize(weight, weight_qparams(weight, "per-channel")).astype(np.int32)
        assert our_q.shape == their_q.shape
        diff = np.abs(our_q - their_q)
        assert diff.max() <= 1
        differ += int(np.count_nonzero(diff))
        values += diff.size
    assert (differ, values) == (2, 76720)


def test_per_tensor_costs_resnet8_little_weight_sqnr(resnet8_onnx):
    """ResNet-8's channel ranges are close (largest / median 1.8 on the median layer, no channel under 8
    levels per tensor), so per-tensor weights keep a median layer's weight SQNR at 39.0 dB (42.9 per
    channel) and every layer above 37 dB (the generator's ResNet-50 has a layer at 19 dB)."""
    [stats] = real_weights_compare.weight_stats(resnet8_onnx, "resnet8")
    assert stats.layers == 10 and stats.dead_channel_pct == 0.0 and stats.starved_channel_pct == 0.0
    assert stats.median_spread == pytest.approx(1.8, abs=0.05)
    assert stats.median_sqnr_tensor_db == pytest.approx(39.0, abs=0.05)
    assert stats.median_sqnr_channel_db == pytest.approx(42.9, abs=0.05)
    assert stats.worst_sqnr_tensor_db == pytest.approx(37.6, abs=0.05)


def test_the_int8_twins_activation_ranges_reach_every_tensor(resnet8_path, tmp_path):
    """benchmarks/real_weights_compare.py's rows on MLPerf Tiny's own ranges: every tensor that takes its own
    grid gets the one the int8 TFLite twin carries (as uint8: zero point + 128), so nothing is calibrated."""
    grids = real_weights_compare.tflite_activation_grids(corpus.mlperf_tiny_dir() / "pretrainedResnet_quant.tflite")
    gridded = real_weights_compare.with_activation_grids(str(resnet8_path), grids, tmp_path / "gridded.onnx")
    graph = lower_model(onnx.load(str(gridded)), "gridded", batch=1)
    own = own_params_tensors(graph)
    assert len(own) == 15 and set(own) <= set(graph.model_grids)  # input, 9 convs, 3 adds, the GEMM, softmax
    for tensor in own:
        scale, zero_point = grids[tensor]
        grid = graph.model_grids[tensor]
        assert (float(grid.scale), int(grid.zero_point), grid.qmin, grid.qmax) == (
            np.float32(scale), zero_point + 128, 0, 255)
