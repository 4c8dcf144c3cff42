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
