import numpy as np

from onnx_graphs import GraphBuilder
from op_checks import check_all_stages
from tpusim import ops

SHAPE = (1, 4, 8, 8)


def test_softplus_op():
    g = GraphBuilder(SHAPE)
    y = g.node("Softplus", [g.conv(g.input_name, 4, 4)])
    graph = check_all_stages(g.model(y), SHAPE, {"softplus"})
    assert [layer.op for layer in graph.layers] == ["conv", "softplus"]
    big = np.array([-30.0, 0.0, 100.0], np.float32)
    np.testing.assert_allclose(ops.op("softplus").function(graph.layers[1], big), [np.exp(-30.0), np.log(2), 100.0],
                               rtol=1e-6)
