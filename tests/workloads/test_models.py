"""Built-in workloads: torchvision-exact topology counts, valid ONNX that ONNX Runtime runs and
agrees with the generator's own numpy pass, trained-net-like weight statistics, and the cache."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper, shape_inference

import tpusim
import tpusim.workloads as workloads
from tpusim.errors import ModelError
from tpusim.workloads import WORKLOADS, GENERATOR_VERSION, build_model, default_cache_dir, save_model, workload_file
from tpusim.workloads.builder import BATCH_DIM, BN_EPSILON, INPUT_NAME, IR_VERSION, OPSET, OUTPUT_NAME, GeneratedModel

NAMES = [name for name, w in WORKLOADS.items() if w.input_dtype == "float32"]  # the BERTs: tests/workloads/test_bert.py
CNN_NAMES = ["resnet50", "resnet18", "mobilenet_v2", "tiny_cnn"]

# torchvision's sum(p.numel() for p in model.parameters()).
TORCHVISION_PARAMS = {"resnet50": 25_557_032, "resnet18": 11_689_512, "mobilenet_v2": 3_504_872}
# 4,089,184,256 is the published ResNet-50 figure; the other two are the same count for the
# torchvision topologies (1.81 GMAC, 300.8 MMAC as commonly quoted).
CONV_FC_MACS = {"resnet50": 4_089_184_256, "resnet18": 1_814_073_344, "mobilenet_v2": 300_774_272}


class Built:
    """One generated model per workload per test session (the one other modules read), saved to a temporary
    folder."""

    def __init__(self, folder: Path, generated_workload: Callable[[str], GeneratedModel]) -> None:
        self._folder = folder
        self._generated = generated_workload
        self._cache: dict[str, tuple[GeneratedModel, Path, ort.InferenceSession]] = {}

    def get(self, name: str) -> tuple[GeneratedModel, Path, ort.InferenceSession]:
        if name not in self._cache:
            generated = self._generated(name)
            path = save_model(generated.model, self._folder / f"{name}.onnx")
            session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            self._cache[name] = (generated, path, session)
        return self._cache[name]


@pytest.fixture(scope="session")
def built(tmp_path_factory: pytest.TempPathFactory, generated_workload: Callable[[str], GeneratedModel]) -> Built:
    return Built(tmp_path_factory.mktemp("workloads"), generated_workload)


def _initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def _trainable_params(model: onnx.ModelProto) -> int:
    """Conv weights, BN gamma/beta, Gemm weight+bias: what torch counts as parameters."""
    inits = _initializers(model)
    trainable_inputs = {"Conv": (1, 2), "BatchNormalization": (1, 2), "Gemm": (1, 2)}
    total = 0
    for node in model.graph.node:
        for position in trainable_inputs.get(node.op_type, ()):
            if position < len(node.input):
                total += inits[node.input[position]].size
    return total


def _conv_fc_macs(model: onnx.ModelProto) -> int:
    """MACs per image from ONNX shape inference and weight shapes only."""
    inferred = shape_inference.infer_shapes(model, strict_mode=True)
    spatial = {
        v.name: [d.dim_value for d in v.type.tensor_type.shape.dim[2:]]
        for v in [*inferred.graph.value_info, *inferred.graph.output]
    }
    inits = _initializers(model)
    macs = 0
    for node in model.graph.node:
        if node.op_type == "Conv":
            out_h, out_w = spatial[node.output[0]]
            macs += inits[node.input[1]].size * out_h * out_w
        elif node.op_type == "Gemm":
            macs += inits[node.input[1]].size
    return macs


def _nodes(model: onnx.ModelProto, op_type: str) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.op_type == op_type]


def _group(node: onnx.NodeProto) -> int:
    return next((a.i for a in node.attribute if a.name == "group"), 1)


def _channel_spread(weight: np.ndarray) -> float:
    per_channel_max = np.abs(weight.reshape(weight.shape[0], -1)).max(axis=1)
    return float(per_channel_max.max() / per_channel_max.min())


# ---- topology -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(TORCHVISION_PARAMS))
def test_param_count_matches_torchvision(built: Built, name: str) -> None:
    assert _trainable_params(built.get(name)[0].model) == TORCHVISION_PARAMS[name]


def test_mlp_and_tiny_cnn_param_counts(built: Built) -> None:
    assert _trainable_params(built.get("mlp")[0].model) == 5 * (2048 * 2048 + 2048)
    # stem, depthwise, pointwise, strided, two 1x1 branches (each conv + BN gamma/beta), fc.
    tiny = (3 * 16 * 9 + 32) + (16 * 9 + 32) + (16 * 16 + 32) + (16 * 32 * 9 + 64) + 2 * (32 * 16 + 32) + (32 * 10 + 10)
    assert _trainable_params(built.get("tiny_cnn")[0].model) == tiny < 50_000


@pytest.mark.parametrize("name", list(CONV_FC_MACS))
def test_conv_fc_macs_from_shape_inference(built: Built, name: str) -> None:
    assert _conv_fc_macs(built.get(name)[0].model) == CONV_FC_MACS[name]


def test_resnet50_is_v1_5_with_bn_after_every_bias_free_conv(built: Built) -> None:
    model = built.get("resnet50")[0].model
    convs = _nodes(model, "Conv")
    assert len(convs) == 53 and len(_nodes(model, "BatchNormalization")) == 53
    assert all(len(c.input) == 2 for c in convs)
    strides = {c.name: next(a.ints for a in c.attribute if a.name == "strides")[0] for c in convs}
    assert strides["layer2.0.conv1"] == 1 and strides["layer2.0.conv2"] == 2
    assert strides["layer2.0.downsample.0"] == 2
    consumers = {i: n.op_type for n in model.graph.node for i in n.input}
    assert all(consumers[c.output[0]] == "BatchNormalization" for c in convs)
    assert [n.op_type for n in model.graph.node[-4:]] == ["Relu", "GlobalAveragePool", "Flatten", "Gemm"]
    maxpool = _nodes(model, "MaxPool")[0]
    assert {a.name: list(a.ints) for a in maxpool.attribute} == {
        "kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]
    }


def test_mobilenet_v2_uses_depthwise_convs_and_relu6_clip(built: Built) -> None:
    model = built.get("mobilenet_v2")[0].model
    inits = _initializers(model)
    depthwise = [c for c in _nodes(model, "Conv") if _group(c) > 1]
    assert len(depthwise) == 17
    assert all(inits[c.input[1]].shape[1] == 1 and _group(c) == inits[c.input[1]].shape[0] for c in depthwise)
    clips = _nodes(model, "Clip")
    assert len(clips) == 35
    bounds = {(inits[c.input[1]].shape, float(inits[c.input[1]]), float(inits[c.input[2]])) for c in clips}
    assert bounds == {((), 0.0, 6.0)}
    assert len(_nodes(model, "Add")) == 10


def test_tiny_cnn_exercises_every_lowered_op(built: Built) -> None:
    ops = {n.op_type for n in built.get("tiny_cnn")[0].model.graph.node}
    assert ops == {
        "Conv", "BatchNormalization", "Relu", "Clip", "MaxPool", "AveragePool", "Add", "Concat",
        "GlobalAveragePool", "Flatten", "Gemm", "Softmax",
    }
    model = built.get("tiny_cnn")[0].model
    assert any(_group(c) > 1 for c in _nodes(model, "Conv"))
    assert any(next(a.ints for a in c.attribute if a.name == "strides")[0] == 2 for c in _nodes(model, "Conv"))


# ---- validity and execution -------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_onnx_checker_and_io_signature(built: Built, name: str) -> None:
    model = built.get(name)[0].model
    onnx.checker.check_model(model, full_check=True)
    assert model.ir_version == IR_VERSION
    assert [(o.domain, o.version) for o in model.opset_import] == [("", OPSET)]
    (graph_input,) = model.graph.input
    dims = graph_input.type.tensor_type.shape.dim
    assert graph_input.name == INPUT_NAME and dims[0].dim_param == BATCH_DIM
    assert (1, *[d.dim_value for d in dims[1:]]) == WORKLOADS[name].input_shape
    assert graph_input.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert [o.name for o in model.graph.output] == [OUTPUT_NAME]


@pytest.mark.parametrize("name", NAMES)
def test_onnxruntime_batch1_matches_numpy_pass(built: Built, name: str) -> None:
    generated, _, session = built.get(name)
    image = generated.sample_input[:1]
    assert image.shape == WORKLOADS[name].input_shape
    (out,) = session.run(None, {INPUT_NAME: image})
    expected = generated.sample_output[:1]
    assert out.shape == expected.shape and np.isfinite(out).all()
    assert np.abs(out - expected).max() <= 1e-2 * expected.std()
    assert out.std() > 0.05 and np.unique(out).size > out.size // 4


def test_onnxruntime_whole_sample_batch_matches_numpy_pass(built: Built) -> None:
    for name in NAMES:
        generated, _, session = built.get(name)
        (out,) = session.run(None, {INPUT_NAME: generated.sample_input})
        np.testing.assert_allclose(out, generated.sample_output, rtol=0, atol=1e-2 * generated.sample_output.std())


def test_tiny_cnn_runs_at_batch3(built: Built) -> None:
    generated, _, session = built.get("tiny_cnn")
    (probs,) = session.run(None, {INPUT_NAME: generated.sample_input[:3]})
    assert probs.shape == (3, 10)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    assert (probs.max(axis=1) < 0.99).all() and (probs.max(axis=1) > 0.15).all()
    np.testing.assert_allclose(probs, generated.sample_output[:3], atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_activations_neither_explode_nor_vanish(built: Built, name: str) -> None:
    stds = built.get(name)[0].activation_std
    assert len(stds) > 3
    assert all(np.isfinite(s) and 0.05 < s < 20.0 for s in stds.values()), stds


# ---- weight statistics ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", CNN_NAMES)
def test_per_channel_weight_spread_in_every_conv(built: Built, name: str) -> None:
    model = built.get(name)[0].model
    inits = _initializers(model)
    spreads = [_channel_spread(inits[c.input[1]]) for c in _nodes(model, "Conv")]
    assert min(spreads) >= 10.0


def test_mlp_rows_spread_too(built: Built) -> None:
    model = built.get("mlp")[0].model
    inits = _initializers(model)
    assert min(_channel_spread(inits[g.input[1]]) for g in _nodes(model, "Gemm")) >= 10.0


def _folded_spreads(model: onnx.ModelProto, depthwise: bool) -> list[float]:
    inits = _initializers(model)
    producer = {n.output[0]: n for n in model.graph.node}
    spreads = []
    for bn in _nodes(model, "BatchNormalization"):
        conv = producer[bn.input[0]]
        if (_group(conv) > 1) != depthwise:
            continue
        gamma, _, _, var = (inits[i] for i in bn.input[1:])
        folded = inits[conv.input[1]] * (gamma / np.sqrt(var + BN_EPSILON))[:, None, None, None]
        spreads.append(_channel_spread(folded))
    return spreads


def test_folded_depthwise_weights_spread_far_more_than_ordinary_convs(built: Built) -> None:
    """Per-tensor int8 must fail on MobileNet-v2's depthwise layers and work on ResNet-50."""
    depthwise = _folded_spreads(built.get("mobilenet_v2")[0].model, depthwise=True)
    ordinary = _folded_spreads(built.get("resnet50")[0].model, depthwise=False)
    assert min(depthwise) >= 50.0
    assert 3.0 < float(np.median(ordinary)) < 30.0


