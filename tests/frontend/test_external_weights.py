import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx_graphs import GraphBuilder

from tpusim.frontend.external_weights import MIN_EXTERNAL_BYTES, weights_in_place
from tpusim.quant import calibrate


def _model_file(tmp_path, name="m.onnx"):
    """A conv net with a large weight (16 x 16 x 3 x 3 floats), a small one and a bias or two, saved as one file."""
    g = GraphBuilder((1, 16, 8, 8))
    y = g.node("Relu", [g.conv(g.input_name, 16, 16, pads=[1, 1, 1, 1])])
    y = g.conv(y, 16, 2, k=1)
    path = tmp_path / name
    onnx.save(g.model(y), str(path))
    return path


def test_large_weights_become_references_to_their_own_bytes_in_the_file(tmp_path):
    path = _model_file(tmp_path)
    original = onnx.load(str(path))
    appended = onnx.ModelProto()
    appended.graph.output.extend([onnx.helper.make_empty_tensor_value_info("extra")])
    rewritten = onnx.ModelProto()
    rewritten.ParseFromString(weights_in_place(path, appended.SerializeToString()))
    data = path.read_bytes()
    moved = 0
    for before, after in zip(original.graph.initializer, rewritten.graph.initializer):
        assert (before.name, list(before.dims), before.data_type) == (after.name, list(after.dims), after.data_type)
        if len(before.raw_data) < MIN_EXTERNAL_BYTES:
            assert after == before
            continue
        moved += 1
        entries = {entry.key: entry.value for entry in after.external_data}
        assert after.data_location == onnx.TensorProto.EXTERNAL and not after.raw_data
        assert entries["location"] == "m.onnx"
        offset, length = int(entries["offset"]), int(entries["length"])
        assert data[offset : offset + length] == before.raw_data
    assert moved == 1
    assert list(rewritten.graph.node) == list(original.graph.node)
    assert [o.name for o in rewritten.graph.output] == [o.name for o in original.graph.output] + ["extra"]


def test_onnx_runtime_computes_the_same_from_the_weights_in_place(tmp_path):
    if not calibrate._READS_EXTERNAL_DATA_OF_BYTES:
        pytest.skip(f"ONNX Runtime {ort.__version__} finds no external data of a model given as bytes")
    path = _model_file(tmp_path, "net.onnx")
    x = np.random.default_rng(0).standard_normal((1, 16, 8, 8)).astype(np.float32)
    whole = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    in_place = ort.InferenceSession(weights_in_place(path), calibrate._session_options(str(path.parent)),
                                    providers=["CPUExecutionProvider"])
    name = whole.get_inputs()[0].name
    np.testing.assert_array_equal(in_place.run(None, {name: x})[0], whole.run(None, {name: x})[0])


def test_nothing_to_move_or_an_unusual_framing_keeps_the_whole_bytes(tmp_path):
    g = GraphBuilder((1, 2, 4, 4))
    small = tmp_path / "small.onnx"
    onnx.save(g.model(g.conv(g.input_name, 2, 2, k=1)), str(small))
    assert weights_in_place(small) is None  # every weight under MIN_EXTERNAL_BYTES
    twice = tmp_path / "twice.onnx"
    twice.write_bytes(_model_file(tmp_path).read_bytes() * 2)  # two graph fields, which a parser would merge
    assert weights_in_place(twice) is None
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(_model_file(tmp_path).read_bytes()[:-7])
    assert weights_in_place(truncated) is None


def test_a_session_onnx_runtime_refuses_in_place_gets_the_whole_bytes(tmp_path, monkeypatch):
    path = _model_file(tmp_path)
    model = onnx.load(str(path))
    made = []
    real = ort.InferenceSession

    def refusing_in_place(data, options, providers):
        made.append(len(data))
        if len(made) == 1 and calibrate._READS_EXTERNAL_DATA_OF_BYTES:
            raise RuntimeError("no external data here")
        return real(data, options, providers=providers)

    monkeypatch.setattr(calibrate.ort, "InferenceSession", refusing_in_place)
    session = calibrate._session_exposing(calibrate.ModelFile(path), [], {i.name for i in model.graph.input}
                                          | {o.name for o in model.graph.output})
    assert made[-1] >= path.stat().st_size  # the second session read the whole file's bytes
    x = np.zeros((1, 16, 8, 8), np.float32)
    assert session.run(None, {session.get_inputs()[0].name: x})[0].shape == (1, 2, 8, 8)


def test_a_model_file_reached_through_a_symlink_is_read_beside_the_link(tmp_path, monkeypatch):
    if not calibrate._READS_EXTERNAL_DATA_OF_BYTES:
        pytest.skip(f"ONNX Runtime {ort.__version__} finds no external data of a model given as bytes")
    target = _model_file(tmp_path, "stored.onnx")
    (tmp_path / "elsewhere").mkdir()
    link = tmp_path / "elsewhere" / "linked.onnx"
    link.symlink_to(target)
    model = onnx.load(str(target))
    names = {i.name for i in model.graph.input} | {o.name for o in model.graph.output}
    x = np.random.default_rng(1).standard_normal((1, 16, 8, 8)).astype(np.float32)
    sizes, real = [], ort.InferenceSession
    monkeypatch.setattr(calibrate.ort, "InferenceSession", lambda data, options, providers: sizes.append(len(data))
                        or real(data, options, providers=providers))
    through_link = calibrate._session_exposing(calibrate.ModelFile(link), [], names)
    assert len(sizes) == 1 and sizes[0] < target.stat().st_size / 2  # in place: no second session of the whole bytes
    whole = real(str(target), providers=["CPUExecutionProvider"])
    name = whole.get_inputs()[0].name
    np.testing.assert_array_equal(through_link.run(None, {name: x})[0], whole.run(None, {name: x})[0])
