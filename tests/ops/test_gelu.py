import math

import numpy as np
import pytest

from onnx_graphs import GraphBuilder
from op_checks import check_all_stages
from tpusim import ops
from tpusim.ir import Layer

SHAPE = (1, 4, 8, 8)
f32 = np.float32


def _erf_form(g, x, order):
    """torch's export: Div(x, 1.4142) -> Erf -> Add(1) -> Mul(x) -> Mul(0.5), and other orders of the products."""
    e = g.node("Add", [g.node("Erf", [g.node("Div", [x, g.const(f32(1.4142135381698608))])]), g.const(f32(1.0))])
    if order == "torch":
        return g.node("Mul", [g.node("Mul", [x, e]), g.const(f32(0.5))])
    if order == "half_x_first":
        return g.node("Mul", [g.node("Mul", [x, g.const(f32(0.5))]), e])
    return g.node("Mul", [x, g.node("Mul", [g.const(f32(0.5)), e])])


@pytest.mark.parametrize("order", ["torch", "half_x_first", "half_of_erf_first"])
def test_erf_form_is_one_gelu_table(order):
    g = GraphBuilder(SHAPE)
    x = g.conv(g.input_name, 4, 4)
    graph = check_all_stages(g.model(_erf_form(g, x, order)), SHAPE, {"gelu"})
    assert [layer.op for layer in graph.layers] == ["conv", "gelu"]
    assert graph.layers[1].attr("approximate") == "none"


@pytest.mark.parametrize("cube", ["pow", "mul_mul"])
def test_tanh_form_is_one_gelu_table(cube):
    g = GraphBuilder(SHAPE)
    x = g.conv(g.input_name, 4, 4)
    x3 = g.node("Pow", [x, g.const(f32(3.0))]) if cube == "pow" else g.node("Mul", [x, g.node("Mul", [x, x])])
    inner = g.node("Add", [x, g.node("Mul", [g.const(f32(0.044714998453855515)), x3])])
    t = g.node("Tanh", [g.node("Mul", [inner, g.const(f32(0.7978845834732056))])])
    y = g.node("Mul", [g.node("Mul", [x, g.const(f32(0.5))]), g.node("Add", [t, g.const(f32(1.0))])])
    graph = check_all_stages(g.model(y), SHAPE, {"gelu"})
    assert [layer.op for layer in graph.layers] == ["conv", "gelu"]
    assert graph.layers[1].attr("approximate") == "tanh"


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_onnx_gelu_op(approximate):
    g = GraphBuilder(SHAPE, opset=20)
    y = g.node("Gelu", [g.conv(g.input_name, 4, 4)], approximate=approximate)
    graph = check_all_stages(g.model(y), SHAPE, {"gelu"})
    assert [(layer.op, layer.attrs) for layer in graph.layers][1] == ("gelu", (("approximate", approximate),))


def test_gelu_function_values():
    x = np.linspace(-6, 6, 1201)
    layer = Layer(name="g", op="gelu", inputs=("x",), output="y", input_shapes=((1201,),), output_shape=(1201,),
                  attrs=(("approximate", "none"),))
    exact = 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))
    np.testing.assert_allclose(ops.op("gelu").function(layer, x), exact, atol=1e-7)
    tanh = Layer(**{**layer.__dict__, "attrs": (("approximate", "tanh"),)})
    np.testing.assert_allclose(ops.op("gelu").function(tanh, x), exact, atol=5e-4)
