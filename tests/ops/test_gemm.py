import numpy as np
import pytest

from onnx_graphs import GraphBuilder
from op_checks import CONFIG, check_all_stages

from tpusim.frontend import lower_model
from tpusim.ops import ExecOptions, op
from tpusim.quant.arithmetic import activation_qparams
from tpusim.quant.export import export_fp32


def _linear_layers(shape):
    # A ViT/ConvNeXt MLP on (batch, tokens..., features): MatMul + Add(bias) + Relu, then a bias-less MatMul.
    g = GraphBuilder(shape)
    k = shape[-1]
    h = g.node("MatMul", [g.input_name, g.weight((k, 24))])
    h = g.node("Relu", [g.node("Add", [h, g.const((g.rng.standard_normal(24) * 0.1).astype(np.float32))])])
    return g.model(g.node("MatMul", [h, g.weight((24, 8))]))


@pytest.mark.parametrize("shape", [(1, 7, 16), (1, 2, 5, 16)])
def test_matmul_on_any_rank_folds_leading_dims_into_m_through_every_stage(shape):
    graph = check_all_stages(_linear_layers(shape), shape, {"gemm"})
    assert [layer.op for layer in graph.layers] == ["gemm", "gemm"]
    first, second = graph.layers
    tokens = int(np.prod(shape[:-1]))
    assert (first.gemm.m, first.gemm.k, first.gemm.n) == (tokens, 16, 24)
    assert first.bias is not None and first.activation.kind == "relu" and second.bias is None
    assert first.output_shape == (*shape[:-1], 24) and second.output_shape == (*shape[:-1], 8)
    # Rank > 2 is exported as MatMul on the transposed (K, N) weight, the bias added after it.
    assert [n.op_type for n in export_fp32(graph).graph.node] == ["Transpose", "MatMul", "Add", "Relu",
                                                                   "Transpose", "MatMul"]


def test_rank3_integers_are_the_matrix_units_sums_requantized():
    graph = lower_model(_linear_layers((1, 7, 16)), "m.onnx")
    layer = graph.layers[0]
    module = op("gemm")
    x_qp = activation_qparams(-3.0, 3.0, "asymmetric-uint8")
    y_qp = activation_qparams(-2.0, 4.0, "asymmetric-uint8")
    ql = module.quantize(layer, (x_qp,), y_qp, CONFIG.quant, None)
    q = np.random.default_rng(7).integers(0, 256, (1, 7, 16), dtype=np.uint8)
    out, wrapped = module.execute(ql, [q], ExecOptions())
    acc = (q.reshape(7, 16).astype(np.int64) @ ql.weight_q.T.astype(np.int64)) + ql.acc_bias
    exact = acc * (float(x_qp.scale) * np.asarray(ql.weight_qparams.scale, np.float64) / float(y_qp.scale))
    expected = np.clip(exact + int(y_qp.zero_point), ql.out_qmin, ql.out_qmax).reshape(1, 7, 24)
    assert wrapped == 0 and out.shape == (1, 7, 24)
    assert np.max(np.abs(out - expected)) <= 0.5 + 1e-6


@pytest.mark.parametrize("shape, n", [((1, 2048), 1000), ((1, 9, 192), 128), ((2, 5), 3)])
def test_the_prepared_int8_path_equals_exact_blas_on_every_call(shape, n):
    # M = 1 (a classifier) and M = 9 with whole 64-channel tiles (the broadcast kernel), and a tiny layer.
    from tpusim.ir import Activation, Layer
    from tpusim.quant.arithmetic import QParams

    rng = np.random.default_rng(n)
    k = shape[-1]
    layer = Layer(name="g", op="gemm", inputs=("x",), output="y", input_shapes=(shape,),
                  output_shape=(*shape[:-1], n), activation=Activation("relu", 0.0, float("inf")),
                  weight=rng.normal(0, 1 / np.sqrt(k), (n, k)).astype(np.float32),
                  bias=rng.normal(0, 0.5, n).astype(np.float32))
    x_qp, y_qp = QParams(np.array(0.046875), np.array(7), 0, 255), QParams(np.array(0.0703125), np.array(3), 0, 255)
    ql = op("gemm").quantize(layer, (x_qp,), y_qp, CONFIG.quant, None)
    x = rng.integers(0, 256, shape).astype(np.uint8)
    want, want_wrapped = op("gemm").execute(ql, [x], ExecOptions(32, "exact-blas"))
    for _ in range(2):
        got, wrapped = op("gemm").execute(ql, [x], ExecOptions(32, "int8-gemm"))
        assert got.shape == want.shape and got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)
        assert wrapped == want_wrapped
    assert np.count_nonzero(want == ql.out_qmin) and np.count_nonzero(want > ql.out_qmin)


@pytest.mark.parametrize("shape", [(1, 5), (16, 3), (17, 40), (768, 3072), (33, 1)])
def test_a_weight_is_transposed_into_the_same_contiguous_matrix_numpy_gives(shape):
    from tpusim.ops.gemm import transposed

    matrix = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    got = transposed(matrix)
    assert got.flags.c_contiguous and got.dtype == np.float32
    np.testing.assert_array_equal(got, np.ascontiguousarray(matrix.T))
