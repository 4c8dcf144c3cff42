"""Canonicalisation: every kind of exporter noise, built with onnx.helper, removed without changing
what ONNX Runtime computes; every failure one line."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx_graphs import GraphBuilder

from tpusim.errors import ModelError
from tpusim.frontend import canonical
from tpusim.frontend.canonical import Canonical, canonicalize, load_model

WHERE = "m.onnx"
NOISE = {"Shape", "Size", "Identity", "Constant", "Dropout"}


def _ort(model: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})


def _ops(model: onnx.ModelProto) -> list[str]:
    return [node.op_type for node in model.graph.node]


def _input(shape, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _check(original: onnx.ModelProto, result: Canonical, seed: int = 1) -> None:
    """Same outputs as the original under ONNX Runtime; clean; valid; every value statically shaped."""
    x = _input(result.input_shape, seed)
    want, got = _ort(original, x), _ort(result.model, x)
    assert len(want) == len(got)
    for w, g in zip(want, got):
        assert g.shape == w.shape and g.dtype == w.dtype
        np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-6)
    assert not NOISE & set(_ops(result.model)), _ops(result.model)
    onnx.checker.check_model(result.model)
    model = result.model
    assert [vi.name for vi in model.graph.input] == [result.input_name]
    typed = {vi.name: vi for vi in list(model.graph.value_info) + list(model.graph.output)}
    for node in model.graph.node:
        for name in node.output:
            dims = typed[name].type.tensor_type.shape.dim
            assert all(d.HasField("dim_value") for d in dims), (name, dims)
    declared = model.graph.input[0].type.tensor_type.shape.dim
    assert tuple(d.dim_value for d in declared) == result.input_shape


def _finish(b: GraphBuilder, outputs, batch_dim="batch", spatial=None) -> onnx.ModelProto:
    """``b.model()`` for graphs whose output shape onnx's own inference cannot follow (that is the
    noise under test): such an output is declared with symbolic dims of the rank ONNX Runtime gives."""
    outputs = [outputs] if isinstance(outputs, str) else list(outputs)
    shape = [batch_dim, *(spatial if spatial is not None else b.input_shape[1:])]
    graph = helper.make_graph(b.nodes, "test_graph", [_float_input(b.input_name, shape)],
                              [onnx.ValueInfoProto(name=o) for o in outputs], b.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", b.opset)])
    model.ir_version = min(model.ir_version, 10)
    inferred = {vi.name: vi for vi in onnx.shape_inference.infer_shapes(model).graph.output}
    concrete = [d if isinstance(d, int) else 1 for d in shape]
    results = None
    for output in model.graph.output:
        info = inferred.get(output.name)
        if info is not None and info.type.tensor_type.HasField("shape"):
            output.type.CopyFrom(info.type)
            continue
        if results is None:
            session_model = onnx.ModelProto()
            session_model.CopyFrom(model)
            for o in session_model.graph.output:
                o.type.CopyFrom(helper.make_tensor_type_proto(TensorProto.FLOAT, None))
            results = dict(zip(outputs, _ort(session_model, _input(concrete))))
        rank = results[output.name].ndim
        output.type.CopyFrom(helper.make_tensor_type_proto(
            helper.np_dtype_to_tensor_dtype(results[output.name].dtype), [f"d{i}" for i in range(rank)]))
    onnx.checker.check_model(model)
    return model


def _error(model, **kwargs) -> str:
    with pytest.raises(ModelError) as info:
        canonicalize(model, WHERE, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def _const(name: str, array) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(array), name)


def _raw_model(nodes, inputs, outputs, initializers=(), opset: int = 13, ir_version: int | None = None):
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir_version or min(model.ir_version, 10)
    return model


def _float_input(name: str, shape) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


# ---------------------------------------------------------------------------------------------
# TorchScript-exporter noise


def test_identity_on_an_initializer_before_conv_is_removed():
    b = GraphBuilder((1, 3, 8, 8))
    weight = b.weight((4, 3, 3, 3))
    shared = b.node("Identity", [weight])  # what torch emits for a weight it shares or reuses
    y = b.node("Conv", ["input", shared], pads=[1, 1, 1, 1])
    y = b.node("Relu", [b.node("Identity", [y])])
    model = b.model(y)
    result = canonicalize(model, WHERE)
    _check(model, result)
    assert _ops(result.model) == ["Conv", "Relu"]
    conv = result.model.graph.node[0]
    assert conv.input[1] == weight
    assert [t.name for t in result.model.graph.initializer] == [weight]


def _torch_flatten(b: GraphBuilder, x: str, opset: int) -> str:
    """x.view(x.size(0), -1) as the TorchScript exporter writes it."""
    shape = b.node("Shape", [x])
    batch = b.node("Gather", [shape, b.const(np.array(0, np.int64))], axis=0)
    if opset >= 13:
        batch = b.node("Unsqueeze", [batch, b.const(np.array([0], np.int64))])
    else:
        batch = b.node("Unsqueeze", [batch], axes=[0])
    target = b.node("Concat", [batch, b.const(np.array([-1], np.int64))], axis=0)
    return b.node("Reshape", [x, target])


@pytest.mark.parametrize("opset", [11, 13, 17])
@pytest.mark.parametrize("batch", [None, 3])
def test_torch_style_flatten_folds_to_a_constant_reshape(opset, batch):
    b = GraphBuilder((1, 3, 6, 6), opset=opset)
    y = b.node("Relu", [b.conv("input", 3, 4, pads=[1, 1, 1, 1])])
    flat = _torch_flatten(b, y, opset)
    out = b.node("Gemm", [flat, b.weight((10, 4 * 36)), b.const(np.zeros(10, np.float32))], transB=1)
    model = _finish(b, out)
    result = canonicalize(model, WHERE, batch=batch)
    _check(model, result)
    assert _ops(result.model) == ["Conv", "Relu", "Reshape", "Gemm"]
    reshape = result.model.graph.node[2]
    target = numpy_helper.to_array(next(t for t in result.model.graph.initializer if t.name == reshape.input[1]))
    assert target.tolist() == [batch or 1, -1]
    assert result.input_shape == (batch or 1, 3, 6, 6) and result.original_batch is None


def test_shape_of_the_graph_input_folds():
    b = GraphBuilder((1, 2, 3, 4))
    flat = _torch_flatten(b, "input", 13)
    model = _finish(b, b.node("Gemm", [flat, b.weight((24, 5))]))
    result = canonicalize(model, WHERE, batch=2)
    _check(model, result)
    assert _ops(result.model) == ["Reshape", "Gemm"]


def test_shape_arithmetic_iterates_to_a_fixed_point():
    """Shape of a Reshape's output is static only once that Reshape's target has been folded."""
    b = GraphBuilder((1, 2, 4, 4))
    y = b.conv("input", 2, 4, k=1)
    flat = _torch_flatten(b, y, 13)
    shape = b.node("Shape", [flat])                       # static only after the first fold
    features = b.node("Slice", [shape, b.const(np.array([1], np.int64)), b.const(np.array([2], np.int64))])
    half = b.node("Div", [features, b.const(np.array([2], np.int64))])
    target = b.node("Concat", [b.const(np.array([-1], np.int64)), half], axis=0)
    size = b.node("Cast", [b.node("Size", [flat])], to=TensorProto.FLOAT)
    out = b.node("Mul", [b.node("Reshape", [flat, target]), size])
    model = _finish(b, out)
    result = canonicalize(model, WHERE, batch=2)
    _check(model, result)
    assert _ops(result.model) == ["Conv", "Reshape", "Mul"]  # the flatten and the halving merge


def test_constant_of_shape_range_equal_where_expand_fold():
    b = GraphBuilder((1, 4, 3, 3))
    y = b.conv("input", 4, 4, k=1)
    shape = b.node("Shape", [y])
    ones = b.node("ConstantOfShape", [shape], value=helper.make_tensor("v", TensorProto.FLOAT, [1], [1.0]))
    channels = b.node("Range", [b.const(np.array(0, np.int64)), b.const(np.array(4, np.int64)),
                                b.const(np.array(1, np.int64))])
    mask = b.node("Equal", [b.node("Mod", [channels, b.const(np.array(2, np.int64))]), b.const(np.array(0, np.int64))])
    scale = b.node("Where", [mask, b.const(np.array(2.0, np.float32)), b.const(np.array(0.5, np.float32))])
    scale = b.node("Reshape", [scale, b.const(np.array([1, 4, 1, 1], np.int64))])
    scale = b.node("Mul", [b.node("Expand", [scale, shape]), ones])
    scale = b.node("Sqrt", [b.node("Pow", [scale, b.const(np.array(2.0, np.float32))])])
    out = b.node("Mul", [y, b.node("Neg", [b.node("Neg", [scale])])])
    model = _finish(b, out, batch_dim=1)
    result = canonicalize(model, WHERE)
    _check(model, result)
    assert _ops(result.model) == ["Conv", "Mul"]
    folded = numpy_helper.to_array(next(t for t in result.model.graph.initializer
                                        if t.name == result.model.graph.node[1].input[1]))
    assert folded.shape == (1, 4, 3, 3) and folded[0, :, 0, 0].tolist() == [2.0, 0.5, 2.0, 0.5]


def test_constant_nodes_of_every_form_become_initializers():
    channels = 4
    b = GraphBuilder((1, 3, 5, 5))
    weight = numpy_helper.from_array((b.rng.standard_normal((channels, 3, 3, 3)) * 0.3).astype(np.float32), "wt")
    w = b.node("Constant", [], value=weight)
    y = b.node("Conv", ["input", w], pads=[1, 1, 1, 1])
    y = b.node("Mul", [y, b.node("Constant", [], value_float=1.5)])
    bias = b.node("Constant", [], value_floats=[0.1, -0.2, 0.3, -0.4])
    shape = b.node("Constant", [], value_ints=[1, channels, 1, 1])
    y = b.node("Add", [y, b.node("Reshape", [bias, shape])])
    # flatten with a value_int index, and a sparse constant added to the features
    index = b.node("Constant", [], value_int=0)
    batch = b.node("Unsqueeze", [b.node("Gather", [b.node("Shape", [y]), index]),
                                 b.node("Constant", [], value_ints=[0])])
    flat = b.node("Reshape", [y, b.node("Concat", [batch, b.node("Constant", [], value_ints=[-1])], axis=0)])
    features = channels * 25
    sparse = helper.make_sparse_tensor(
        helper.make_tensor("values", TensorProto.FLOAT, [3], [1.0, 2.0, 3.0]),
        helper.make_tensor("indices", TensorProto.INT64, [3], [0, 7, features - 1]), [features])
    out = b.node("Add", [flat, b.node("Constant", [], sparse_value=sparse)])
    model = _finish(b, out)
    result = canonicalize(model, WHERE, batch=2)
    _check(model, result)
    assert _ops(result.model) == ["Conv", "Mul", "Add", "Reshape", "Add"]
    inits = {t.name: numpy_helper.to_array(t) for t in result.model.graph.initializer}
    assert inits[w].dtype == np.float32 and inits[w].shape == (channels, 3, 3, 3)
    assert inits[result.model.graph.node[2].input[1]].shape == (1, channels, 1, 1)
    dense = inits[result.model.graph.node[4].input[1]]
    assert dense.shape == (features,) and dense[[0, 7, features - 1]].tolist() == [1.0, 2.0, 3.0]
    assert dense.sum() == 6.0


def test_dropout_is_removed_in_inference_mode():
    b = GraphBuilder((1, 3, 6, 6))
    y = b.node("Dropout", [b.conv("input", 3, 4, pads=[1, 1, 1, 1]), b.const(np.array(0.3, np.float32)),
                           b.const(np.array(False))], n_outputs=2)  # the mask output is not read
    y = b.node("Dropout", [b.node("Relu", [y])])
    model = b.model(y)
    result = canonicalize(model, WHERE)
    _check(model, result)
    assert _ops(result.model) == ["Conv", "Relu"]
    assert result.model.graph.output[0].name == y  # a graph output keeps its name


def test_dropout_with_a_read_mask_is_one_line():
    b = GraphBuilder((1, 3, 6, 6))
    y = b.node("Dropout", [b.conv("input", 3, 4)], n_outputs=2)
    node = b.nodes[-1]
    out = b.node("Mul", [y, b.node("Cast", [node.output[1]], to=TensorProto.FLOAT)])
    assert _error(b.model(out)) == (f"{WHERE}: node {node.name!r} (Dropout): output {node.output[1]!r} (the dropout "
                                    "mask) is read; only inference graphs are supported")


def test_dropout_in_training_mode_is_one_line():
    b = GraphBuilder((1, 3, 6, 6))
    y = b.node("Dropout", [b.conv("input", 3, 4), b.const(np.array(0.5, np.float32)), b.const(np.array(True))])
    node = b.nodes[-1]
    assert _error(b.model(y)) == (f"{WHERE}: node {node.name!r} (Dropout): training_mode is true; only inference "
                                  "graphs are supported")


def test_noop_cast_goes_and_a_real_cast_stays():
    b = GraphBuilder((1, 3, 4, 4))
    y = b.node("Relu", [b.node("Cast", ["input"], to=TensorProto.FLOAT)])
    y = b.node("Cast", [b.node("Cast", [y], to=TensorProto.FLOAT16)], to=TensorProto.FLOAT)
    y = b.node("Cast", [y], to=TensorProto.FLOAT)
    model = b.model(y)
    result = canonicalize(model, WHERE)
    _check(model, result)
    assert _ops(result.model) == ["Relu", "Cast", "Cast"]
    assert [a.i for n in result.model.graph.node[1:] for a in n.attribute] == [TensorProto.FLOAT16, TensorProto.FLOAT]
    assert result.model.graph.node[-1].output[0] == y


def test_identity_graph_outputs_keep_their_names():
    b = GraphBuilder((1, 3, 4, 4))
    y = b.node("Relu", ["input"])
    first = b.node("Identity", [y])
    second = b.node("Identity", [first])  # both are graph outputs: one of them must stay an Identity
    model = b.model([first, second])
    result = canonicalize(model, WHERE)
    x = _input(result.input_shape)
    for w, g in zip(_ort(model, x), _ort(result.model, x)):
        np.testing.assert_array_equal(g, w)
    assert _ops(result.model) == ["Relu", "Identity"]
    assert [o.name for o in result.model.graph.output] == [first, second]
    assert list(result.model.graph.node[0].output) == [first]


def test_model_local_functions_are_inlined_and_stale_value_info_is_ignored():
    b = GraphBuilder((1, 3, 4, 4))
    y = b.conv("input", 3, 4, k=1)
    b.nodes.append(helper.make_node("ScaledRelu", [y], ["act"], domain="local", name="call"))
    out = b.node("Identity", ["act"])
    function = helper.make_function(
        "local", "ScaledRelu", ["x"], ["y"],
        [helper.make_node("Constant", [], ["two"], value_float=2.0), helper.make_node("Mul", ["x", "two"], ["m"]),
         helper.make_node("Relu", ["m"], ["y"])], [helper.make_opsetid("", 17)])
    graph = helper.make_graph(b.nodes, "g", [_float_input("input", [1, 3, 4, 4])], [_float_input(out, [1, 4, 4, 4])],
                              b.initializers)
    model = helper.make_model(graph, functions=[function], opset_imports=[helper.make_opsetid("", 17),
                                                                          helper.make_opsetid("local", 1)])
    model.ir_version = 10
    # torch writes value_info for every tensor, with the batch it traced: 1 here, 3 below
    model.graph.value_info.extend(onnx.shape_inference.infer_shapes(model).graph.value_info)
    onnx.checker.check_model(model)
    result = canonicalize(model, WHERE, batch=3)
    assert _ops(result.model) == ["Conv", "Mul", "Relu"]
    x = _input((3, 3, 4, 4))
    want = np.concatenate([_ort(model, x[i:i + 1])[0] for i in range(3)])
    np.testing.assert_allclose(_ort(result.model, x)[0], want, rtol=1e-6, atol=1e-6)
    shapes = {vi.name: [d.dim_value for d in vi.type.tensor_type.shape.dim] for vi in result.model.graph.value_info}
    assert shapes[y] == [3, 4, 4, 4]


# ---------------------------------------------------------------------------------------------
# Old opsets


def _old_model(opset: int, mode: str = "nearest") -> onnx.ModelProto:
    """A zoo-style CNN at opset 7 or 9: initializers listed as graph inputs (IR 3), BN, Upsample,
    Dropout, Reshape, Flatten and Gemm."""
    r = np.random.default_rng(0)
    inits = [_const("w", (r.standard_normal((4, 3, 3, 3)) * 0.3).astype(np.float32))]
    inits += [_const(n, r.uniform(0.5, 1.5, 4).astype(np.float32)) for n in ("gamma", "beta", "mean", "var")]
    inits += [_const("shape", np.array([1, 4, 8, 8], np.int64)), _const("fw", r.standard_normal((256, 10)).astype(np.float32)),
              _const("fb", r.standard_normal(10).astype(np.float32))]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], name="conv"),
             helper.make_node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"], ["bn"], epsilon=1e-5,
                              name="bn", **({"spatial": 1} if opset < 9 else {})),
             helper.make_node("Relu", ["bn"], ["r"], name="relu")]
    if opset >= 9:
        inits.append(_const("scales", np.array([1, 1, 2, 2], np.float32)))
        nodes.append(helper.make_node("Upsample", ["r", "scales"], ["up"], mode=mode, name="up"))
    else:
        nodes.append(helper.make_node("Upsample", ["r"], ["up"], mode=mode, scales=[1.0, 1.0, 2.0, 2.0], name="up"))
    nodes += [helper.make_node("Dropout", ["up"], ["d"], ratio=0.3, name="drop"),
              helper.make_node("Reshape", ["d", "shape"], ["rs"], name="reshape"),
              helper.make_node("Flatten", ["rs"], ["f"], axis=1, name="flatten"),
              helper.make_node("Gemm", ["f", "fw", "fb"], ["y"], name="fc")]
    inputs = [_float_input("x", [1, 3, 4, 4])] + [
        helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in inits]
    model = _raw_model(nodes, inputs, [_float_input("y", [1, 10])], inits, opset=opset, ir_version=3)
    onnx.checker.check_model(model)
    return model


@pytest.mark.parametrize("opset", [7, 9])
def test_old_opsets_are_converted(opset):
    model = _old_model(opset)
    result = canonicalize(model, WHERE)
    _check(model, result)
    assert result.source_opset == opset
    assert canonical._default_opset(result.model) == canonical.TARGET_OPSET
    assert _ops(result.model) == ["Conv", "BatchNormalization", "Relu", "Resize", "Reshape", "Flatten", "Gemm"]
    assert result.input_name == "x" and result.original_batch == 1


def test_bilinear_upsample_keeps_its_coordinates_through_conversion():
    """onnx.version_converter drops Upsample's asymmetric coordinate mapping; canonical restores it."""
    model = _old_model(9, mode="linear")
    result = canonicalize(model, WHERE)
    _check(model, result)
    resize = next(n for n in result.model.graph.node if n.op_type == "Resize")
    attrs = {a.name: helper.get_attribute_value(a) for a in resize.attribute}
    assert attrs["coordinate_transformation_mode"] == b"asymmetric"


