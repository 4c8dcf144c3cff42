"""The corpus of real exporter output and its helpers (tests/corpus.py) work as the other tests assume."""
from __future__ import annotations

import math
import os
import time

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, numpy_helper

import corpus

SMALL = "mobilenet_v3_small_ts17"


def _session(model_or_path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    source = model_or_path.SerializeToString() if isinstance(model_or_path, onnx.ModelProto) else model_or_path
    return ort.InferenceSession(source if isinstance(source, bytes) else str(source), options,
                                providers=["CPUExecutionProvider"])


def _run(model_or_path, x: np.ndarray) -> np.ndarray:
    session = _session(model_or_path)
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def _input(shape, seed: int = 7) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)


def test_corpus_lists_exactly_the_files_in_the_folder():
    on_disk = {p.name for p in corpus.CORPUS_DIR.glob("*.onnx")}
    listed = [e.file for e in corpus.CORPUS]
    assert len(set(listed)) == len(listed) and len(corpus.BY_NAME) == len(corpus.CORPUS)
    assert set(listed) == on_disk
    readme = (corpus.CORPUS_DIR / "README.md").read_text()
    for e in corpus.CORPUS:
        assert e.file == e.name + ".onnx" and f"| {e.file} |" in readme
        assert e.exporter in ("torchscript", "dynamo") and e.external_data == (e.exporter == "dynamo")
    assert {e.exporter for e in corpus.CORPUS} == {"torchscript", "dynamo"}
    assert {9, 11, 17, 18} <= {e.opset for e in corpus.CORPUS}


def test_committed_files_are_stripped_and_small():
    total = 0
    for e in corpus.CORPUS:
        size = e.path.stat().st_size
        total += size
        assert size < 1 << 20, e.file
        model = onnx.load(str(e.path))
        assert model.opset_import[0].version == e.opset and model.producer_name == "pytorch"
        for t in model.graph.initializer:
            if t.data_type == TensorProto.FLOAT and math.prod(t.dims) > 64:
                assert corpus.is_stripped(t) and t.doc_string == corpus.STRIPPED, (e.file, t.name)
        assert not any(n.op_type == "Constant" and n.attribute[0].t.dims and math.prod(n.attribute[0].t.dims) > 64
                       and n.attribute[0].t.data_type == TensorProto.FLOAT for n in model.graph.node)
    assert total < 15 << 20


def test_fill_is_seeded_role_aware_and_keeps_real_constants():
    stripped = onnx.load(str(corpus.entry("densenet121_dynamo18").path))
    a = corpus.load_model("densenet121_dynamo18", seed=0)
    b = corpus.load_model("densenet121_dynamo18", seed=0)
    c = corpus.load_model("densenet121_dynamo18", seed=1)
    ta, tb, tc = ({t.name: t for t in m.graph.initializer} for m in (a, b, c))
    for t in stripped.graph.initializer:
        if corpus.is_stripped(t):
            assert ta[t.name].raw_data == tb[t.name].raw_data
            assert ta[t.name].raw_data != tc[t.name].raw_data
        else:                                   # integers and small constants: the exporter's own bytes
            assert ta[t.name].SerializeToString() == t.SerializeToString()
    batchnorms = [n for n in a.graph.node if n.op_type == "BatchNormalization"]
    assert batchnorms
    for node in batchnorms:
        scale, _, _, var = (numpy_helper.to_array(ta[i]) for i in node.input[1:5])
        assert (var > 0).all() and (scale > 0).all()
    conv = next(n for n in a.graph.node if n.op_type == "Conv" and math.prod(ta[n.input[1]].dims) > 64 * 64)
    w = numpy_helper.to_array(ta[conv.input[1]])
    assert abs(float(w.mean())) < 0.1 * float(w.std())       # zero-mean, He-like scale
    assert 0.1 < float(w.std()) * math.sqrt(math.prod(w.shape[1:])) < 10


def test_residual_network_activations_stay_in_range():
    model = corpus.load_model("resnet50_dynamo18")
    adds = [n.output[0] for n in model.graph.node if n.op_type == "Add"]
    assert len(adds) >= 16
    present = {o.name for o in model.graph.output}
    model.graph.output.extend(onnx.ValueInfoProto(name=o) for o in adds if o not in present)
    session = _session(model)
    names = [o.name for o in session.get_outputs()]
    for name, y in zip(names, session.run(None, {session.get_inputs()[0].name: _input((1, 3, 224, 224))})):
        assert np.isfinite(y).all(), name
        assert 1e-2 < float(y.std()) < 1e3, name