@pytest.mark.parametrize("name", CNN_NAMES)
def test_bn_statistics_are_not_identity(built: Built, name: str) -> None:
    model = built.get(name)[0].model
    inits = _initializers(model)
    for bn in _nodes(model, "BatchNormalization"):
        gamma, beta, mean, var = (inits[i] for i in bn.input[1:])
        assert (var > 0).all()
        assert np.abs(mean).max() > 1e-3 and np.abs(np.log(var)).max() > 0.1
        assert gamma.std() > 0.05 and beta.std() > 0.01


def test_same_seed_is_deterministic_and_other_seed_differs() -> None:
    first = build_model("tiny_cnn", seed=3).SerializeToString()
    assert build_model("tiny_cnn", seed=3).SerializeToString() == first
    assert build_model("tiny_cnn", seed=4).SerializeToString() != first


# ---- cache and API ---------------------------------------------------------------------------------


def test_cache_serves_the_same_file_and_rebuilds_for_another_seed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(workloads.CACHE_ENV_VAR, str(tmp_path))
    builds: list[tuple[str, int]] = []
    real_build = workloads.build_model

    def counting_build(name: str, seed: int = 0) -> onnx.ModelProto:
        builds.append((name, seed))
        return real_build(name, seed)

    monkeypatch.setattr(workloads, "build_model", counting_build)
    path = workload_file("tiny_cnn")
    assert path.parent == tmp_path and "seed0" in path.name and f"gen{GENERATOR_VERSION}" in path.name
    stamp = path.stat().st_mtime_ns
    assert workload_file("tiny_cnn") == path and path.stat().st_mtime_ns == stamp
    assert builds == [("tiny_cnn", 0)]
    other = workload_file("tiny_cnn", seed=1)
    assert other != path and builds == [("tiny_cnn", 0), ("tiny_cnn", 1)]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([path.name, other.name])  # no temp files left
    onnx.checker.check_model(onnx.load(str(other)))