def test_a_failed_conversion_is_one_line():
    nodes = [helper.make_node("BatchNormalization", ["x", "g", "b", "m", "v"], ["y"], spatial=0, name="bn")]
    inits = [_const(n, np.ones(3, np.float32)) for n in "gbmv"]
    model = _raw_model(nodes, [_float_input("x", [1, 3, 4, 4])], [_float_input("y", [1, 3, 4, 4])], inits,
                       opset=7, ir_version=5)
    assert _error(model) == (f"{WHERE}: cannot convert opset 7 to {canonical.TARGET_OPSET} with "
                             "onnx.version_converter: Attribute spatial must have value 1")
    nodes = [helper.make_node("Foo", ["x"], ["y"], name="n")]
    model = _raw_model(nodes, [_float_input("x", [1, 3])], [_float_input("y", [1, 3])], opset=9, ir_version=5)
    assert _error(model) == (f"{WHERE}: node 'n' (Foo): no such op in opset 9; cannot convert the model to "
                             f"opset {canonical.TARGET_OPSET}")


def test_an_opset_newer_than_onnx_knows_is_one_line():
    model = _raw_model([helper.make_node("Relu", ["x"], ["y"])], [_float_input("x", [1, 3])], [_float_input("y", [1, 3])],
                       opset=999)
    newest = onnx.defs.onnx_opset_version()
    assert _error(model) == (f"{WHERE}: opset 999 is newer than the installed onnx {onnx.__version__} knows "
                             f"(up to {newest}); upgrade onnx or export with opset <= {newest}")