def test_external_data_round_trip(tmp_path):
    model = corpus.load_model("resnet18_dynamo18")
    before = model.SerializeToString()
    path = corpus.save_with_external_data(model, tmp_path / "resnet18.onnx")
    assert model.SerializeToString() == before                   # the caller's model is untouched
    data = tmp_path / "resnet18.onnx.data"
    assert path == tmp_path / "resnet18.onnx" and data.is_file()
    assert path.stat().st_size < 1 << 20 < data.stat().st_size
    head = onnx.load(str(path), load_external_data=False)
    external = [t for t in head.graph.initializer if t.data_location == TensorProto.EXTERNAL]
    assert external and {dict((e.key, e.value) for e in t.external_data)["location"] for t in external} == {data.name}
    assert all(math.prod(t.dims) * 4 <= 256 for t in head.graph.initializer if t.data_location != TensorProto.EXTERNAL)
    loaded = onnx.load(str(path))
    onnx.checker.check_model(str(path))
    original = {t.name: t.raw_data for t in model.graph.initializer}
    assert {t.name: t.raw_data for t in loaded.graph.initializer} == original
    x = _input((1, 3, 224, 224))
    np.testing.assert_allclose(_run(path, x), _run(model, x), rtol=1e-5, atol=1e-5)


def test_saved_model_is_the_fill_in_the_exporters_layout_written_once_per_key(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus, "SAVED_DIR", tmp_path)
    name = "gru_dynamo18"                                            # dynamo: the weights in a .data file
    path = corpus.saved_model(name)
    folder = tmp_path / name
    assert path.parent.parent == folder and path.name == corpus.entry(name).file
    assert (path.parent / (path.name + ".data")).is_file()
    loaded = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}   # with its .data
    filled = {t.name: numpy_helper.to_array(t) for t in corpus.load_model(name).graph.initializer}
    assert loaded.keys() == filled.keys()
    assert all(loaded[k].dtype == filled[k].dtype and loaded[k].tobytes() == filled[k].tobytes() for k in filled)
    written = path.stat().st_mtime_ns
    # another key's folder: removed once unused for a day, kept while another session may still read it
    stale, recent = folder / "stale-key", folder / "recent-key"
    stale.mkdir()
    recent.mkdir()
    day_ago = time.time() - 24 * 3600 - 60
    os.utime(stale, (day_ago, day_ago))
    assert corpus.saved_model(name) == path and path.stat().st_mtime_ns == written    # read, not written again
    assert sorted(p.name for p in folder.iterdir()) == sorted([path.parent.name, "recent-key"])
    seeded = corpus.saved_model(name, seed=1)
    assert seeded.parent != path.parent and seeded.parent.parent == folder


@pytest.mark.parametrize("per_channel, activation_type, symmetric", [(True, "uint8", False), (False, "int8", True)])
def test_ort_qdq_copy_runs_in_onnxruntime(tmp_path, per_channel, activation_type, symmetric):
    model = corpus.load_model(SMALL)
    out = corpus.ort_qdq_copy(model, tmp_path / "q.onnx", per_channel=per_channel, activation_type=activation_type,
                              symmetric_activations=symmetric, samples=4)
    q = onnx.load(str(out))
    ops = {n.op_type for n in q.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops
    zero_points = [numpy_helper.to_array(t) for t in q.graph.initializer if t.name.endswith("_zero_point")]
    act = np.uint8 if activation_type == "uint8" else np.int8
    assert any(z.dtype == act for z in zero_points)
    if symmetric:
        assert all(not z.any() for z in zero_points if z.dtype == np.int8)
    x = _input((1, 3, 224, 224))
    yq, yf = _run(out, x), _run(model, x)
    assert np.isfinite(yq).all()
    cosine = float(np.dot(yq.ravel(), yf.ravel()) / (np.linalg.norm(yq) * np.linalg.norm(yf)))
    assert cosine > 0.8


@pytest.mark.parametrize("name", corpus.MLPERF_TINY_CONVERTIBLE)
def test_mlperf_tiny_converts_with_tflite2onnx(tmp_path, name):
    path = corpus.mlperf_tiny_onnx(name, tmp_path)
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    shape = corpus.input_shape(model)
    y = _run(path, _input(shape))
    assert np.isfinite(y).all() and y.std() > 0


def test_mlperf_tiny_hybrid_kws_is_refused(tmp_path):
    with pytest.raises(ValueError, match="hybrid"):
        corpus.mlperf_tiny_onnx("kws_ref_model_float32", tmp_path)
