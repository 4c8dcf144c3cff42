"""Gather: embedding lookups at int64 token ids (the graph input), constant operands materialised as
lookups of constant rows (position embeddings, a prepended class token), and selections of an
activation at constant indices (ViT's class token) -- through every stage."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx_graphs import GraphBuilder
from op_checks import CONFIG, _check_against_ort, check_all_stages, sqnr_db

from tpusim.errors import DataError, ModelError
from tpusim.frontend import lower_model, run_reference
from tpusim.frontend.lowering import index_rows
from tpusim.mapping.isa import ReadHostMemory
from tpusim.pipeline import time_and_energy
from tpusim.quant.arithmetic import quantize
from tpusim.quant.calibrate import load_calibration_set
from tpusim.quant.execute import run_integer
from tpusim.quant.stage import calibrate_and_quantize

VOCAB, TOKENS, HIDDEN = 40, 6, 16


def _token_model(seed: int = 0) -> onnx.ModelProto:
    """ids (1, 6) int64 -> word embedding + position embedding -> LayerNorm -> MatMul."""
    rng = np.random.default_rng(seed)
    inits = {
        "word": rng.standard_normal((VOCAB, HIDDEN)).astype(np.float32),
        "position": (0.5 * rng.standard_normal((TOKENS, HIDDEN))).astype(np.float32),
        "gamma": rng.uniform(0.8, 1.2, HIDDEN).astype(np.float32),
        "beta": (0.1 * rng.standard_normal(HIDDEN)).astype(np.float32),
        "w": (0.3 * rng.standard_normal((HIDDEN, 8))).astype(np.float32),
    }
    nodes = [
        helper.make_node("Gather", ["word", "ids"], ["words"], name="lookup"),
        helper.make_node("Add", ["words", "position"], ["summed"], name="positions"),
        helper.make_node("LayerNormalization", ["summed", "gamma", "beta"], ["normed"], name="norm", axis=-1),
        helper.make_node("MatMul", ["normed", "w"], ["y"], name="proj"),
    ]
    graph = helper.make_graph(nodes, "tokens", [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, TOKENS])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, TOKENS, 8])],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _ort(model, x):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"ids": x})[0]


def test_token_ids_are_looked_up_and_keep_their_integers():
    model = _token_model()
    graph = lower_model(model, "t.onnx")
    assert [layer.op for layer in graph.layers] == ["embedding", "embedding", "add", "layernorm", "gemm"]
    lookup, position = graph.layers[:2]
    assert lookup.inputs == ("ids",) and lookup.attr("index_rows") == VOCAB and index_rows(graph) == VOCAB
    assert position.inputs == () and position.output_shape == (TOKENS, HIDDEN)
    ids = np.random.default_rng(1).integers(0, VOCAB, (1, TOKENS)).astype(np.int64)
    expected = _ort(model, ids)
    np.testing.assert_allclose(run_reference(graph, ids)[graph.outputs[0]], expected, atol=1e-4 * np.ptp(expected))
    quantized = calibrate_and_quantize(graph, model, CONFIG, None)
    assert quantized.calibration.synthetic and quantized.calibration.inputs.dtype == np.int64
    assert quantized.calibration.inputs.min() >= 0 and quantized.calibration.inputs.max() < VOCAB
    qgraph = quantized.qgraph
    grid = qgraph.input_qparams
    assert (float(grid.scale), int(grid.zero_point), grid.qmin, grid.qmax) == (1.0, 0, 0, VOCAB - 1)
    run = run_integer(qgraph, ids, keep_all=True)
    np.testing.assert_array_equal(run.tensors["ids"], ids)
    table = quantize(lookup.weight, qgraph.tensor_qparams[lookup.output])  # the host's table, on the output grid
    np.testing.assert_array_equal(run.tensors[lookup.output], table[ids])
    assert sqnr_db(expected, run.dequantized[graph.outputs[0]]) > 25
    # ONNX Runtime runs our QDQ export (int64 ids straight into Gather) to the same integers, layer by layer.
    _check_against_ort(qgraph, ids, 1, 0.01, "token ids")


def test_a_lookup_is_one_host_transfer_of_its_rows():
    graph = lower_model(_token_model(), "t.onnx")
    program, sim, energy = time_and_energy(graph, CONFIG)
    for index in (0, 1):  # the lookup, and the constant position rows (the ids' own transfer is the input's)
        (transfer,) = [i for i in program.instructions if i.layer == index and i.dst.nbytes == TOKENS * HIDDEN]
        assert isinstance(transfer, ReadHostMemory) and transfer.dst.nbytes == TOKENS * HIDDEN and not transfer.spill
        ids_bytes = TOKENS if index == 0 else 0  # the graph input itself comes over first, one byte an id
        assert sim.layers[index].counts.host_in_bytes == TOKENS * HIDDEN + ids_bytes and sim.layers[index].cycles > 0
        assert energy.layers[index][1].host > 0


def test_calibration_data_for_token_ids(tmp_path):
    prep = CONFIG.input_preprocessing
    good = tmp_path / "ids.npy"
    np.save(good, np.random.default_rng(0).integers(0, VOCAB, (40, TOKENS)))
    data = load_calibration_set(good, (TOKENS,), 32, 0, prep, index_rows=VOCAB)
    assert data.inputs.dtype == np.int64 and data.inputs.shape == (40, TOKENS) and not data.synthetic
    synthetic = load_calibration_set(None, (TOKENS,), 8, 3, prep, index_rows=VOCAB)
    assert synthetic.synthetic and synthetic.inputs.dtype == np.int64 and synthetic.inputs.max() < VOCAB
    bad = {"float.npy": np.zeros((4, TOKENS), np.float32), "range.npy": np.full((4, TOKENS), VOCAB),
           "shape.npy": np.zeros((4, TOKENS + 1), np.int64)}
    messages = {"float.npy": "expected an integer array", "range.npy": "has 40 rows", "shape.npy": "expected samples"}
    for name, array in bad.items():
        np.save(tmp_path / name, array)
        with pytest.raises(DataError, match=messages[name]):
            load_calibration_set(tmp_path / name, (TOKENS,), 32, 0, prep, index_rows=VOCAB)
    with pytest.raises(DataError, match="not a folder of images"):
        load_calibration_set(tmp_path, (TOKENS,), 32, 0, prep, index_rows=VOCAB)


def test_an_integer_input_read_as_anything_but_ids_is_refused():
    nodes = [helper.make_node("Gather", ["ids", "first"], ["y"], name="pick", axis=1)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, TOKENS])],
                              [helper.make_tensor_value_info("y", TensorProto.INT64, [1, 2])],
                              [numpy_helper.from_array(np.array([0, 1], np.int64), "first")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(ModelError, match=r"INT64, which tpusim reads only as token ids.*pick reads it otherwise"):
        lower_model(model, "g.onnx")


def _class_token_model():
    """ViT's shape: tokens from a projection, a constant class token prepended, a learned position
    embedding added, LayerNorm, the class token selected (x[:, 0]), a classifier on it."""
    g = GraphBuilder((1, 5, 8), seed=3)
    h = g.node("MatMul", [g.input_name, g.weight((8, 8), 0.5)])
    cls = g.const((0.5 * g.rng.standard_normal((1, 1, 8))).astype(np.float32))
    tokens = g.node("Concat", [cls, h], axis=1)
    tokens = g.node("Add", [tokens, g.const((0.3 * g.rng.standard_normal((1, 6, 8))).astype(np.float32))])
    normed = g.node("LayerNormalization", [tokens, g.const(np.ones(8, np.float32)), g.const(np.zeros(8, np.float32))],
                    axis=-1)
    first = g.node("Gather", [normed, g.const(np.array(0, np.int64))], axis=1)
    return g.model(g.node("Gemm", [first, g.weight((4, 8))], transB=1), batch_dim=1)  # one class token: batch 1


def test_class_token_and_position_embedding_through_every_stage():
    graph = check_all_stages(_class_token_model(), (1, 5, 8), {"gather", "embedding"})
    assert [layer.op for layer in graph.layers] == ["gemm", "embedding", "concat", "embedding", "add", "layernorm",
                                                    "gather", "gemm"]
    select = graph.layers[6]
    assert select.axis == 1 and select.output_shape == (1, 8)


def test_selections_at_several_and_negative_indices():
    g = GraphBuilder((1, 4, 6), seed=4)
    h = g.node("MatMul", [g.input_name, g.weight((6, 6))])
    picked = g.node("Gather", [h, g.const(np.array([[2, 0], [-1, 1]], np.int64))], axis=2)  # (1, 4, 2, 2)
    graph = check_all_stages(g.model(g.node("Relu", [picked])), (1, 4, 6), {"gather"})
    assert graph.layers[1].output_shape == (1, 4, 2, 2)


def test_an_index_out_of_range_is_a_one_line_error():
    g = GraphBuilder((1, 4, 6))
    picked = g.node("Gather", [g.node("Relu", [g.input_name]), g.const(np.array([6], np.int64))], axis=2)
    with pytest.raises(ModelError, match="index out of range for an axis of size 6"):
        lower_model(g.model(picked), "g.onnx")