# ---------------------------------------------------------------------------------------------
# Transposes (tf2onnx / tflite2onnx NHWC wrapping)

NHWC, NCHW = [0, 2, 3, 1], [0, 3, 1, 2]


def test_nhwc_transpose_pairs_around_convs_cancel():
    b = GraphBuilder((1, 3, 6, 6))
    y = b.conv("input", 3, 4, pads=[1, 1, 1, 1])
    y = b.node("Transpose", [b.node("Transpose", [y], perm=NHWC)], perm=NCHW)     # a bare pair
    y = b.conv(y, 4, 4, pads=[1, 1, 1, 1])
    y = b.node("Transpose", [b.node("Relu", [b.node("Transpose", [y], perm=NHWC)])], perm=NCHW)  # Relu in NHWC
    y = b.conv(y, 4, 4, pads=[1, 1, 1, 1])
    bias = b.const(np.arange(4, dtype=np.float32))  # an NHWC bias: broadcast over the last axis
    y = b.node("Transpose", [b.node("Add", [b.node("Transpose", [y], perm=NHWC), bias])], perm=NCHW)
    left = b.node("Transpose", [b.conv(y, 4, 4, k=1)], perm=NHWC)
    right = b.node("Transpose", [b.conv(y, 4, 4, k=1)], perm=NHWC)
    y = b.node("Transpose", [b.node("Add", [left, right])], perm=NCHW)           # a residual add in NHWC
    y = b.node("Clip", [b.node("Transpose", [b.node("Transpose", [y], perm=NHWC)], perm=NCHW),
                        b.const(np.array(0.0, np.float32)), b.const(np.array(6.0, np.float32))])
    model = b.model(y)
    result = canonicalize(model, WHERE)
    _check(model, result)
    assert _ops(result.model) == ["Conv", "Conv", "Relu", "Conv", "Add", "Conv", "Conv", "Add", "Clip"]
    moved_bias = next(numpy_helper.to_array(t) for t in result.model.graph.initializer
                      if t.name == result.model.graph.node[4].input[1])
    assert moved_bias.shape == (1, 4, 1, 1) and moved_bias.reshape(-1).tolist() == [0, 1, 2, 3]