def test_explicit_cache_dir_wins_over_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(workloads.CACHE_ENV_VAR, str(tmp_path / "env"))
    path = workload_file("tiny_cnn", seed=2, cache_dir=tmp_path / "explicit")
    assert path.parent == tmp_path / "explicit" and path.exists()
    assert not (tmp_path / "env").exists()


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(workloads.CACHE_ENV_VAR, str(tmp_path))
    assert default_cache_dir() == tmp_path
    monkeypatch.delenv(workloads.CACHE_ENV_VAR)
    checkout = Path(tpusim.__file__).resolve().parents[1] / "workloads"
    expected = checkout if checkout.is_dir() else Path.home() / ".cache" / "tpusim" / "workloads"
    assert default_cache_dir() == expected


def test_save_model_replaces_atomically(tmp_path: Path) -> None:
    small = build_model("tiny_cnn")
    path = save_model(small, tmp_path / "sub" / "m.onnx")
    save_model(small, path)
    assert [p.name for p in path.parent.iterdir()] == ["m.onnx"]
    assert onnx.load(str(path)).SerializeToString() == small.SerializeToString()


@pytest.mark.parametrize("call", [lambda: build_model("resnet51"), lambda: workload_file("resnet51")])
def test_unknown_workload_is_a_one_line_model_error(call) -> None:
    with pytest.raises(ModelError) as excinfo:
        call()
    message = str(excinfo.value)
    assert "\n" not in message and "resnet51" in message
    assert all(name in message for name in NAMES)


def test_a_cached_workload_is_found_without_importing_any_generator(tmp_path: Path) -> None:
    # The generators pull in Numba (BERT's also the ops it computes with); a run of a cached file needs none.
    import subprocess
    import sys

    save_model(build_model("tiny_cnn"), tmp_path / workloads.workload_file_name("tiny_cnn"))
    code = ("import sys, pathlib, tpusim.workloads as w\n"
            f"print(w.workload_file('tiny_cnn', cache_dir=pathlib.Path({str(tmp_path)!r})).parent)\n"
            "print(sorted(m for m in sys.modules if m.startswith('tpusim.workloads.') or m in ('numba', 'tpusim.ops')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:2] == [str(tmp_path), "[]"]

def test_the_bert_input_shapes_are_the_generators_sequence() -> None:
    from tpusim.workloads.bert import BERT_BASE, BERT_TINY

    assert WORKLOADS["bert_base"].input_shape == (1, BERT_BASE.sequence)
    assert WORKLOADS["bert_tiny"].input_shape == (1, BERT_TINY.sequence)
