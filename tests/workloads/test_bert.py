"""The BERT workloads: BERT-Base's published topology (counted, not built: it is built only by the
README's run), and bert_tiny built, checked against ONNX Runtime and run through the whole pipeline
on both weight paths of the attention's computed operands, with int64 token-id calibration data."""
from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from onnx_graphs import assert_add_differences_are_near_ties, onnxruntime_integers_exact
from op_checks import _check_against_ort

from tpusim import pipeline
from tpusim.cli import main
from tpusim.config import load_config
from tpusim.frontend import lower_model, run_reference
from tpusim.quant.export import export_qdq, quantized_name, with_outputs
from tpusim.quant.execute import run_layer
from tpusim.quant.stage import calibrate_and_quantize
from tpusim.workloads import WORKLOADS, save_model
from tpusim.workloads.bert import BERT_BASE, BERT_TINY, INPUT_IDS

TPU_V1 = "configs/tpu_v1.yaml"
FAST = {"quant.calibration_samples": 4}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    generated = WORKLOADS["bert_tiny"].build(0)
    path = save_model(generated.model, tmp_path_factory.mktemp("bert") / "bert_tiny.onnx")
    return generated, path


def test_bert_base_is_the_published_topology():
    # HuggingFace bert-base-uncased: 109,482,240 parameters, 590,592 of them in the pooler left out here.
    assert BERT_BASE.parameters() == 109_482_240 - 590_592
    assert (BERT_BASE.layers, BERT_BASE.hidden, BERT_BASE.heads, BERT_BASE.head_dim, BERT_BASE.sequence) == (
        12, 768, 12, 64, 128)
    assert BERT_BASE.macs() == 12 * (4 * 128 * 768**2 + 2 * 128 * 768 * 3072 + 2 * 128**2 * 768)
    assert WORKLOADS["bert_base"].input_shape == (1, 128) and WORKLOADS["bert_base"].input_dtype == "int64"


def test_bert_tiny_is_valid_onnx_that_onnxruntime_runs_as_the_generator_computed(tiny):
    generated, path = tiny
    model = generated.model
    onnx.checker.check_model(model, full_check=True)
    (graph_input,) = model.graph.input
    assert graph_input.name == INPUT_IDS and graph_input.type.tensor_type.elem_type == onnx.TensorProto.INT64
    floats = sum(t.dims[0] if len(t.dims) == 1 else int(np.prod(t.dims)) for t in model.graph.initializer
                 if t.data_type == onnx.TensorProto.FLOAT and t.dims)
    assert floats == BERT_TINY.parameters()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {INPUT_IDS: generated.sample_input})
    assert out.shape == (2, BERT_TINY.sequence, BERT_TINY.hidden)
    np.testing.assert_allclose(out, generated.sample_output, atol=1e-4 * float(np.ptp(generated.sample_output)))
    # Trained-like spread: attention scores of std ~2, no collapsed or exploding activations.
    stds = generated.activation_std
    assert 1.0 < stds["encoder.layer.0.attention.self.query"] < 2.0
    assert all(0.01 < s < 5.0 for s in stds.values()), stds


def test_bert_tiny_lowers_to_the_encoder_and_matches_onnxruntime(tiny):
    generated, _ = tiny
    graph = lower_model(generated.model, "bert_tiny.onnx", batch=1)
    ops = [layer.op for layer in graph.layers]
    assert {op: ops.count(op) for op in ("embedding", "gemm", "matmul", "softmax", "layernorm", "gelu", "unary")} == {
        "embedding": 3, "gemm": 12, "matmul": 4, "softmax": 2, "layernorm": 5, "gelu": 2, "unary": 0}
    ids = generated.sample_input[:1]
    (want,) = ort.InferenceSession(generated.model.SerializeToString(),
                                   providers=["CPUExecutionProvider"]).run(None, {INPUT_IDS: ids})
    np.testing.assert_allclose(run_reference(graph, ids)[graph.outputs[0]], want, atol=1e-4 * float(np.ptp(want)))