def test_a_lone_transpose_stays_and_consecutive_ones_compose():
    b = GraphBuilder((1, 3, 4, 5))
    y = b.conv("input", 3, 4, k=1)
    nhwc = b.node("Transpose", [b.node("Transpose", [y], perm=[0, 1, 2, 3])], perm=NHWC)  # identity, then real
    twice = b.node("Transpose", [b.node("Transpose", [y], perm=NHWC)], perm=NHWC)
    model = b.model([nhwc, twice])
    result = canonicalize(model, WHERE)
    _check(model, result)
    assert _ops(result.model) == ["Conv", "Transpose", "Transpose"]
    perms = [list(n.attribute[0].ints) for n in result.model.graph.node[1:]]
    assert perms == [NHWC, [0, 3, 1, 2]]  # NHWC twice: (N, C, H, W) -> (N, H, W, C) -> (N, W, C, H)
    assert [n.input[0] for n in result.model.graph.node[1:]] == [y, y]


def test_default_perm_transposes_of_a_matrix_cancel_and_constant_transposes_fold():
    b = GraphBuilder((1, 6))
    weight_io = b.weight((6, 5))  # stored transposed, as TF exporters do
    y = b.node("Gemm", ["input", b.node("Transpose", [weight_io])], transB=1)
    y = b.node("Transpose", [b.node("Transpose", [y])])  # no perm: reverse the dims, twice
    model = b.model(y)
    result = canonicalize(model, WHERE, batch=3)
    _check(model, result)
    assert _ops(result.model) == ["Gemm"]
    assert result.model.graph.node[0].output[0] == y
    (weight,) = [numpy_helper.to_array(t) for t in result.model.graph.initializer]
    assert weight.shape == (5, 6)


