import numpy as np
import pytest

from onnx_graphs import GraphBuilder
from op_checks import CONFIG, check_all_stages
from tpusim import ops
from tpusim.ir import Layer
from tpusim.quant.arithmetic import QParams

SHAPE = (1, 4, 8, 8)


def test_squeeze_excitation_gate_broadcasts_per_channel():
    g = GraphBuilder(SHAPE)
    x = g.conv(g.input_name, 4, 4, pads=[1, 1, 1, 1])
    gate = g.node("Sigmoid", [g.conv(g.node("Relu", [g.conv(g.node("GlobalAveragePool", [x]), 4, 2, k=1)]), 2, 4, k=1)])
    y = g.node("Mul", [x, gate])
    graph = check_all_stages(g.model(y), SHAPE, {"mul"})
    assert [layer.op for layer in graph.layers] == ["conv", "global_avgpool", "conv", "conv", "sigmoid", "mul"]
    assert graph.layers[-1].input_shapes == ((1, 4, 8, 8), (1, 4, 1, 1))


@pytest.mark.parametrize("gate_first", [False, True])
def test_product_of_two_activations(gate_first):
    g = GraphBuilder(SHAPE)
    a, b = g.conv(g.input_name, 4, 4), g.node("Tanh", [g.conv(g.input_name, 4, 4)])
    y = g.node("Mul", [b, a] if gate_first else [a, b])
    graph = check_all_stages(g.model(y), SHAPE, {"mul"})
    assert [layer.op for layer in graph.layers] == ["conv", "conv", "tanh", "mul"]


def test_square_of_a_tensor_is_a_table():
    g = GraphBuilder(SHAPE)
    x = g.conv(g.input_name, 4, 4)
    graph = check_all_stages(g.model(g.node("Mul", [x, x])), SHAPE, {"unary"})
    assert [layer.op for layer in graph.layers] == ["conv", "unary"]


def test_mul_kernel_is_the_exact_product_requantized_once():
    shape = (1, 2, 3, 4)
    layer = Layer(name="m", op="mul", inputs=("a", "b"), output="y", input_shapes=(shape, (1, 2, 1, 1)),
                  output_shape=shape)
    qa = QParams(np.array(0.5), np.array(120), 0, 255)
    qb = QParams(np.array(0.25), np.array(0), -127, 127)
    qy = QParams(np.array(4.0), np.array(10), 0, 255)      # s_a s_b / s_y = 1/32: exact
    ql = ops.op("mul").quantize(layer, (qa, qb), qy, CONFIG.quant, None)
    rng = np.random.default_rng(1)
    a = rng.integers(0, 256, shape).astype(np.uint8)
    b = rng.integers(-127, 128, (1, 2, 1, 1)).astype(np.int8)
    y, _ = ops.op("mul").execute(ql, [a, b], None)
    p = (a.astype(np.int64) - 120) * b.astype(np.int64)
    rounded = np.sign(p) * ((np.abs(p) + 16) // 32)          # round half away from zero
    np.testing.assert_array_equal(y, np.clip(rounded + 10, 0, 255))


@pytest.mark.parametrize("shapes", [
    ((1, 5, 3, 4), (1, 5, 1, 1)),   # a squeeze-excitation gate
    ((1, 5, 1, 1), (1, 5, 3, 4)),   # the gate first
    ((1, 5, 3, 4), (1, 1, 1, 1)),   # one value
    ((1, 6, 8), (8,)),              # a feature-wise scale of tokens
    ((1, 5, 3, 4), (1, 5, 3, 4)),   # two full tensors: the broadcasting product itself
    ((1, 5, 3, 4), (1, 5, 3, 1)),   # broadcast along two axes: the same
])
@pytest.mark.parametrize("layout", ["nchw", "channels-last"])
def test_mul_of_a_gate_is_its_numpy_oracle(shapes, layout):
    from tpusim.ops.mul import mul_reference

    output = tuple(np.broadcast_shapes(*shapes))
    layer = Layer(name="m", op="mul", inputs=("a", "b"), output="y", input_shapes=shapes, output_shape=output)
    qps = (QParams(np.array(0.5), np.array(120), 0, 255), QParams(np.array(0.25), np.array(-3), -128, 127))
    ql = ops.op("mul").quantize(layer, qps, QParams(np.array(0.125), np.array(10), 0, 255), CONFIG.quant, None)
    rng = np.random.default_rng(len(shapes[0]))
    inputs = [rng.integers(np.iinfo(qp.storage_dtype).min, np.iinfo(qp.storage_dtype).max + 1, shape)
              .astype(qp.storage_dtype) for shape, qp in zip(shapes, qps)]
    if layout == "channels-last":
        inputs = [np.ascontiguousarray(q.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2) if q.ndim == 4 else q
                  for q in inputs]
    y, _ = ops.op("mul").execute(ql, inputs, None)
    expected = mul_reference(ql, inputs)
    np.testing.assert_array_equal(y, expected)
    assert y.dtype == expected.dtype and y.shape == output
