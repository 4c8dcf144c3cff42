import numpy as np
import pytest

from onnx_graphs import GraphBuilder
from op_checks import CONFIG, check_all_stages

from tpusim.errors import ModelError
from tpusim.frontend import lower_model
from tpusim.mapping.tiler import compile_program


def _squeeze_unsqueeze(opset: int, squeeze_axes=(2,)):
    g = GraphBuilder((1, 3, 3, 7), opset=opset)
    x = g.conv(g.input_name, 3, 4)  # (1, 4, 1, 5)
    if opset >= 13:
        s = g.node("Squeeze", [x] + ([g.const(np.array(squeeze_axes, np.int64))] if squeeze_axes else []))
        u = g.node("Unsqueeze", [s, g.const(np.array([-2], np.int64))])
    else:
        s = g.node("Squeeze", [x], **({"axes": list(squeeze_axes)} if squeeze_axes else {}))
        u = g.node("Unsqueeze", [s], axes=[-2])
    return g.model(g.conv(u, 4, 2, k=1))


@pytest.mark.parametrize("opset", [11, 13])
def test_squeeze_and_unsqueeze_are_aliases_through_every_stage(opset):
    graph = check_all_stages(_squeeze_unsqueeze(opset), (1, 3, 3, 7), {"reshape"})
    assert [layer.op for layer in graph.layers] == ["conv", "reshape", "reshape", "conv"]
    assert [layer.output_shape for layer in graph.layers[1:3]] == [(1, 4, 5), (1, 4, 1, 5)]
    # Aliases: no instruction and no bytes of their own.
    program = compile_program(graph, CONFIG)
    assert {ins.layer for ins in program.instructions if hasattr(ins, "vector_passes")} == {0, 3}


def test_squeeze_without_axes_keeps_the_batch():
    # ONNX would drop a batch of 1 too; the batch always stays first here, as for Reshape.
    g = GraphBuilder((1, 3, 3, 7))
    y = g.node("Squeeze", [g.conv(g.input_name, 3, 4)])
    graph = lower_model(g.model(y, batch_dim=1), "s.onnx", batch=1)
    assert [(layer.op, layer.output_shape) for layer in graph.layers] == [("conv", (1, 4, 1, 5)),
                                                                          ("reshape", (1, 4, 5))]


@pytest.mark.parametrize("op_type, axes, message", [
    ("Squeeze", [0], "batch axis"), ("Unsqueeze", [0], "batch axis")])
def test_bad_axes_are_one_line_errors(op_type, axes, message):
    g = GraphBuilder((1, 3, 3, 7))
    y = g.node(op_type, [g.conv(g.input_name, 3, 4), g.const(np.array(axes, np.int64))])
    with pytest.raises(ModelError, match=message):
        lower_model(g.model(y), "s.onnx")
