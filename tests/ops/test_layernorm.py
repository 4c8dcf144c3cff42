import numpy as np
import pytest
from onnx import helper, numpy_helper

from onnx_graphs import GraphBuilder, run_onnxruntime
from op_checks import CONFIG, check_all_stages

from tpusim.frontend import lower_model, run_reference
from tpusim.ops import op
from tpusim.ops.layernorm import fuse_decomposed_layernorm, layer_norm
from tpusim.quant.arithmetic import activation_qparams, dequantize, quantize

SHAPE = (1, 6, 16)


def _layernorm_model(axis: int = -1, bias: bool = True):
    g = GraphBuilder(SHAPE)
    h = g.node("MatMul", [g.input_name, g.weight((16, 12), scale=1.0)])
    normalized = (6, 12)[axis:] if axis < 0 else (6, 12)[axis - 1:]
    args = [h, g.const(g.rng.uniform(0.5, 1.5, normalized).astype(np.float32))]
    if bias:
        args.append(g.const((g.rng.standard_normal(normalized) * 0.2).astype(np.float32)))
    n = g.node("LayerNormalization", args, axis=axis, epsilon=1e-5)
    return g.model(g.node("MatMul", [n, g.weight((12, 4))]))


@pytest.mark.parametrize("axis, bias", [(-1, True), (-2, False)])
def test_layernorm_through_every_stage(axis, bias):
    graph = check_all_stages(_layernorm_model(axis, bias), SHAPE, {"layernorm"})
    assert [layer.op for layer in graph.layers] == ["gemm", "layernorm", "gemm"]
    layer = graph.layers[1]
    assert layer.attr("axis") == axis % 3 and (layer.attr("bias") is not None) == bias


