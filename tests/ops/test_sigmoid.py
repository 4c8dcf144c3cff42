import numpy as np

from onnx_graphs import GraphBuilder
from op_checks import check_all_stages


def test_sigmoid_and_tanh_through_every_stage():
    g = GraphBuilder((1, 4, 8, 8))
    x = g.conv(g.input_name, 4, 8)
    s = g.node("Sigmoid", [x])
    t = g.node("Tanh", [x])
    y = g.node("Add", [s, t])
    graph = check_all_stages(g.model(y), (1, 4, 8, 8), {"sigmoid", "tanh"})
    assert [layer.op for layer in graph.layers] == ["conv", "sigmoid", "tanh", "add"]
