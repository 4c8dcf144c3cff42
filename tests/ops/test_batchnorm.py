import numpy as np

from onnx_graphs import GraphBuilder
from op_checks import check_all_stages

SHAPE = (1, 4, 8, 8)


def test_batchnorm_after_a_conv_still_folds():
    g = GraphBuilder(SHAPE)
    graph = check_all_stages(g.model(g.batchnorm(g.conv(g.input_name, 4, 4), 4)), SHAPE, {"conv"})
    assert [layer.op for layer in graph.layers] == ["conv"]


def test_stand_alone_batchnorm_is_a_per_channel_affine_layer():
    g = GraphBuilder(SHAPE)
    x = g.node("Relu", [g.conv(g.input_name, 4, 4)])      # BN after the ReLU: nothing to fold into
    graph = check_all_stages(g.model(g.batchnorm(x, 4)), SHAPE, {"affine"})
    assert [layer.op for layer in graph.layers] == ["conv", "affine"]


def test_batchnorm_on_the_graph_input_and_after_an_affine_layer():
    g = GraphBuilder(SHAPE)
    scale = g.const(np.array([2.0, 1.0, 0.5, -1.0], np.float32).reshape(4, 1, 1))
    y = g.batchnorm(g.node("Mul", [g.input_name, scale]), 4)
    graph = check_all_stages(g.model(y), SHAPE, {"affine"})
    assert [layer.op for layer in graph.layers] == ["affine"]


def test_fold_scale_rounds_the_float64_product_to_float32_once_as_the_plain_numpy_expression():
    from tpusim.ops.batchnorm import fold_scale

    rng = np.random.default_rng(3)
    weight = rng.standard_normal((64, 3, 3, 3)).astype(np.float32)
    factor = rng.standard_normal(64) * 10.0 ** rng.integers(-3, 4, 64)
    oracle = (weight.astype(np.float64) * factor.reshape(-1, 1, 1, 1)).astype(np.float32)
    before = weight.copy()
    folded = fold_scale(weight, factor)
    np.testing.assert_array_equal(weight, before)  # a model constant other nodes may read is left alone
    assert folded.dtype == np.float32 and folded.shape == weight.shape
    np.testing.assert_array_equal(folded.view(np.uint32), oracle.view(np.uint32))
    # Rounding float32 operands first would differ: the test can tell the two apart.
    assert not np.array_equal((weight * factor.astype(np.float32).reshape(-1, 1, 1, 1)).view(np.uint32),
                              oracle.view(np.uint32))
    gemm_weight = rng.standard_normal((5, 7)).astype(np.float32)
    np.testing.assert_array_equal(fold_scale(gemm_weight, factor[:5]),
                                  (gemm_weight.astype(np.float64) * factor[:5, None]).astype(np.float32))
