"""Real exporter output through tpusim: every corpus model (torch.onnx.export, both exporters, opsets
9 to 18), ONNX Runtime-quantized QDQ copies, and the MLPerf Tiny models converted by tflite2onnx.

The corpus graphs are exactly what the exporters wrote (``tests/data/corpus/README.md``), with
seeded weights (``tests/corpus.py``). Each model is lowered and its FP32 reference checked against
ONNX Runtime on the original graph; each runs through the whole pipeline (calibration, integer
execution, fidelity, timing, energy, rescale twin) with a small calibration and evaluation set to
keep the suite fast; a few run the default command through the CLI. ``benchmarks/real_models.py``
runs the default command on all of them.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import corpus
from tpusim import pipeline
from tpusim.cli import main
from tpusim.frontend import load_onnx, lower_model, run_reference
from tpusim.frontend.canonical import load_model
from tpusim.report import figure_worker

from op_checks import assert_layers_match, ort_qdq_integers

TPU_V1 = "configs/tpu_v1.yaml"
FAST = {"quant.calibration_samples": 2}


def _ort(path: Path, x: np.ndarray) -> np.ndarray:
    """ONNX Runtime's output on the file as written (it maps a dynamo export's external data; handing it the
    serialised model copied VGG's 0.5 GB twice)."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


class _WorkerFigures(figure_worker.FigureRenderer):
    def __init__(self, background: bool = True):
        super().__init__(background)


def _figures_as_the_command_draws_them(monkeypatch, name: str) -> None:
    """A run of a network of hundreds of nodes draws its figures (a bar or point per layer: seconds) in a worker
    process, on the other core while it quantizes, as a command-line run does (it starts without matplotlib);
    the test session has imported matplotlib for other tests, so the run would draw them itself, after the
    rest. A smaller network's figures take less time than a worker takes to start."""
    if len(onnx.load(str(corpus.entry(name).path), load_external_data=False).graph.node) >= 200:  # weights stripped
        monkeypatch.setattr(figure_worker, "FigureRenderer", _WorkerFigures)  # the command line's
        monkeypatch.setattr(pipeline, "FigureRenderer", _WorkerFigures)       # pipeline.run's own


@pytest.fixture(scope="module", params=[e.name for e in corpus.CORPUS])
def exported(request):
    """(entry, path of the filled model as the exporter lays it out: external data for dynamo; filled once per
    machine, ``corpus.saved_model``)."""
    return corpus.entry(request.param), corpus.saved_model(request.param)


def test_fp32_reference_matches_onnxruntime(exported):
    entry, path = exported
    assert not any(corpus.is_stripped(t) for t in load_model(path).graph.initializer)
    graph = load_onnx(path)  # from the file, as a run lowers it (not a copy of a model in memory)
    x = corpus.sample_input(entry, 3)  # N(0, 1), or token ids for an encoder
    expected = _ort(path, x)
    # the seeded weights compute: 1000 ImageNet logits, a sequence model's 10 outputs of its last step, or an
    # encoder's last hidden state (one vector per token)
    if entry.task == "encoder":
        assert expected.shape[:2] == entry.input_shape and expected.ndim == 3
    else:
        assert expected.shape == ((1, 1000) if entry.task == "classification" else (1, 10))
    assert 1e-3 < float(expected.std()) < 1e3
    ours = run_reference(graph, x)[graph.outputs[0]]
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-4 * float(np.ptp(expected)))


# The stages after the front end see the same layer ops whichever exporter wrote a file (the FP32 test
# above lowers every file); one export per architecture keeps the suite within its time budget.
@pytest.mark.parametrize("name", [e.name for e in corpus.CORPUS if e.exporter == "torchscript" and e.opset == 17])
def test_whole_pipeline_runs(name, tmp_path, monkeypatch):
    _figures_as_the_command_draws_them(monkeypatch, name)
    path = corpus.saved_model(name)
    result = pipeline.run(pipeline.RunOptions(config=TPU_V1, model=str(path), out_dir=tmp_path / "out",
                                              overrides=FAST, eval_samples=1))
    s = result.summary
    assert s["macs"] > 0 and s["total_cycles"] > 0 and s["energy"]["dynamic_pj"] > 0
    assert np.isfinite(s["fidelity"]["output_sqnr_db"])
    assert {p.name for p in result.files} >= {"layers.csv", "summary.json", "energy.csv", "rescale.csv"}


@pytest.mark.parametrize("name", ["resnet50_dynamo18", "lstm2_dynamo18", "lstm_bidir_ts17", "gru_ts17",
                                  "lstm2_ts17", "lstm_bidir_dynamo18", "gru_dynamo18",
                                  "bert_dynamo18", "vit_b_16_dynamo18"])
def test_default_command(name, tmp_path, monkeypatch):
    _figures_as_the_command_draws_them(monkeypatch, name)
    # ViT-B/16 is 17.6 GMAC a sample: the default 16 evaluation samples through our FP32 reference would take
    # most of a minute, and calibrating on the default 32 (ONNX Runtime with every tensor exposed, one sample a
    # run, then the histograms) was half of the 40 s left. How many there are changes no code path (2 still merge
    # histograms across runs) and the other models here run the default counts, so it takes 2 of each.
    vit = name.startswith("vit")
    counts = ["--eval-samples", "2", "--set", "quant.calibration_samples=2"] if vit else []
    path = corpus.saved_model(name)
    assert main(["run", TPU_V1, "--model", str(path), "--out", str(tmp_path / "out"), "--no-progress",
                 *counts]) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert (summary["calibration"]["samples"], summary["fidelity"]["samples"]) == ((2, 2) if vit else (32, 16))


@pytest.mark.parametrize("name,per_channel,activations",
                         [("resnet18_ts17", True, "uint8"), ("mobilenet_v2_ts17", False, "uint8"),
                          ("squeezenet1_0_dynamo18", True, "int8")])
def test_onnxruntime_quantized_copy_runs_on_its_own_integers(name, per_channel, activations, tmp_path):
    float_model = onnx.load(str(corpus.saved_model(name)))
    path = corpus.ort_qdq_copy(float_model, tmp_path / "qdq.onnx", per_channel=per_channel,
                               activation_type=activations, symmetric_activations=activations == "int8")
    result = pipeline.run(pipeline.RunOptions(config=TPU_V1, model=str(path), out_dir=tmp_path / "out",
                                              eval_samples=1))
    assert result.summary["calibration"]["quantization_source"] == "model"
    qgraph = result.evaluation.quant.qgraph
    x = np.random.default_rng(0).standard_normal(corpus.entry(name).input_shape).astype(np.float32)
    assert_layers_match(qgraph, ort_qdq_integers(path, x))


@pytest.mark.parametrize("name", ["pretrainedResnet", "vww_96_float"])
def test_mlperf_tiny_via_tflite2onnx(name, tmp_path):
    path = corpus.mlperf_tiny_onnx(name, tmp_path)
    model = load_model(path)
    graph = lower_model(model, str(path))
    shape = [d.dim_value or 1 for d in model.graph.input[0].type.tensor_type.shape.dim]
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    expected = _ort(path, x)
    np.testing.assert_allclose(run_reference(graph, x)[graph.outputs[0]], expected, rtol=0,
                               atol=1e-4 * float(np.ptp(expected)))
    result = pipeline.run(pipeline.RunOptions(config=TPU_V1, model=str(path), out_dir=tmp_path / "out"))
    assert result.summary["total_cycles"] > 0
