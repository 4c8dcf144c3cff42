import numpy as np
import pytest

from onnx_graphs import GraphBuilder
from op_checks import CONFIG, check_all_stages

from tpusim.frontend import lower_model
from tpusim.ops import op
from tpusim.quant.arithmetic import activation_qparams


@pytest.mark.parametrize("axis", [1, 2, -1])
def test_concat_of_two_grids_on_any_axis_of_nchw_through_every_stage(axis):
    g = GraphBuilder((1, 3, 6, 6))
    a = g.conv(g.input_name, 3, 4, pads=[1, 1, 1, 1])
    b = g.node("Relu", [g.conv(g.input_name, 3, 4, pads=[1, 1, 1, 1])])  # another range: another grid
    c = g.node("Concat", [a, b], axis=axis)
    y = g.conv(c, 8 if axis == 1 else 4, 2)
    graph = check_all_stages(g.model(y), (1, 3, 6, 6), {"concat"})
    assert [layer.op for layer in graph.layers] == ["conv", "conv", "concat", "conv"]
    expected = [1, 4, 6, 6]
    expected[axis] *= 2
    assert graph.layers[2].output_shape == tuple(expected) and graph.layers[2].axis == axis % 4


@pytest.mark.parametrize("axis", [-1, 1])
def test_concat_of_rank3_token_tensors_through_every_stage(axis):
    # (batch, tokens, features): features from two projections (axis -1) or two token sets (axis 1).
    g = GraphBuilder((1, 6, 16))
    a = g.node("MatMul", [g.input_name, g.weight((16, 8))])
    b = g.node("MatMul", [g.input_name, g.weight((16, 8 if axis == 1 else 4), scale=1.0)])
    c = g.node("Concat", [a, b], axis=axis)
    y = g.node("MatMul", [c, g.weight((8 if axis == 1 else 12, 5))])
    graph = check_all_stages(g.model(y), (1, 6, 16), {"concat"})
    assert [layer.op for layer in graph.layers] == ["gemm", "gemm", "concat", "gemm"]
    assert graph.layers[2].output_shape == ((1, 12, 8) if axis == 1 else (1, 6, 12))


def test_concat_copies_inputs_on_its_grid_and_rescales_the_others():
    g = GraphBuilder((1, 3, 6, 6))
    a, b = g.conv(g.input_name, 3, 4), g.conv(g.input_name, 3, 4)
    layer = lower_model(g.model(g.node("Concat", [a, b], axis=2)), "c.onnx").layers[2]
    module = op("concat")
    y_qp = activation_qparams(-2.0, 2.0, "asymmetric-uint8")
    b_qp = activation_qparams(-0.7, 1.1, "asymmetric-uint8")
    ql = module.quantize(layer, (y_qp, b_qp), y_qp, CONFIG.quant, None)
    assert ql.input_rescales[0] is None and ql.input_rescales[1] is not None
    rng = np.random.default_rng(6)
    qa, qb = (rng.integers(0, 256, layer.input_shapes[i], dtype=np.uint8) for i in range(2))
    out, _ = module.execute(ql, [qa, qb], None)
    np.testing.assert_array_equal(out[:, :, :4], qa)
    exact = (qb.astype(np.int64) - int(b_qp.zero_point)) * float(b_qp.scale) / float(y_qp.scale) + int(y_qp.zero_point)
    assert np.max(np.abs(out[:, :, 4:] - exact)) <= 0.5 + 1e-6  # one dyadic rounding
    cost = module.vector_cost(layer, [qa.size, qb.size], out.size, 256, True)
    assert cost.passes == 2 and cost.requant_ops == qa.size + qb.size  # 64 elements each: a vector apiece


def _channels_last_memory(q):
    return np.ascontiguousarray(q.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)


@pytest.mark.parametrize("shapes, axis", [
    ([(2, 3, 4, 5), (2, 6, 4, 5), (2, 1, 4, 5)], 1),
    ([(1, 4, 3, 5), (1, 4, 2, 5)], 2),
    ([(1, 4, 3, 5), (1, 4, 3, 2)], 3),
    ([(2, 6, 8), (2, 6, 3)], 2),
])
@pytest.mark.parametrize("layouts", [("nchw",) * 3, ("channels-last",) * 3, ("channels-last", "nchw", "strided"),
                                     ("strided", "channels-last", "channels-last")])
def test_concat_kernel_is_its_numpy_oracle(shapes, axis, layouts):
    from tpusim.ir import Layer
    from tpusim.ops.concat import concat_reference

    rng = np.random.default_rng(len(shapes) + axis)
    output = list(shapes[0])
    output[axis] = sum(s[axis] for s in shapes)
    layer = Layer(name="c", op="concat", inputs=tuple(f"x{i}" for i in range(len(shapes))), output="y",
                  input_shapes=tuple(shapes), output_shape=tuple(output), axis=axis)
    y_qp = activation_qparams(-2.0, 2.0, "asymmetric-uint8")
    grids = [y_qp, activation_qparams(-0.7, 1.1, "asymmetric-uint8"), activation_qparams(-3.1, 3.1, "symmetric-int8")]
    in_qps = tuple(grids[:len(shapes)])
    ql = op("concat").quantize(layer, in_qps, y_qp, CONFIG.quant, None)
    assert ql.input_rescales[0] is None and all(r is not None for r in ql.input_rescales[1:])
    inputs = []
    for shape, qp, layout in zip(shapes, in_qps, layouts):
        info = np.iinfo(qp.storage_dtype)
        q = rng.integers(info.min, info.max + 1, shape).astype(qp.storage_dtype)
        if layout == "channels-last" and q.ndim == 4:
            q = _channels_last_memory(q)
        elif layout == "strided":
            q = np.repeat(q, 2, axis=-1)[..., ::2]
        inputs.append(q)
    y, _ = op("concat").execute(ql, inputs, None)
    expected = concat_reference(ql, inputs)
    np.testing.assert_array_equal(y, expected)
    assert y.dtype == expected.dtype
