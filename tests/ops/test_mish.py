import pytest

from onnx_graphs import GraphBuilder
from op_checks import check_all_stages

SHAPE = (1, 4, 8, 8)


@pytest.mark.parametrize("form", ["op", "chain"])
def test_mish(form):
    g = GraphBuilder(SHAPE, opset=18)
    x = g.conv(g.input_name, 4, 4)
    y = g.node("Mish", [x]) if form == "op" else g.node("Mul", [x, g.node("Tanh", [g.node("Softplus", [x])])])
    graph = check_all_stages(g.model(y), SHAPE, {"mish"})
    assert [layer.op for layer in graph.layers] == ["conv", "mish"]
