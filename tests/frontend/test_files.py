"""Reading model files: every bad-input class is one ModelError line."""
from __future__ import annotations

import onnx
import pytest
from onnx_graphs import GraphBuilder

from tpusim.errors import ModelError
from tpusim.frontend import load_onnx


def _model_file(tmp_path):
    b = GraphBuilder((1, 3, 8, 8))
    y = b.node("Relu", [b.conv("input", 3, 4, pads=[1, 1, 1, 1])])
    path = tmp_path / "good.onnx"
    onnx.save(b.model(y), path)
    return path


def test_good_file_loads_with_batch(tmp_path):
    graph = load_onnx(_model_file(tmp_path), batch=3)
    assert graph.input_shape == (3, 3, 8, 8)
    assert graph.layers[0].output_shape == (3, 4, 8, 8)


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(ModelError, match="no such model file"):
        load_onnx(tmp_path / "nope.onnx")
    with pytest.raises(ModelError, match="is a folder, not an ONNX model file"):
        load_onnx(tmp_path)


@pytest.mark.parametrize("cut", [0.3, 0.6, 0.9])
def test_truncated_file(tmp_path, cut):
    data = _model_file(tmp_path).read_bytes()
    bad = tmp_path / "truncated.onnx"
    bad.write_bytes(data[: int(len(data) * cut)])
    with pytest.raises(ModelError) as info:
        load_onnx(bad)
    assert str(bad) in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("content", [b"", b"not a protobuf at all \x00\xff" * 10])
def test_corrupt_file(tmp_path, content):
    bad = tmp_path / "corrupt.onnx"
    bad.write_bytes(content)
    with pytest.raises(ModelError, match="corrupt|checker"):
        load_onnx(bad)