def test_layernorm_integers_are_a_float_step_with_three_passes():
    layer = lower_model(_layernorm_model(), "l.onnx").layers[1]
    module = op("layernorm")
    x_qp, y_qp = activation_qparams(-4.0, 5.0, "asymmetric-uint8"), activation_qparams(-3.0, 3.0, "symmetric-int8")
    q = np.random.default_rng(8).integers(0, 256, layer.input_shapes[0], dtype=np.uint8)
    out, _ = module.execute(module.quantize(layer, (x_qp,), y_qp, CONFIG.quant, None), [q], None)
    normed = layer_norm(dequantize(q, x_qp), 2, 1e-5, layer.attr("scale"), layer.attr("bias"))
    np.testing.assert_array_equal(out, quantize(normed, y_qp))
    cost = module.vector_cost(layer, [q.size], out.size, 256, True)
    assert (cost.passes, cost.requant_ops) == (3 * -(-out.size // 256), out.size)


def _decomposed_model(opset: int, affine: bool = True):
    """nn.LayerNorm(12) as torch's TorchScript exporter writes it below opset 17."""
    g = GraphBuilder(SHAPE, opset=opset)
    x = g.node("MatMul", [g.input_name, g.weight((16, 12), scale=1.0)])

    def mean(t):
        if opset >= 18:
            return g.node("ReduceMean", [t, g.const(np.array([-1], np.int64))])
        return g.node("ReduceMean", [t], axes=[-1])

    def constant(value):
        return g.node("Constant", [], value=numpy_helper.from_array(np.array(value, np.float32)))

    d = g.node("Sub", [x, mean(x)])
    var = mean(g.node("Pow", [d, constant(2.0)]))
    y = g.node("Div", [d, g.node("Sqrt", [g.node("Add", [var, constant(1e-5)])])])
    if affine:
        y = g.node("Mul", [y, g.const(g.rng.uniform(0.5, 1.5, 12).astype(np.float32))])
        y = g.node("Add", [y, g.const((g.rng.standard_normal(12) * 0.2).astype(np.float32))])
    return g.model(g.node("MatMul", [y, g.weight((12, 4))]))


@pytest.mark.parametrize("opset, affine", [(13, True), (18, True), (13, False)])
def test_the_decomposed_torchscript_form_fuses_into_one_layernorm(opset, affine):
    original = _decomposed_model(opset, affine)
    fused = fuse_decomposed_layernorm(original)
    assert [n.op_type for n in fused.graph.node] == ["MatMul", "LayerNormalization", "MatMul"]
    x = np.random.default_rng(9).standard_normal(SHAPE).astype(np.float32)
    graph = lower_model(fused, "l.onnx")
    (theirs,) = run_onnxruntime(original, x)
    np.testing.assert_allclose(run_reference(graph, x)[graph.outputs[0]], theirs, atol=1e-4 * float(np.ptp(theirs)))
    graph = check_all_stages(fused, SHAPE, {"layernorm"})
    assert [layer.op for layer in graph.layers] == ["gemm", "layernorm", "gemm"]
    assert graph.layers[1].attr("axis") == 2 and graph.layers[1].attr("epsilon") == pytest.approx(1e-5)


def test_a_chain_whose_mean_is_read_elsewhere_or_below_opset_13_is_left_alone():
    model = _decomposed_model(13)
    mean_out = next(n for n in model.graph.node if n.op_type == "ReduceMean").output[0]
    model.graph.output.append(helper.make_empty_tensor_value_info(mean_out))
    assert fuse_decomposed_layernorm(model) is model
    old = _decomposed_model(12)
    assert fuse_decomposed_layernorm(old) is old


def test_the_scale_gives_the_normalised_shape_when_shape_inference_cannot():
    # The chain on a tensor whose feature dim shape inference does not know (torch's Shape -> Slice ->
    # Concat -> Reshape before a ViT's first LayerNorm at opset 13 is like that).
    g = GraphBuilder((1, 6, 12), opset=13)
    x = g.input_name
    d = g.node("Sub", [x, g.node("ReduceMean", [x], axes=[-1])])
    var = g.node("ReduceMean", [g.node("Pow", [d, g.const(np.float32(2.0))])], axes=[-1])
    y = g.node("Div", [d, g.node("Sqrt", [g.node("Add", [var, g.const(np.float32(1e-6))])])])
    y = g.node("Mul", [y, g.const(np.full(12, 2.0, np.float32))])
    model = g.model(y, spatial=[6, "features"])
    fused = fuse_decomposed_layernorm(model)
    (node,) = fused.graph.node
    assert node.op_type == "LayerNormalization" and list(node.input)[0] == "input" and len(node.input) == 2
    assert {a.name: helper.get_attribute_value(a) for a in node.attribute} == {"axis": -1,
                                                                               "epsilon": pytest.approx(1e-6)}
    assert [t.name for t in fused.graph.initializer] == [node.input[1]]


def test_layernorm_integers_do_not_depend_on_the_input_layout():
    # numpy's float sums run in memory order: an input laid out otherwise (here its last two axes swapped in
    # memory) is summed as if it were C-contiguous, so no upstream kernel's choice of layout changes an
    # integer (summed in memory order, 12 of these 1.5 million differed).
    from tpusim.ir import Layer

    shape = (1, 2000, 768)
    layer = Layer(name="ln", op="layernorm", inputs=("x",), output="y", input_shapes=(shape,), output_shape=shape,
                  attrs=(("axis", 2), ("epsilon", 1e-5), ("scale", np.ones(768, np.float32)), ("bias", None)))
    module = op("layernorm")
    ql = module.quantize(layer, (activation_qparams(-12.0, 3.0, "asymmetric-uint8"),),
                         activation_qparams(-4.0, 4.0, "asymmetric-uint8"), CONFIG.quant, None)
    q = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    swapped = np.ascontiguousarray(q.transpose(0, 2, 1)).transpose(0, 2, 1)  # the same values, other memory
    np.testing.assert_array_equal(module.execute(ql, [swapped], None)[0], module.execute(ql, [q], None)[0])