def test_bert_tiny_integers_are_onnxruntimes_on_our_qdq_export(tiny):
    generated, _ = tiny
    graph = lower_model(generated.model, "bert_tiny.onnx", batch=1)
    qgraph = calibrate_and_quantize(graph, generated.model, load_config(TPU_V1), None).qgraph
    ids = generated.sample_input[:1]
    # Every layer on ONNX Runtime's own integer inputs: within one LSB, at most 1 % of elements off...
    _check_against_ort(qgraph, ids, 1, 0.01, "bert_tiny")
    # ... and bit-exact except the softmax, the one float step (ORT's exp rounds a few outputs the other way), and
    # a residual add's near-ties (ORT adds in float32: an exact value that close to a boundary may round either way).
    tensors = [graph.input_name] + [layer.output for layer in graph.layers]
    exported = with_outputs(export_qdq(qgraph, graph), [quantized_name(t) for t in tensors])
    session = ort.InferenceSession(exported.SerializeToString(), providers=["CPUExecutionProvider"])
    results = dict(zip([o.name for o in session.get_outputs()], session.run(None, {INPUT_IDS: ids})))
    for ql in qgraph.layers:
        if ql.layer.op != "softmax" and onnxruntime_integers_exact(ql.layer.op):
            inputs = [results[quantized_name(n)] for n in ql.layer.inputs]
            ours, _ = run_layer(ql, inputs)
            theirs = results[quantized_name(ql.layer.output)]
            if ql.layer.op == "add":
                assert_add_differences_are_near_ties(ql, inputs, ours, theirs)
            else:
                np.testing.assert_array_equal(ours, theirs, err_msg=ql.name)


def test_bert_tiny_through_the_pipeline_on_both_weight_paths(tiny, tmp_path):
    _, path = tiny
    runs = {}
    for weight_path in ("host", "direct"):
        runs[weight_path] = pipeline.run(pipeline.RunOptions(
            config=TPU_V1, model=str(path), out_dir=tmp_path / weight_path, eval_samples=2,
            overrides={**FAST, "computed_weights.path": weight_path}))
    host, direct = (runs[p].summary for p in ("host", "direct"))
    assert host["macs"] == direct["macs"] == BERT_TINY.macs()
    assert direct["total_cycles"] < host["total_cycles"]
    layers = {t.name: t for t in runs["host"].evaluation.sim.layers}
    moved = sum(t.counts.host_weight_bytes for t in layers.values())
    assert moved == BERT_TINY.layers * 2 * BERT_TINY.sequence * BERT_TINY.hidden  # K^T and V of every layer
    assert sum(t.counts.host_weight_bytes for t in runs["direct"].evaluation.sim.layers) == 0
    # Integer fidelity, per layer and at the output: Q, K, V, attention probabilities, LayerNorm and GELU outputs
    # all run on their own int8 grids.
    fidelity = host["fidelity"]
    assert fidelity["output_sqnr_db"] > 20 and fidelity["cosine"] > 0.99
    sqnr = runs["host"].evaluation.quant.fidelity.layer_sqnr_db
    for op in ("matmul", "softmax", "layernorm", "gelu", "embedding"):
        values = [sqnr[t.name] for t in layers.values() if t.op == op]
        assert values and min(values) > 12, (op, values)
    assert host["calibration"]["synthetic"] and "token ids" in host["calibration"]["source"]


def test_token_id_calibration_data_through_the_cli(tiny, tmp_path, capsys):
    _, path = tiny
    ids = tmp_path / "ids.npy"
    np.save(ids, np.random.default_rng(0).integers(0, BERT_TINY.vocab, (6, BERT_TINY.sequence)))
    out = tmp_path / "out"
    assert main(["run", TPU_V1, "--model", str(path), "--calib-data", str(ids), "--out", str(out), "--no-progress",
                 "--eval-samples", "2", "--set", "quant.calibration_samples=4"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert not summary["calibration"]["synthetic"] and str(ids) in summary["calibration"]["source"]
    floats = tmp_path / "floats.npy"
    np.save(floats, np.zeros((6, BERT_TINY.sequence), np.float32))
    capsys.readouterr()
    assert main(["run", TPU_V1, "--model", str(path), "--calib-data", str(floats), "--out", str(out),
                 "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "token ids" in err[0] and "Traceback" not in err[0]
