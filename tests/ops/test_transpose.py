import numpy as np
import pytest

from onnx_graphs import GraphBuilder
from op_checks import CONFIG, check_all_stages

from tpusim.errors import ModelError
from tpusim.frontend import lower_model
from tpusim.mapping.isa import Activate
from tpusim.mapping.tiler import compile_program
from tpusim.ops import op
from tpusim.quant.arithmetic import activation_qparams


def test_nhwc_transpose_in_front_of_a_flatten_through_every_stage():
    # tflite2onnx: the NCHW conv output goes back to TFLite's NHWC order before the flatten.
    g = GraphBuilder((1, 3, 5, 6))
    x = g.conv(g.input_name, 3, 4)
    t = g.node("Transpose", [x], perm=[0, 2, 3, 1])
    f = g.node("Flatten", [t], axis=1)
    y = g.node("Gemm", [f, g.weight((10, 3 * 4 * 4))], transB=1)
    graph = check_all_stages(g.model(y), (1, 3, 5, 6), {"transpose"})
    assert [layer.op for layer in graph.layers] == ["conv", "transpose", "reshape", "gemm"]
    assert graph.layers[1].output_shape == (1, 3, 4, 4)


def test_channel_shuffle_through_every_stage():
    # ShuffleNet's shuffle: Reshape [N, g, C/g, H, W] -> Transpose(0, 2, 1, 3, 4) -> Reshape [N, C, H, W],
    # with the batch hard-coded as torch writes it (so the model declares batch 1 too).
    g = GraphBuilder((1, 4, 6, 6))
    x = g.conv(g.input_name, 4, 8, pads=[1, 1, 1, 1])
    r = g.node("Reshape", [x, g.const(np.array([1, 2, 4, 6, 6], np.int64))])
    t = g.node("Transpose", [r], perm=[0, 2, 1, 3, 4])
    s = g.node("Reshape", [t, g.const(np.array([1, -1, 6, 6], np.int64))])
    y = g.conv(s, 8, 4, k=1)
    graph = check_all_stages(g.model(y, batch_dim=1), (1, 4, 6, 6), {"transpose"})
    assert [layer.op for layer in graph.layers] == ["conv", "reshape", "transpose", "reshape", "conv"]
    assert graph.layers[1].output_shape == (1, 2, 4, 6, 6)
    assert graph.layers[2].output_shape == (1, 4, 2, 6, 6)


def test_transpose_integers_are_an_exact_copy_costing_one_pass_per_vector():
    g = GraphBuilder((1, 3, 5, 6))
    t = g.node("Transpose", [g.conv(g.input_name, 3, 4)], perm=[0, 3, 1, 2])
    graph = lower_model(g.model(t), "t.onnx")
    layer = graph.layers[1]
    assert layer.attr("perm") == (0, 3, 1, 2) and layer.output_shape == (1, 4, 4, 3)
    q = np.random.default_rng(0).integers(0, 256, layer.input_shapes[0], dtype=np.uint8)
    module = op("transpose")
    assert module.inherits_grid
    qp = activation_qparams(-1.0, 1.0, "asymmetric-uint8")
    y, _ = module.execute(module.quantize(layer, (qp,), qp, CONFIG.quant, None), [q], None)
    np.testing.assert_array_equal(y, q.transpose(0, 3, 1, 2))
    cost = module.vector_cost(layer, [q.size], q.size, 256, True)
    assert cost.passes == 1 and cost.requant_ops == 0  # 48 elements: one 256-lane vector
    program = compile_program(graph, CONFIG)
    (activate,) = [i for i in program.instructions if isinstance(i, Activate) and i.layer == 1]
    assert activate.out_bytes == q.size and sum(s.nbytes for s in activate.sources) == q.size


def test_a_transpose_of_unit_dims_only_is_a_reshape_alias():
    # NHWC -> NCHW of a 1x1 map moves no byte.
    g = GraphBuilder((1, 3, 1, 1))
    t = g.node("Transpose", [g.conv(g.input_name, 3, 5, k=1)], perm=[0, 2, 3, 1])
    graph = lower_model(g.model(t), "t.onnx")
    assert [layer.op for layer in graph.layers] == ["conv", "reshape"]
    assert graph.layers[1].output_shape == (1, 1, 1, 5)


def test_moving_the_batch_axis_is_refused():
    g = GraphBuilder((1, 3, 5, 6))
    t = g.node("Transpose", [g.conv(g.input_name, 3, 4)], perm=[1, 0, 2, 3])
    with pytest.raises(ModelError, match="moves the batch axis"):
        lower_model(g.model(t), "t.onnx")
