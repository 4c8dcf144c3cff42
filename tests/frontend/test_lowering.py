"""Every lowering, checked numerically against ONNX Runtime on the original (unfolded) graph."""
from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
from onnx_graphs import GraphBuilder, run_onnxruntime

from tpusim.errors import ModelError
from tpusim.frontend import lower_model, run_reference


def _check_against_ort(model: onnx.ModelProto, input_shape, batch: int = 1, seed: int = 1):
    graph = lower_model(model, "test.onnx", batch=batch)
    x = np.random.default_rng(seed).standard_normal((batch, *input_shape[1:])).astype(np.float32)
    expected = run_onnxruntime(model, x)
    got = run_reference(graph, x)
    for name, want in zip(graph.outputs, expected):
        have = got[name]
        assert have.shape == want.shape
        span = float(want.max() - want.min()) or 1.0
        np.testing.assert_allclose(have, want, rtol=0, atol=1e-4 * span + 1e-6)
    return graph


def _conv_case(**attrs):
    def build():
        b = GraphBuilder((1, 4, 11, 9))
        y = b.conv("input", 4, 6, k=3, group=attrs.pop("group", 1), **attrs)
        return b.model(y)
    return build


CONV_CASES = {
    "plain": dict(pads=[1, 1, 1, 1]),
    "stride2_asym_pads": dict(strides=[2, 2], pads=[1, 0, 2, 1]),
    "dilated": dict(dilations=[2, 2], pads=[2, 2, 2, 2]),
    "grouped": dict(group=2, pads=[1, 1, 1, 1]),
    "same_upper": dict(auto_pad="SAME_UPPER", strides=[2, 2]),
    "same_lower": dict(auto_pad="SAME_LOWER", strides=[2, 2]),
    "valid": dict(auto_pad="VALID"),
}