# ---------------------------------------------------------------------------------------------
# QDQ models


def test_qdq_nodes_and_int8_weights_survive():
    b = GraphBuilder((1, 3, 6, 6))
    scale, zero = b.const(np.array(0.05, np.float32)), b.const(np.array(0, np.int8))
    xq = b.node("QuantizeLinear", ["input", scale, zero])
    xd = b.node("DequantizeLinear", [xq, scale, zero])
    w_int8 = b.const(b.rng.integers(-127, 128, (4, 3, 3, 3)).astype(np.int8), "wq")
    w_scale = b.node("Constant", [], value=numpy_helper.from_array(np.full(4, 0.01, np.float32), "ws"))
    w_zero = b.const(np.zeros(4, np.int8))
    wd = b.node("DequantizeLinear", [b.node("Identity", [w_int8]), w_scale, w_zero], axis=0)
    bias = b.node("Mul", [b.const(np.arange(4, dtype=np.float32)), b.const(np.array(0.1, np.float32))])
    y = b.node("Relu", [b.node("Conv", [xd, wd, bias], pads=[1, 1, 1, 1])])
    out = b.node("DequantizeLinear", [b.node("QuantizeLinear", [y, scale, zero]), scale, zero])
    model = b.model(out)
    result = canonicalize(model, WHERE)
    _check(model, result)
    assert _ops(result.model) == ["QuantizeLinear", "DequantizeLinear", "DequantizeLinear", "Conv", "Relu",
                                  "QuantizeLinear", "DequantizeLinear"]
    inits = {t.name: t for t in result.model.graph.initializer}
    weight_dq = result.model.graph.node[2]
    assert weight_dq.input[0] == w_int8 and inits[w_int8].data_type == TensorProto.INT8
    assert inits[weight_dq.input[1]].data_type == TensorProto.FLOAT
    assert numpy_helper.to_array(inits[result.model.graph.node[3].input[2]]).tolist() == pytest.approx([0, .1, .2, .3])


