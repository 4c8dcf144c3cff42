from onnx_graphs import GraphBuilder
from op_checks import check_all_stages

SHAPE = (1, 4, 8, 8)


def test_elu_op():
    g = GraphBuilder(SHAPE)
    y = g.node("Elu", [g.conv(g.input_name, 4, 4)], alpha=0.7)
    graph = check_all_stages(g.model(y), SHAPE, {"elu"})
    assert [(layer.op, layer.attrs) for layer in graph.layers][1][0] == "elu"
    assert abs(graph.layers[1].attr("alpha") - 0.7) < 1e-7
