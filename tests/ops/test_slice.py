import numpy as np
import pytest

from onnx_graphs import GraphBuilder
from op_checks import CONFIG, check_all_stages

from tpusim.errors import ModelError
from tpusim.frontend import lower_model
from tpusim.ops import op
from tpusim.quant.arithmetic import activation_qparams

INT64_MAX = np.iinfo(np.int64).max


def _slice(g, x, starts, ends, axes, steps=None):
    args = [x] + [g.const(np.array(v, np.int64)) for v in (starts, ends, axes)]
    return g.node("Slice", args + ([g.const(np.array(steps, np.int64))] if steps else []))


def test_slice_windows_steps_and_negative_steps_through_every_stage():
    g = GraphBuilder((1, 3, 8, 8))
    x = g.conv(g.input_name, 3, 6, pads=[1, 1, 1, 1])  # (1, 6, 8, 8)
    # Channels 1..4, a negative start and an end past the edge (clamped), every other column.
    a = _slice(g, x, [1, -6], [5, INT64_MAX], [1, 3], [1, 2])  # (1, 4, 8, 3)
    # Rows 7, 5, 3, 1 (step -2 down past row 0), columns 5 and 6 (an end of -1), channels 2..5.
    b = _slice(g, x, [-1, 5, 2], [-INT64_MAX, -1, 6], [2, 3, 1], [-2, 1, 1])  # (1, 4, 4, 2)
    a2 = g.conv(a, 4, 2, k=1)
    b2 = g.conv(b, 4, 2, k=1)
    graph = check_all_stages(g.model([a2, b2]), (1, 3, 8, 8), {"slice"})
    assert [layer.op for layer in graph.layers] == ["conv", "slice", "slice", "conv", "conv"]
    assert graph.layers[1].output_shape == (1, 4, 8, 3)
    assert graph.layers[2].output_shape == (1, 4, 4, 2)
    assert graph.layers[2].attr("steps") == (1, 1, -2, 1) and graph.layers[2].attr("ends")[2] == -1


def _split(opset: int):
    g = GraphBuilder((1, 3, 6, 6), opset=opset)
    x = g.conv(g.input_name, 3, 8, pads=[1, 1, 1, 1])
    if opset >= 18:
        g.node("Split", [x], n_outputs=3, axis=1, num_outputs=3)  # sizes 3, 3, 2
    elif opset >= 13:
        g.node("Split", [x, g.const(np.array([3, 3, 2], np.int64))], n_outputs=3, axis=-3)
    else:
        g.node("Split", [x], n_outputs=3, axis=1, split=[3, 3, 2])
    parts = list(g.nodes[-1].output)
    y = g.node("Concat", [parts[2], parts[0], parts[1]], axis=1)  # a channel permutation of x
    return g.model(g.conv(y, 8, 4, k=1)), g.nodes[-3].name


@pytest.mark.parametrize("opset", [11, 13, 18])
def test_split_is_one_slice_layer_per_output_through_every_stage(opset):
    model, split_name = _split(opset)
    graph = check_all_stages(model, (1, 3, 6, 6), {"slice", "concat"})
    assert [layer.op for layer in graph.layers] == ["conv", "slice", "slice", "slice", "concat", "conv"]
    assert [layer.name for layer in graph.layers[1:4]] == [f"{split_name}_out{i}" for i in range(3)]
    assert [layer.output_shape[1] for layer in graph.layers[1:4]] == [3, 3, 2]


def test_slice_integers_are_an_exact_copy_on_the_input_grid():
    g = GraphBuilder((1, 3, 8, 8))
    y = _slice(g, g.conv(g.input_name, 3, 6), [4, 0], [0, 5], [2, 3], [-1, 2])
    graph = lower_model(g.model(y), "s.onnx")
    layer = graph.layers[1]
    module = op("slice")
    qp = activation_qparams(-2.0, 2.0, "symmetric-int8")
    q = np.random.default_rng(1).integers(-127, 128, layer.input_shapes[0], dtype=np.int8)
    out, _ = module.execute(module.quantize(layer, (qp,), qp, CONFIG.quant, None), [q], None)
    np.testing.assert_array_equal(out, q[:, :, 4:0:-1, 0:5:2])
    assert module.vector_cost(layer, [q.size], out.size, 256, True).passes == 1  # 72 elements: one vector


def test_a_slice_of_everything_is_an_alias_and_cutting_the_batch_is_refused():
    g = GraphBuilder((1, 3, 8, 8))
    y = _slice(g, g.conv(g.input_name, 3, 6), [0, -100], [INT64_MAX, 100], [1, 2])
    assert [layer.op for layer in lower_model(g.model(y), "s.onnx").layers] == ["conv", "reshape"]
    g = GraphBuilder((1, 3, 8, 8))
    y = _slice(g, g.conv(g.input_name, 3, 6), [1], [2], [0])
    with pytest.raises(ModelError, match="batch axis"):
        lower_model(g.model(y), "s.onnx", batch=4)