def test_quantize_linear_of_a_constant_weight_is_not_folded():
    b = GraphBuilder((1, 2, 4, 4))
    scale, zero = b.const(np.array(0.02, np.float32)), b.const(np.array(0, np.int8))
    wq = b.node("QuantizeLinear", [b.weight((2, 2, 1, 1)), scale, zero])
    y = b.node("Conv", ["input", b.node("DequantizeLinear", [wq, scale, zero])])
    model = b.model(y)
    result = canonicalize(model, WHERE)
    _check(model, result)
    assert _ops(result.model) == ["QuantizeLinear", "DequantizeLinear", "Conv"]


# ---------------------------------------------------------------------------------------------
# The input shape and the batch


def _dynamic_model(dims) -> onnx.ModelProto:
    b = GraphBuilder((1, 3, 8, 8))
    y = b.node("GlobalAveragePool", [b.conv("input", 3, 4, pads=[1, 1, 1, 1])])
    return b.model(y, batch_dim=dims[0], spatial=dims[1:])


def test_batch_and_input_shape_set_the_static_input():
    model = _dynamic_model(["batch", 3, 8, 8])
    assert canonicalize(model, WHERE).input_shape == (1, 3, 8, 8)
    result = canonicalize(model, WHERE, batch=5)
    assert result.input_shape == (5, 3, 8, 8) and result.original_batch is None
    _check(model, result)
    dynamic = _dynamic_model(["n", 3, "h", "w"])
    result = canonicalize(dynamic, WHERE, input_shape=(2, 3, 10, 12))
    assert result.input_shape == (2, 3, 10, 12)
    _check(dynamic, result)
    assert canonicalize(dynamic, WHERE, batch=4, input_shape=(2, 3, 10, 12)).input_shape == (4, 3, 10, 12)
    static = _dynamic_model([1, 3, 8, 8])
    result = canonicalize(static, WHERE)
    assert result.input_shape == (1, 3, 8, 8) and result.original_batch == 1


def test_a_hard_coded_batch_in_a_reshape_follows_the_new_batch():
    b = GraphBuilder((1, 3, 4, 4))
    y = b.node("Reshape", [b.conv("input", 3, 2, k=1), b.const(np.array([1, -1], np.int64))])
    out = b.node("Gemm", [y, b.weight((32, 5))])
    model = b.model(out, batch_dim=1)
    result = canonicalize(model, WHERE, batch=3)
    assert result.original_batch == 1 and result.input_shape == (3, 3, 4, 4)
    reshape = result.model.graph.node[1]
    target = next(numpy_helper.to_array(t) for t in result.model.graph.initializer if t.name == reshape.input[1])
    assert target.tolist() == [0, -1]
    x = _input((3, 3, 4, 4))
    want = np.concatenate([_ort(model, x[i:i + 1])[0] for i in range(3)])
    np.testing.assert_allclose(_ort(result.model, x)[0], want, rtol=1e-6, atol=1e-6)
    assert tuple(d.dim_value for d in result.model.graph.output[0].type.tensor_type.shape.dim) == (3, 5)


def test_input_shape_errors_are_one_line():
    dynamic = _dynamic_model(["batch", 3, "h", "w"])
    assert _error(dynamic) == (f"{WHERE}: input 'input' has dynamic dims [2, 3] (shape [batch, 3, h, w]); "
                               "pass --input-shape, e.g. 1,3,224,224")
    assert _error(dynamic, input_shape=(1, 3, 8)) == (f"{WHERE}: --input-shape 1,3,8 has rank 3, but input 'input' "
                                                       "has rank 4 (shape [batch, 3, h, w])")
    assert _error(dynamic, input_shape=(1, 3, 0, 8)) == f"{WHERE}: --input-shape 1,3,0,8 has a dimension < 1"
    assert _error(_dynamic_model(["batch", 3, 8, 8]), batch=0) == f"{WHERE}: batch must be >= 1, got 0"
    shapeless = _dynamic_model(["batch", 3, 8, 8])
    shapeless.graph.input[0].type.tensor_type.ClearField("shape")
    assert _error(shapeless) == (f"{WHERE}: input 'input' declares no shape; pass --input-shape, "
                                 "e.g. 1,3,224,224")
    assert canonicalize(shapeless, WHERE, input_shape=(1, 3, 8, 8)).input_shape == (1, 3, 8, 8)


def test_two_inputs_are_one_line_and_listed_initializers_are_not_inputs():
    model = _raw_model([helper.make_node("Add", ["a", "b"], ["y"])], [_float_input("a", [1, 2]), _float_input("b", [1, 2])],
                       [_float_input("y", [1, 2])])
    assert _error(model) == f"{WHERE}: expected exactly one input tensor, found ['a', 'b']"
    model.graph.initializer.append(_const("b", np.ones((1, 2), np.float32)))
    result = canonicalize(model, WHERE)
    assert result.input_name == "a" and [i.name for i in result.model.graph.input] == ["a"]
    _check(model, result)