@pytest.mark.parametrize("case", sorted(CONV_CASES))
def test_conv_variants_match_onnxruntime(case):
    graph = _check_against_ort(_conv_case(**dict(CONV_CASES[case]))(), (1, 4, 11, 9), batch=2)
    (layer,) = graph.layers
    assert layer.op == "conv"
    gemm = layer.gemm
    _, c_out, h_out, w_out = layer.output_shape
    assert gemm.m == 2 * h_out * w_out and gemm.n * gemm.groups == c_out
    assert gemm.k == (4 // layer.conv.groups) * 9


def test_depthwise_conv_is_one_group_per_channel():
    b = GraphBuilder((1, 8, 10, 10))
    y = b.conv("input", 8, 8, k=3, group=8, pads=[1, 1, 1, 1])
    graph = _check_against_ort(b.model(y), (1, 8, 10, 10))
    gemm = graph.layers[0].gemm
    assert (gemm.m, gemm.k, gemm.n, gemm.groups) == (100, 9, 1, 8)
    assert graph.layers[0].macs == 100 * 9 * 8


def test_batchnorm_folds_into_conv_and_matches_onnxruntime():
    b = GraphBuilder((1, 3, 8, 8))
    y = b.batchnorm(b.conv("input", 3, 5, bias=False, pads=[1, 1, 1, 1]), 5)
    graph = _check_against_ort(b.model(y), (1, 3, 8, 8), batch=2)
    assert [layer.op for layer in graph.layers] == ["conv"]
    assert graph.layers[0].bias is not None


def test_batchnorm_folds_into_gemm():
    b = GraphBuilder((1, 6))
    y = b.node("Gemm", ["input", b.weight((6, 4))])
    y = b.node("BatchNormalization", [y] + [b.const(v.astype(np.float32)) for v in
                                            (np.full(4, 1.5), np.full(4, 0.2), np.arange(4.0), np.full(4, 2.0))])
    graph = _check_against_ort(b.model(y), (1, 6), batch=3)
    assert [layer.op for layer in graph.layers] == ["gemm"]


@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_transpose_alpha_beta(trans_b):
    b = GraphBuilder((1, 5))
    w = b.weight((7, 5) if trans_b else (5, 7))
    y = b.node("Gemm", ["input", w, b.const(np.arange(7, dtype=np.float32))], transB=trans_b, alpha=0.5, beta=2.0)
    graph = _check_against_ort(b.model(y), (1, 5), batch=4)
    gemm = graph.layers[0].gemm
    assert (gemm.m, gemm.k, gemm.n) == (4, 5, 7)


def test_matmul_plus_constant_add_becomes_gemm_with_bias():
    b = GraphBuilder((1, 5))
    y = b.node("MatMul", ["input", b.weight((5, 3))])
    y = b.node("Add", [y, b.const(np.array([1.0, -2.0, 3.0], np.float32))])
    graph = _check_against_ort(b.model(y), (1, 5), batch=2)
    assert [layer.op for layer in graph.layers] == ["gemm"]
    np.testing.assert_array_equal(graph.layers[0].bias, [1.0, -2.0, 3.0])


def test_relu_and_relu6_fuse_into_producer():
    b = GraphBuilder((1, 3, 6, 6))
    y = b.node("Relu", [b.conv("input", 3, 4, pads=[1, 1, 1, 1])])
    y = b.node("Clip", [b.conv(y, 4, 4, k=1), b.const(np.float32(0.0)), b.const(np.float32(6.0))])
    graph = _check_against_ort(b.model(y), (1, 3, 6, 6))
    assert [(layer.op, layer.activation.label) for layer in graph.layers] == [("conv", "relu"), ("conv", "relu6")]


def test_relu_stays_separate_when_its_input_has_another_reader():
    b = GraphBuilder((1, 2, 5, 5))
    c = b.conv("input", 2, 2, pads=[1, 1, 1, 1])
    y = b.node("Add", [b.node("Relu", [c]), c])
    graph = _check_against_ort(b.model(y), (1, 2, 5, 5))
    assert [layer.op for layer in graph.layers] == ["conv", "activation", "add"]


def test_clip_opset11_with_only_max_and_standalone_clip():
    b = GraphBuilder((1, 4), opset=11)
    y = b.node("Clip", ["input", "", b.const(np.float32(0.5))])
    graph = _check_against_ort(b.model(y), (1, 4), batch=5)
    act = graph.layers[0].activation
    assert graph.layers[0].op == "activation" and act.kind == "clip" and act.lo == -math.inf and act.hi == 0.5


@pytest.mark.parametrize("attrs", [
    dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
    dict(kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1),
    dict(kernel_shape=[2, 2], strides=[2, 2], auto_pad="SAME_UPPER"),
])
@pytest.mark.parametrize("op", ["MaxPool", "AveragePool"])
def test_pooling_variants(op, attrs):
    b = GraphBuilder((1, 3, 9, 8))
    y = b.node(op, ["input"], **attrs)
    graph = _check_against_ort(b.model(y), (1, 3, 9, 8), batch=2)
    assert graph.layers[0].op == ("maxpool" if op == "MaxPool" else "avgpool")


def test_average_pool_count_include_pad():
    b = GraphBuilder((1, 2, 7, 7))
    y = b.node("AveragePool", ["input"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], count_include_pad=1)
    _check_against_ort(b.model(y), (1, 2, 7, 7))


def test_residual_concat_gap_flatten_gemm_softmax_chain():
    b = GraphBuilder((1, 4, 6, 6))
    c1 = b.node("Relu", [b.conv("input", 4, 4, pads=[1, 1, 1, 1])])
    c2 = b.conv(c1, 4, 4, pads=[1, 1, 1, 1])
    added = b.node("Relu", [b.node("Add", [c1, c2])])
    cat = b.node("Concat", [added, c1], axis=1)
    flat = b.node("Flatten", [b.node("GlobalAveragePool", [cat])], axis=1)
    logits = b.node("Gemm", [flat, b.weight((10, 8)), b.const(np.zeros(10, np.float32))], transB=1)
    y = b.node("Softmax", [logits], axis=1)
    graph = _check_against_ort(b.model(y), (1, 4, 6, 6), batch=3)
    assert [layer.op for layer in graph.layers] == ["conv", "conv", "add", "concat", "global_avgpool", "reshape",
                                                    "gemm", "softmax"]
    assert graph.layers[2].activation.kind == "relu"


def test_reshape_with_hardcoded_batch_follows_run_batch():
    b = GraphBuilder((1, 2, 3, 3))
    y = b.node("Reshape", [b.node("Sigmoid", ["input"]), b.const(np.array([1, -1], np.int64))])
    y = b.node("Tanh", [y])
    graph = lower_model(b.model(y, batch_dim=1), "m.onnx", batch=4)
    assert graph.layers[1].output_shape == (4, 18)
    _check_against_ort(b.model(y, batch_dim=1), (1, 2, 3, 3))


def test_dropout_and_identity_are_aliases_and_do_not_block_fusion():
    b = GraphBuilder((1, 3, 5, 5))
    y = b.node("Dropout", [b.conv("input", 3, 3, pads=[1, 1, 1, 1])])
    y = b.node("Identity", [b.node("Relu", [b.node("Identity", [y])])])
    graph = _check_against_ort(b.model(y), (1, 3, 5, 5))
    assert [(layer.op, layer.activation.kind) for layer in graph.layers] == [("conv", "relu")]


def test_constant_node_feeds_weights():
    b = GraphBuilder((1, 3))
    w = b.name("cw")
    b.nodes.append(onnx.helper.make_node("Constant", [], [w], value=onnx.numpy_helper.from_array(
        np.arange(6, dtype=np.float32).reshape(3, 2))))
    y = b.node("MatMul", ["input", w])
    _check_against_ort(b.model(y), (1, 3), batch=2)


@pytest.mark.parametrize("opset", [11, 13, onnx.defs.onnx_opset_version()])
def test_supported_opset_range(opset):
    b = GraphBuilder((1, 3, 6, 6), opset=opset)
    y = b.node("Relu", [b.conv("input", 3, 4, pads=[1, 1, 1, 1])])
    y = b.node("Softmax", [b.node("Flatten", [b.node("GlobalAveragePool", [y])])], axis=-1)
    _check_against_ort(b.model(y), (1, 3, 6, 6))


@pytest.mark.parametrize("opset", [7, 9])
def test_old_opsets_are_converted_up(opset):
    b = GraphBuilder((1, 3, 6, 6), opset=opset)
    y = b.node("Relu", [b.batchnorm(b.conv("input", 3, 4, pads=[1, 1, 1, 1]), 4)])
    y = b.node("Softmax", [b.node("Flatten", [b.node("GlobalAveragePool", [y])])], axis=1)
    graph = _check_against_ort(b.model(y), (1, 3, 6, 6))
    assert [layer.op for layer in graph.layers] == ["conv", "global_avgpool", "reshape", "softmax"]


def test_every_unsupported_op_is_named_at_once_with_counts():
    b = GraphBuilder((1, 3))
    y = b.node("Hardmax", [b.node("Hardmax", [b.node("LpNormalization", ["input"])])])
    with pytest.raises(ModelError) as info:
        lower_model(b.model(y), "m.onnx")
    assert str(info.value) == "m.onnx: unsupported ops: Hardmax x2, LpNormalization x1 (`tpusim check` lists every node)"


def test_dynamic_spatial_dims_need_input_shape():
    b = GraphBuilder((1, 3, 8, 8))
    y = b.node("Relu", [b.conv("input", 3, 2)])
    model = b.model(y, spatial=[3, "h", "w"])
    with pytest.raises(ModelError, match="dynamic dims.*--input-shape"):
        lower_model(model, "dyn.onnx")
    graph = lower_model(model, "dyn.onnx", batch=2, input_shape=(1, 3, 10, 12))
    assert graph.input_shape == (2, 3, 10, 12)
    assert graph.layers[0].output_shape == (2, 2, 8, 10)


def test_batchnorm_without_foldable_producer_is_a_per_channel_affine_layer():
    b = GraphBuilder((1, 3, 4, 4))
    y = b.batchnorm("input", 3)
    graph = _check_against_ort(b.model(y), (1, 3, 4, 4))
    assert [layer.op for layer in graph.layers] == ["affine"]


def test_non_float_input_is_rejected():
    node = onnx.helper.make_node("Relu", ["x"], ["y"])
    graph = onnx.helper.make_graph([node], "g", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.INT8, [1, 4])],
                                   [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.INT8, [1, 4])])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    with pytest.raises(ModelError, match="INT8"):
        lower_model(model, "q.onnx")


def test_unused_branches_are_pruned():
    b = GraphBuilder((1, 3, 4, 4))
    used = b.conv("input", 3, 2)
    b.conv("input", 3, 2)
    graph = lower_model(b.model(used), "m.onnx")
    assert len(graph.layers) == 1
