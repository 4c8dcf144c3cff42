import numpy as np
import pytest

from onnx_graphs import GraphBuilder
from op_checks import CONFIG, check_all_stages
from tpusim import ops
from tpusim.errors import ModelError
from tpusim.frontend import lower_model
from tpusim.ir import Layer
from tpusim.quant.arithmetic import QParams

SHAPE = (1, 4, 8, 8)
f32 = np.float32


@pytest.mark.parametrize("constant_first", [False, True])
def test_relu6_as_max_then_min_fuses_into_the_conv(constant_first):
    g = GraphBuilder(SHAPE)
    x = g.conv(g.input_name, 4, 4)
    lo = g.node("Max", [g.const(f32(0)), x] if constant_first else [x, g.const(f32(0))])
    y = g.node("Min", [g.const(f32(6)), lo] if constant_first else [lo, g.const(f32(6))])
    graph = check_all_stages(g.model(y), SHAPE, {"conv"})
    assert [(layer.op, layer.activation.label) for layer in graph.layers] == [("conv", "relu6")]


def test_max_and_min_of_two_activations():
    g = GraphBuilder(SHAPE)
    a, b = g.conv(g.input_name, 4, 4), g.node("Relu", [g.conv(g.input_name, 4, 4)])
    y = g.node("Add", [g.node("Max", [a, b]), g.node("Min", [a, b])])
    graph = check_all_stages(g.model(y), SHAPE, {"max", "min"})
    assert [layer.op for layer in graph.layers] == ["conv", "conv", "max", "min", "add"]


def test_per_channel_bound_is_refused():
    g = GraphBuilder(SHAPE)
    y = g.node("Max", [g.conv(g.input_name, 4, 4), g.const(np.ones((4, 1, 1), f32))])
    with pytest.raises(ModelError, match="per-channel constant"):
        lower_model(g.model(y), "m.onnx")


def test_max_kernel_requantizes_both_inputs_to_the_output_grid():
    shape = (1, 1, 1, 5)
    layer = Layer(name="m", op="max", inputs=("a", "b"), output="y", input_shapes=(shape, shape), output_shape=shape)
    qa = QParams(np.array(0.5), np.array(0), -127, 127)     # the output's grid: copied
    qb = QParams(np.array(1.0), np.array(10), 0, 255)       # twice the step: rescaled exactly by 2
    ql = ops.op("max").quantize(layer, (qa, qb), qa, CONFIG.quant, None)
    assert ql.input_rescales[0] is None
    a = np.array([[[[-5, 3, 100, -127, 0]]]], np.int8)
    b = np.array([[[[10, 11, 60, 0, 200]]]], np.uint8)      # 0, 1, 50, -10, 190
    y, _ = ops.op("max").execute(ql, [a, b], None)
    np.testing.assert_array_equal(y, [[[[0, 3, 100, -20, 127]]]])
    y, _ = ops.op("min").execute(ql, [a, b], None)
    np.testing.assert_array_equal(y, [[[[-5, 2, 100, -127, 0]]]])