def test_failures_inside_libraries_are_one_line():
    b = GraphBuilder((1, 6))
    bad = b.node("Reshape", [b.const(np.arange(6, dtype=np.float32)), b.const(np.array([4], np.int64))])
    node = b.nodes[-1]
    out = b.node("Add", ["input", bad])
    model = _raw_model(b.nodes, [_float_input("input", [1, 6])], [_float_input(out, [1, 6])], b.initializers)
    message = _error(model)
    assert message.startswith(f"{WHERE}: node {node.name!r} (Reshape): cannot fold this constant computation: ")
    b = GraphBuilder((1, 3))
    y = b.node("MatMul", ["input", b.weight((4, 2))])  # 4 rows for 3 features
    node = b.nodes[-1]
    model = _raw_model(b.nodes, [_float_input("input", [1, 3])], [onnx.ValueInfoProto(name=y)], b.initializers)
    assert _error(model) == (f"{WHERE}: node {node.name!r} (MatMul): shape inference: Incompatible dimensions "
                             "for matrix multiplication")


def test_the_input_model_is_not_modified():
    b = GraphBuilder((1, 3, 4, 4))
    y = b.node("Identity", [b.node("Dropout", [b.conv("input", 3, 4)])])
    model = b.model(y)
    before = model.SerializeToString()
    canonicalize(model, WHERE, batch=2)
    assert model.SerializeToString() == before


def test_dead_nodes_and_initializers_are_pruned():
    b = GraphBuilder((1, 3, 4, 4))
    y = b.node("Relu", ["input"])
    b.node("Conv", [y, b.weight((4, 3, 1, 1))])  # nothing reads it
    model = b.model(y)
    result = canonicalize(model, WHERE)
    assert _ops(result.model) == ["Relu"] and not result.model.graph.initializer


# ---------------------------------------------------------------------------------------------
# Files: external data and read failures


def _conv_model() -> onnx.ModelProto:
    b = GraphBuilder((1, 3, 8, 8))
    y = b.node("Relu", [b.conv("input", 3, 8, pads=[1, 1, 1, 1])])
    return b.model(b.conv(y, 8, 8, pads=[1, 1, 1, 1]))


def _save_external(model: onnx.ModelProto, folder) -> str:
    path = folder / "m.onnx"
    model = onnx.ModelProto.FromString(model.SerializeToString())  # saving moves the copy's weights out
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="m.onnx.data", size_threshold=0)
    return str(path)


def test_external_data_round_trip(tmp_path):
    model = _conv_model()
    path = _save_external(model, tmp_path)
    assert (tmp_path / "m.onnx.data").stat().st_size > 2000
    loaded = load_model(path)
    assert not any(t.data_location == TensorProto.EXTERNAL for t in loaded.graph.initializer)
    result = canonicalize(loaded, path, batch=2)
    _check(model, result)
    assert _ops(result.model) == ["Conv", "Relu", "Conv"]


def test_reading_a_model_says_whether_it_kept_weights_in_external_files(tmp_path):
    model = _conv_model()
    path = _save_external(model, tmp_path)
    loaded, _, external = canonical.read_model(path)
    assert external and not any(t.data_location == TensorProto.EXTERNAL for t in loaded.graph.initializer)
    inline = tmp_path / "inline.onnx"
    onnx.save(model, inline)
    assert canonical.read_model(inline)[2] is False


def test_unloaded_external_data_is_one_line(tmp_path):
    path = _save_external(_conv_model(), tmp_path)
    unloaded = onnx.load_model(path, load_external_data=False)
    name = unloaded.graph.initializer[0].name
    assert _error(unloaded) == (f"{WHERE}: initializer {name!r} keeps its data in an external file that was not "
                                "loaded (read the model with tpusim.frontend.canonical.load_model)")


def _load_error(path) -> str:
    with pytest.raises(ModelError) as info:
        load_model(path)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_external_data_failures_are_one_line(tmp_path):
    path = _save_external(_conv_model(), tmp_path)
    data = tmp_path / "m.onnx.data"
    first = onnx.load_model(path, load_external_data=False).graph.initializer[0].name
    content = data.read_bytes()
    data.write_bytes(content[: len(content) - 100])
    message = _load_error(path)
    assert message.startswith(f"{path}: external data file 'm.onnx.data' is truncated: initializer ")
    data.unlink()
    assert _load_error(path) == (f"{path}: external data file 'm.onnx.data' (needed by initializer {first!r}) "
                                 f"not found in {tmp_path.resolve()}")


def test_read_failures_are_one_line(tmp_path):
    assert _load_error(tmp_path) == f"{tmp_path}: is a folder, not an ONNX model file"
    missing = tmp_path / "missing.onnx"
    assert _load_error(missing) == f"{missing}: no such model file"
    good = tmp_path / "good.onnx"
    onnx.save_model(_conv_model(), str(good))
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(good.read_bytes()[:700])
    assert _load_error(truncated).startswith(f"{truncated}: not a readable ONNX model")
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\xff\xfe not a protobuf at all \x00\x01" * 10)
    assert _load_error(garbage).startswith(f"{garbage}: not a readable ONNX model")
    assert load_model(good).graph.node


def test_checker_failures_are_one_line(tmp_path):
    model = _conv_model()
    model.graph.node[1].op_type = "NoSuchOp"
    path = tmp_path / "bad.onnx"
    onnx.save_model(model, str(path))
    assert _load_error(path) == f"{path}: ONNX checker: No Op registered for NoSuchOp with domain_version of 17"
    for c_out in (4, 64):  # a small weight (the checker's own check) and a large one (ours, same words)
        b = GraphBuilder((1, 3, 8, 8))
        model = b.model(b.conv("input", 3, c_out))
        weight = model.graph.initializer[0]
        need = len(weight.raw_data)
        weight.raw_data = weight.raw_data[:-8]
        onnx.save_model(model, str(path))
        assert _load_error(path) == (f"{path}: ONNX checker: TensorProto (tensor name: {weight.name}) raw_data size "
                                     f"({need - 8} bytes) is too small for the declared shape and type "
                                     f"({need} bytes required).")


