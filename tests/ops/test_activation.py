import math

import numpy as np

from onnx_graphs import GraphBuilder
from op_checks import check_all_stages
from tpusim.frontend import lower_model
from tpusim.ir import Activation
from tpusim.ops.activation import intersect

SHAPE = (1, 4, 8, 8)
f32 = np.float32


def test_second_clamp_intersects_the_first():
    g = GraphBuilder(SHAPE)
    y = g.node("Clip", [g.node("Relu", [g.conv(g.input_name, 4, 4)]), g.const(f32(-1)), g.const(f32(4))])
    graph = check_all_stages(g.model(y), SHAPE, {"conv"})
    assert [(layer.op, layer.activation) for layer in graph.layers] == [("conv", Activation("clip", 0.0, 4.0))]


def test_stand_alone_clamp_is_tightened_in_place():
    g = GraphBuilder(SHAPE)
    y = g.node("Min", [g.node("Max", [g.input_name, g.const(f32(-1))]), g.const(f32(1))])
    graph = check_all_stages(g.model(y), SHAPE, {"activation"})
    assert [(layer.op, layer.activation) for layer in graph.layers] == [("activation", Activation("clip", -1.0, 1.0))]


def test_disjoint_clamps_stay_two_layers():
    g = GraphBuilder(SHAPE)
    y = g.node("Max", [g.node("Clip", [g.conv(g.input_name, 4, 4), g.const(f32(0)), g.const(f32(1))]), g.const(f32(2))])
    graph = lower_model(g.model(y), "m.onnx")
    assert [(layer.op, layer.activation.lo) for layer in graph.layers] == [("conv", 0.0), ("activation", 2.0)]


def test_intersect():
    relu = Activation("relu", 0.0, math.inf)
    assert intersect(relu, Activation("clip", -math.inf, 6.0)) == Activation("clip", 0.0, 6.0)
    assert intersect(Activation("clip", -3.0, 6.0), Activation("clip", 0.0, math.inf)) == Activation("clip", 0.0, 6.0)
    assert intersect(Activation("clip", -1.0, 9.0), relu) == Activation("clip", 0.0, 9.0)
    assert intersect(Activation(), relu) == relu
    assert intersect(Activation("clip", 0.0, 1.0), Activation("clip", 2.0, math.inf)) is None
