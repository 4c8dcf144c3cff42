"""The generic "function of one tensor" fusion (tpusim.ops._table) and its expression trees (tpusim.ops._expr)."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from onnx_graphs import GraphBuilder
from op_checks import CONFIG, check_all_stages
from tpusim import ops
from tpusim.errors import ModelError
from tpusim.frontend import lower_model
from tpusim.ir import Layer
from tpusim.ops._expr import X, const, emit, evaluate, formula
from tpusim.ops._table import identify
from tpusim.quant.arithmetic import QParams, dequantize, quantize

SHAPE = (1, 4, 8, 8)
f32 = np.float32


def test_scalar_steps_and_table_ops_compose_into_one_table():
    g = GraphBuilder(SHAPE)
    x = g.node("Relu", [g.conv(g.input_name, 4, 4)])          # fused: the conv cannot take the Mul
    y = g.node("Mul", [x, g.const(f32(0.5))])
    y = g.node("Sigmoid", [g.node("Sub", [g.const(f32(1.0)), y])])
    y = g.node("Div", [g.node("Tanh", [y]), g.const(f32(3.0))])
    graph = check_all_stages(g.model(y), SHAPE, {"unary"})
    assert [layer.op for layer in graph.layers] == ["conv", "unary"]
    assert formula(graph.layers[1].attr("expr")) == "div(tanh(sigmoid(sub(1, mul(x, 0.5)))), 3)"


def test_two_nonlinearities_of_one_tensor_stay_separate_layers():
    g = GraphBuilder(SHAPE)
    x = g.conv(g.input_name, 4, 4)
    y = g.node("Add", [g.node("Sigmoid", [x]), g.node("Tanh", [x])])
    assert [layer.op for layer in lower_model(g.model(y), "m.onnx").layers] == ["conv", "sigmoid", "tanh", "add"]


def test_x_op_f_of_x_merges_even_without_a_name():
    g = GraphBuilder(SHAPE)
    x = g.conv(g.input_name, 4, 4)
    y = g.node("Add", [x, g.node("Pow", [g.node("Sigmoid", [x]), g.const(np.int64(2))])])
    graph = check_all_stages(g.model(y), SHAPE, {"unary"})
    assert [layer.op for layer in graph.layers] == ["conv", "unary"]
    assert formula(graph.layers[1].attr("expr")) == "add(x, pow(sigmoid(x), 2))"


def test_pow_of_two_different_tensors_is_refused():
    g = GraphBuilder(SHAPE)
    y = g.node("Pow", [g.conv(g.input_name, 4, 4), g.conv(g.input_name, 4, 4)])
    with pytest.raises(ModelError, match="Pow of two computed tensors"):
        lower_model(g.model(y), "m.onnx")


def test_identify_names_known_functions_and_leaves_others_unary():
    assert identify(("fn", "erf", (), X)) == ("erf", ())
    assert identify(("mul", ("fn", "sigmoid", (), X), X))[0] == "silu"
    assert identify(("mul", X, ("fn", "sigmoid", (), ("mul", X, const(1.702)))))[0] == "unary"
    assert identify(("div", X, const(0.0)))[0] == "unary"  # not finite on the probe grid


def _ort_of(tree, x: np.ndarray) -> np.ndarray:
    class B:  # the exporter's builder interface
        def __init__(self):
            self.nodes, self.inits = [], []

        def const(self, name, array):
            self.inits.append(onnx.numpy_helper.from_array(np.asarray(array), name))
            return name

        def node(self, op, inputs, output, name, **attrs):
            self.nodes.append(helper.make_node(op, list(inputs), [output], name=name, **attrs))
            return output

    b = B()
    emit(b, tree, "x", "y", "layer")
    graph = helper.make_graph(b.nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [x.size])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], b.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


@pytest.mark.parametrize("name, attrs", [("silu", ()), ("gelu", (("approximate", "none"),)),
                                         ("gelu", (("approximate", "tanh"),)), ("hardswish", ()), ("mish", ())])
def test_exported_nodes_compute_the_table_function(name, attrs):
    layer = Layer(name="t", op=name, inputs=("x",), output="y", input_shapes=((1,),), output_shape=(1,), attrs=attrs)
    tree = ops.op(name).expression(layer) or ("fn", name, attrs, X)
    x = np.linspace(-8, 8, 4001, dtype=np.float32)
    ours, theirs = evaluate(tree, x), _ort_of(tree, x)
    # Same float32 steps; ONNX Runtime's own exp/tanh/erf approximations differ by a few ulp.
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)


def test_table_covers_the_minus_128_ort_saturates_to():
    layer = Layer(name="t", op="silu", inputs=("x",), output="y", input_shapes=((4,),), output_shape=(4,))
    qp = QParams(np.array(0.03125), np.array(0), -127, 127)
    ql = ops.op("silu").quantize(layer, (qp,), qp, CONFIG.quant, None)
    q = np.array([-128, -127, 0, 127], np.int8)
    y, _ = ops.op("silu").execute(ql, [q], None)
    x = dequantize(q, qp)
    np.testing.assert_array_equal(y, quantize(x / (1 + np.exp(-x)), qp))
    assert ql.lut.shape == (256,)


@pytest.mark.parametrize("storage", ["uint8", "int8", "int16"])
@pytest.mark.parametrize("layout", ["nchw", "channels-last", "strided"])
def test_table_lookup_is_its_numpy_oracle_and_keeps_the_input_layout(storage, layout):
    from tpusim.ops._table import look_up_reference, table_range

    shape = (2, 5, 3, 4)
    layer = Layer(name="t", op="silu", inputs=("x",), output="y", input_shapes=(shape,), output_shape=shape)
    qp = {"uint8": QParams(np.array(0.0625), np.array(100), 0, 255),
          "int8": QParams(np.array(0.03125), np.array(0), -127, 127),
          "int16": QParams(np.array(2.0**-10), np.array(0), -2000, 2000)}[storage]
    ql = ops.op("silu").quantize(layer, (qp,), QParams(np.array(0.03125), np.array(3), 0, 255), CONFIG.quant, None)
    lo, hi = table_range(qp)
    q = np.random.default_rng(3).integers(lo, hi + 1, shape).astype(qp.storage_dtype)
    if layout == "channels-last":
        q = np.ascontiguousarray(q.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    elif layout == "strided":
        q = np.repeat(q, 2, axis=-1)[..., ::2]
    y, _ = ops.op("silu").execute(ql, [q], None)
    np.testing.assert_array_equal(y, look_up_reference(ql.lut, q, lo))
    assert y.dtype == ql.lut.dtype
    if layout == "channels-last" and storage != "int16":
        assert y.transpose(0, 2, 3, 1).flags.c_contiguous  # what the next conv reads without a copy
