import numpy as np
import pytest

from onnx_graphs import GraphBuilder
from op_checks import CONFIG, check_all_stages

from tpusim.errors import ModelError
from tpusim.frontend import lower_model
from tpusim.ops import op
from tpusim.quant.arithmetic import activation_qparams


def _reduce(g, op_type: str, x: str, axes, keepdims: int = 1) -> str:
    if g.opset >= 18:
        return g.node(op_type, [x, g.const(np.array(axes, np.int64))], keepdims=keepdims)
    return g.node(op_type, [x], axes=list(axes), keepdims=keepdims)


@pytest.mark.parametrize("opset", [17, 18])
@pytest.mark.parametrize("op_type", ["ReduceMean", "ReduceMax"])
def test_global_pooling_written_as_a_reduce_through_every_stage(opset, op_type):
    # The dynamo exporter's ResNet head: ReduceMean over (-1, -2) with keepdims, a flatten, the classifier.
    g = GraphBuilder((1, 3, 6, 6), opset=opset)
    x = g.node("Relu", [g.conv(g.input_name, 3, 8, pads=[1, 1, 1, 1])])
    p = _reduce(g, op_type, x, [-1, -2])
    y = g.node("Gemm", [g.node("Flatten", [p]), g.weight((5, 8))], transB=1)
    name = {"ReduceMean": "reduce_mean", "ReduceMax": "reduce_max"}[op_type]
    graph = check_all_stages(g.model(y), (1, 3, 6, 6), {name})
    assert [layer.op for layer in graph.layers] == ["conv", name, "reshape", "gemm"]
    layer = graph.layers[1]
    assert layer.attr("axes") == (2, 3) and layer.output_shape == (1, 8, 1, 1)
    assert op(name).vector_cost(layer, [8 * 36], 8, 256, True).pooling.startswith("global_")


def test_reduce_over_other_axes_without_keepdims_through_every_stage():
    # Token features (1, 6, 16): the mean over the tokens, the max over the features.
    g = GraphBuilder((1, 6, 16))
    h = g.node("MatMul", [g.input_name, g.weight((16, 12))])
    m = _reduce(g, "ReduceMean", h, [1], keepdims=0)  # (1, 12)
    r = _reduce(g, "ReduceMax", h, [-1], keepdims=0)  # (1, 6)
    y = g.node("Concat", [m, r], axis=1)
    graph = check_all_stages(g.model(y), (1, 6, 16), {"reduce_mean", "reduce_max"})
    assert [layer.op for layer in graph.layers] == ["gemm", "reduce_mean", "reduce_max", "concat"]
    assert [layer.output_shape for layer in graph.layers[1:]] == [(1, 12), (1, 6), (1, 18)]


def _integers(op_type: str, axes, scheme: str):
    g = GraphBuilder((1, 3, 6, 6))
    y = _reduce(g, op_type, g.conv(g.input_name, 3, 8), axes)
    layer = lower_model(g.model(y), "r.onnx").layers[1]
    module = op(layer.op)
    x_qp = activation_qparams(-2.0, 3.0, scheme)
    y_qp = x_qp if module.inherits_grid else activation_qparams(-0.5, 1.0, scheme)
    q = np.random.default_rng(5).integers(x_qp.qmin, x_qp.qmax + 1, layer.input_shapes[0]).astype(x_qp.storage_dtype)
    out, _ = module.execute(module.quantize(layer, (x_qp,), y_qp, CONFIG.quant, None), [q], None)
    return layer, module, q, out, x_qp, y_qp


@pytest.mark.parametrize("scheme", ["asymmetric-uint8", "symmetric-int8"])
def test_mean_is_an_int32_sum_with_one_dyadic_rescale(scheme):
    layer, module, q, out, x_qp, y_qp = _integers("ReduceMean", [2, 3], scheme)
    centred_sum = (q.astype(np.int64) - int(x_qp.zero_point)).sum(axis=(2, 3), keepdims=True)
    exact = centred_sum * float(x_qp.scale) / (float(y_qp.scale) * 16) + int(y_qp.zero_point)
    # The dyadic multiplier rounds once: within half an LSB of the exact mean (plus the multiplier's 2^-31).
    assert np.max(np.abs(out - np.clip(exact, y_qp.qmin, y_qp.qmax))) <= 0.5 + 1e-6
    cost = module.vector_cost(layer, [q.size], out.size, 256, True)
    assert (cost.passes, cost.pool_ops, cost.requant_ops) == (-(-q.size // 256), q.size, out.size)


def test_max_keeps_the_input_grid_exactly():
    layer, module, q, out, _, _ = _integers("ReduceMax", [1, 3], "asymmetric-uint8")
    assert module.inherits_grid and layer.output_shape == (1, 1, 4, 1)
    np.testing.assert_array_equal(out, q.max(axis=(1, 3), keepdims=True))
    assert module.vector_cost(layer, [q.size], out.size, 256, True).requant_ops == 0


def test_reducing_over_the_batch_is_refused():
    g = GraphBuilder((1, 3, 6, 6))
    y = _reduce(g, "ReduceMean", g.conv(g.input_name, 3, 8), [0, 1])
    with pytest.raises(ModelError, match="batch axis"):
        lower_model(g.model(y), "r.onnx")
