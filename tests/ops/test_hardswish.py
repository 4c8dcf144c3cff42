import numpy as np
import pytest

from onnx_graphs import GraphBuilder
from op_checks import check_all_stages

SHAPE = (1, 4, 8, 8)
f32 = np.float32


def _chain(g, x, form):
    if form == "op":
        return g.node("HardSwish", [x])
    if form == "x_times_hardsigmoid":
        return g.node("Mul", [g.node("HardSigmoid", [x], alpha=1 / 6, beta=0.5), x])
    # torch before HardSwish existed in ONNX: x * relu6(x + 3) / 6
    relu6 = g.node("Clip", [g.node("Add", [x, g.const(f32(3))]), g.const(f32(0)), g.const(f32(6))])
    return g.node("Div", [g.node("Mul", [x, relu6]), g.const(f32(6))])


@pytest.mark.parametrize("form", ["op", "x_times_hardsigmoid", "x_relu6_over_6"])
def test_hardswish_forms_are_one_table(form):
    g = GraphBuilder(SHAPE)
    y = _chain(g, g.conv(g.input_name, 4, 4), form)
    graph = check_all_stages(g.model(y), SHAPE, {"hardswish"})
    assert [layer.op for layer in graph.layers] == ["conv", "hardswish"]