def test_arange_gather_and_reshape_chains_become_one_reshape():
    """torch's as_strided of a pooled tensor, as the dynamo exporter writes it for ConvNeXt's head:
    ReduceMean -> Reshape to 1-D (the batch axis gone) -> Gather(arange) -> a (1, C, 1, 1) view."""
    b = GraphBuilder((1, 6, 4, 4))
    pooled = b.node("ReduceMean", [b.conv("input", 6, 6)], axes=[2, 3], keepdims=1)
    flat = b.node("Reshape", [pooled, b.const(np.array([-1], np.int64))])
    y = b.node("Gather", [flat, b.const(np.arange(6, dtype=np.int64).reshape(1, 6, 1, 1))], axis=0)
    model = _finish(b, y, batch_dim=1)
    result = canonicalize(model, "m.onnx")
    _check(model, result)
    assert _ops(result.model) == ["Conv", "ReduceMean", "Reshape"]
    reshape = result.model.graph.node[-1]
    target = {t.name: numpy_helper.to_array(t) for t in result.model.graph.initializer}[reshape.input[1]]
    assert target.tolist() == [1, 6, 1, 1]


def _noisy_model() -> onnx.ModelProto:
    """A model whose canonical form drops an initializer, gains a folded one and a Constant, and keeps
    the others: every case of where a canonical model's initializers come from."""
    b = GraphBuilder((1, 3, 8, 8))
    b.const(np.ones(5, np.float32), "unused")
    y = b.node("Relu", [b.conv("input", 3, 4, pads=[1, 1, 1, 1])])
    shift = b.node("Add", [b.const(np.full((1, 4, 1, 1), 0.25, np.float32)), b.node(
        "Constant", [], value=_const("c", np.full((1, 4, 1, 1), 0.5, np.float32)))])
    y = b.node("Add", [y, shift])
    return b.model(b.node("Reshape", [y, b.node("Shape", [y])]))


def test_a_consumed_model_is_canonicalised_in_place_into_the_same_model_a_copy_gives():
    copied = canonicalize(_noisy_model(), WHERE, batch=2)
    given = _noisy_model()
    consumed = canonicalize(given, WHERE, batch=2, consume=True)
    assert consumed.model is given  # its weights stayed where they were
    assert consumed.model == copied.model
    # The conv's weight and bias kept, "unused1" and the Constant's "c8" gone, the shift and the shape folded.
    assert [t.name for t in consumed.model.graph.initializer] == ["w2", "b3", "add11", "shape15"]
    assert [t.name for t in copied.model.graph.initializer] == ["w2", "b3", "add11", "shape15"]
    untouched = _noisy_model()
    canonicalize(untouched, WHERE, batch=2)
    assert untouched == _noisy_model()


def test_initializers_are_kept_in_place_only_when_their_order_survives():
    source = _noisy_model().graph.initializer
    model = _noisy_model()
    before = onnx.ModelProto()
    before.CopyFrom(model)
    first, second = model.graph.initializer[0], model.graph.initializer[1]
    replaced = _const(first.name, np.zeros(3, np.float32))

    class Work:  # only what _keep_initializers reads
        inits = {first.name: replaced, second.name: second}  # the new first tensor would come after the second

    assert not canonical._keep_initializers(model, Work())
    assert model == before
    Work.inits = {second.name: second, "new": _const("new", np.zeros(3, np.float32))}
    assert canonical._keep_initializers(model, Work())
    assert [t.name for t in model.graph.initializer] == [second.name, "new"]
    assert model.graph.initializer[0] == source[1]


def test_weights_the_checker_read_become_arrays_without_being_read_again(tmp_path):
    b = GraphBuilder((1, 3, 8, 8))
    path = tmp_path / "m.onnx"
    onnx.save(b.model(b.conv("input", 3, 64)), path)
    model, raw, external = canonical.read_model(path)
    assert not external
    weight, bias = model.graph.initializer
    assert list(raw) == [weight.name]  # the bias, 64 floats, is small enough to be checked with the graph
    got, want = canonical.tensor_array(weight, raw), numpy_helper.to_array(weight)
    assert got.base.base is raw[weight.name][1]
    assert got.dtype == want.dtype and got.shape == want.shape and got.flags.writeable == want.flags.writeable
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(canonical.tensor_array(bias, raw), numpy_helper.to_array(bias))
    replaced = _const(weight.name, np.zeros((64, 3, 3, 3), np.float32))  # same name, not the tensor read
    assert not canonical.tensor_array(replaced, raw).any()


@pytest.mark.parametrize("name", ["m.onnx", "m.json"])
def test_a_file_reads_as_onnx_reads_it_binary_or_text(tmp_path, name):
    """Binary files are parsed from a memory map; the text formats onnx infers from the file name stay onnx's."""
    b = GraphBuilder((1, 3, 8, 8))
    path = tmp_path / name
    onnx.save(b.model(b.conv("input", 3, 64)), path)
    assert load_model(path) == onnx.load_model(str(path))
