import numpy as np

from onnx_graphs import GraphBuilder
from op_checks import CONFIG, check_all_stages
from tpusim import ops
from tpusim.ir import Layer
from tpusim.quant.arithmetic import QParams

SHAPE = (1, 4, 8, 8)
SLOPES = np.array([0.5, -0.25, 1.0, 2.0], np.float32)


def test_per_channel_prelu_through_every_stage():
    g = GraphBuilder(SHAPE)
    y = g.node("PRelu", [g.conv(g.input_name, 4, 4), g.const(SLOPES.reshape(4, 1, 1))])
    graph = check_all_stages(g.model(y), SHAPE, {"prelu"})
    assert [layer.op for layer in graph.layers] == ["conv", "prelu"]
    np.testing.assert_array_equal(graph.layers[1].weight, SLOPES)


def test_one_slope_is_a_leakyrelu_table():
    g = GraphBuilder(SHAPE)
    y = g.node("PRelu", [g.conv(g.input_name, 4, 4), g.const(np.array([0.25], np.float32))])
    graph = check_all_stages(g.model(y), SHAPE, {"leakyrelu"})
    assert [(layer.op, layer.attrs) for layer in graph.layers][1] == ("leakyrelu", (("alpha", 0.25),))


def _round_half_away(v: np.ndarray) -> np.ndarray:
    return np.sign(v) * np.floor(np.abs(v) + 0.5)


def test_sign_split_kernel_is_exact_for_dyadic_slopes():
    # s_x = s_y and power-of-two slopes: both multipliers are exact, so y = c (c >= 0) or round(c * slope).
    layer = Layer(name="p", op="prelu", inputs=("x",), output="y", input_shapes=((1, 4, 3, 5),),
                  output_shape=(1, 4, 3, 5), weight=SLOPES, axis=1)
    qp = QParams(np.array(0.0625), np.array(128), 0, 255)
    ql = ops.op("prelu").quantize(layer, (qp,), qp, CONFIG.quant, None)
    q = np.random.default_rng(0).integers(0, 256, size=(1, 4, 3, 5)).astype(np.uint8)
    y, _ = ops.op("prelu").execute(ql, [q], None)
    c = q.astype(np.int64) - 128
    expected = np.where(c >= 0, c, _round_half_away(c * SLOPES.reshape(4, 1, 1).astype(np.float64))) + 128
    np.testing.assert_array_equal(y, np.clip(expected, 0, 255))
