"""Cross-layer equalization: same FP32 function where exact, evened-out channel ranges, ReLU6 policies."""
from __future__ import annotations

import math

import numpy as np
import pytest

from tpusim.frontend import lower_model, run_reference
from tpusim.ir import NO_ACTIVATION, Activation, ConvAttrs, Graph, Layer
from tpusim.quant.equalization import (
    equalizable_pairs,
    equalize,
    equalize_with_report,
    input_channel_ranges,
    output_channel_ranges,
    range_spread,
)
from tpusim.workloads import build_model

RELU = Activation("relu", 0.0, math.inf)
RELU6 = Activation("clip", 0.0, 6.0)


def _conv(name: str, x: str, weight: np.ndarray, bias: np.ndarray, groups: int, activation: Activation,
          shape: tuple[int, ...]) -> Layer:
    k = weight.shape[2]
    attrs = ConvAttrs((k, k), (1, 1), (k // 2,) * 4, (1, 1), groups)
    return Layer(name=name, op="conv", inputs=(x,), output=name, input_shapes=(shape,),
                 output_shape=(shape[0], weight.shape[0], shape[2], shape[3]), activation=activation,
                 weight=weight, bias=bias, conv=attrs)


def _chain(first_activation: Activation, second_activation: Activation = RELU, bias_std: float = 1.0) -> Graph:
    """pointwise (8 -> 16) -> depthwise 3x3 (16) -> pointwise (16 -> 4), with channel ranges spread 1000x."""
    rng = np.random.default_rng(0)
    spread = np.logspace(-1.5, 1.5, 16).astype(np.float32)
    rng.shuffle(spread)
    shape = (2, 8, 6, 6)
    w1 = (rng.standard_normal((16, 8, 1, 1)) * spread.reshape(-1, 1, 1, 1)).astype(np.float32)
    w2 = (rng.standard_normal((16, 1, 3, 3)) / spread.reshape(-1, 1, 1, 1)).astype(np.float32)
    w3 = rng.standard_normal((4, 16, 1, 1)).astype(np.float32)
    b1, b2, b3 = (bias_std * rng.standard_normal(n).astype(np.float32) for n in (16, 16, 4))
    layers = (
        _conv("pw1", "x", w1, b1, 1, first_activation, shape),
        _conv("dw", "pw1", w2, b2, 16, second_activation, (2, 16, 6, 6)),
        _conv("pw2", "dw", w3, b3, 1, NO_ACTIVATION, (2, 16, 6, 6)),
    )
    return Graph("chain", "x", shape, ("pw2",), layers)


def _input(graph: Graph) -> np.ndarray:
    return np.random.default_rng(1).standard_normal(graph.input_shape).astype(np.float32)


def test_relu_chain_keeps_the_function_and_evens_the_ranges() -> None:
    graph = _chain(RELU)
    equalized, pairs = equalize_with_report(graph)
    assert [(p.first, p.second) for p in pairs] == [("pw1", "dw"), ("dw", "pw2")]
    x = _input(graph)
    np.testing.assert_allclose(run_reference(equalized, x)["pw2"], run_reference(graph, x)["pw2"], rtol=1e-5, atol=1e-5)
    before = {l.name: range_spread(l.weight) for l in graph.layers}
    after = {l.name: range_spread(l.weight) for l in equalized.layers}
    assert before["pw1"] > 10 and before["dw"] > 10
    assert after["pw1"] < before["pw1"] / 5 and after["dw"] < before["dw"] / 5
    # At convergence, each channel of the middle layer has the geometric mean range of its two neighbours.
    dw = equalized.layers[1]
    r_in = output_channel_ranges(equalized.layers[0].weight)
    r_out = input_channel_ranges(equalized.layers[2])
    np.testing.assert_allclose(output_channel_ranges(dw.weight) ** 2, r_in * r_out, rtol=1e-3)
    assert all(l.activation == g.activation for l, g in zip(equalized.layers, graph.layers))


def test_relu6_pairs_are_skipped_by_default_and_exact() -> None:
    graph = _chain(RELU6, RELU6)
    assert equalizable_pairs(graph) == []
    x = _input(graph)
    np.testing.assert_array_equal(run_reference(equalize(graph), x)["pw2"], run_reference(graph, x)["pw2"])


def test_relu6_to_relu_policy_replaces_the_clip_and_is_exact_only_below_six() -> None:
    graph = _chain(RELU6, RELU6, bias_std=0.0)
    equalized, pairs = equalize_with_report(graph, relu6="to_relu")
    assert [p.relu6_replaced for p in pairs] == [True, True]
    assert [l.activation.label for l in equalized.layers] == ["relu", "relu", "none"]
    x = _input(graph) * 0.01  # pre-activations stay far below 6: the swap changes nothing
    np.testing.assert_allclose(run_reference(equalized, x)["pw2"], run_reference(graph, x)["pw2"], rtol=1e-4, atol=1e-5)
    big = _input(graph) * 100.0
    assert not np.allclose(run_reference(equalized, big)["pw2"], run_reference(graph, big)["pw2"], rtol=1e-3)


def test_shared_tensors_and_non_homogeneous_activations_block_a_pair() -> None:
    graph = _chain(Activation("clip", -1.0, 1.0))
    assert [(p.first, p.second) for p in equalizable_pairs(graph)] == [("dw", "pw2")]
    tiny = lower_model(build_model("tiny_cnn"), "tiny_cnn")
    outputs = {layer.name: layer.output for layer in tiny.layers}
    pairs = equalizable_pairs(tiny, relu6="to_relu")
    assert pairs  # the depthwise -> pointwise pair of its block
    for pair in pairs:
        assert sum(outputs[pair.first] in layer.inputs for layer in tiny.layers) == 1


def test_dead_channels_keep_scale_one() -> None:
    graph = _chain(RELU)
    first = graph.layers[0]
    w1 = first.weight.copy()
    w1[3] = 0.0
    dead = Graph("dead", "x", graph.input_shape, graph.outputs,
                 (Layer(**{**first.__dict__, "weight": w1}),) + graph.layers[1:])
    equalized = equalize(dead)
    assert np.all(equalized.layers[0].weight[3] == 0)
    assert all(np.all(np.isfinite(l.weight)) and np.all(np.isfinite(l.bias)) for l in equalized.layers)
    x = _input(dead)
    np.testing.assert_allclose(run_reference(equalized, x)["pw2"], run_reference(dead, x)["pw2"], rtol=1e-5, atol=1e-5)


def test_on_the_pretrained_network_skip_is_exact_and_spread_drops_with_to_relu() -> None:
    from tpusim.errors import ModelError

    try:
        model = build_model("efficientnet_lite0")
    except ModelError as exc:
        pytest.skip(str(exc))
    graph = lower_model(model, "efficientnet_lite0", batch=1, input_shape=(1, 3, 64, 64))
    x = np.random.default_rng(0).standard_normal(graph.input_shape).astype(np.float32)
    skipped = equalize(graph)
    np.testing.assert_allclose(run_reference(skipped, x)["output"], run_reference(graph, x)["output"], rtol=1e-4,
                               atol=1e-4)
    to_relu = equalize(graph, relu6="to_relu")
    depthwise = [i for i, l in enumerate(graph.layers) if l.op == "conv" and l.conv.groups > 1]
    before = np.median([range_spread(graph.layers[i].weight) for i in depthwise])
    after = np.median([range_spread(to_relu.layers[i].weight) for i in depthwise])
    print(f"median depthwise range spread (max/median channel range): {before:.1f} -> {after:.1f}")
    assert after < before / 2
