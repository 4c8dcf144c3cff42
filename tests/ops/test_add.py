import numpy as np
import pytest

from onnx_graphs import GraphBuilder
from op_checks import CONFIG, check_all_stages
from tpusim import ops
from tpusim.ir import Layer
from tpusim.ops.add import _FusedAdd
from tpusim.quant.arithmetic import QParams

SHAPE = (1, 4, 8, 8)
f32 = np.float32


def test_broadcast_add_of_two_activations():
    g = GraphBuilder(SHAPE)
    x = g.conv(g.input_name, 4, 4, pads=[1, 1, 1, 1])
    y = g.node("Add", [g.node("GlobalAveragePool", [x]), x])
    graph = check_all_stages(g.model(y), SHAPE, {"add"})
    assert [layer.op for layer in graph.layers] == ["conv", "global_avgpool", "add"]
    assert graph.layers[-1].output_shape == (1, 4, 8, 8)


def test_constant_after_conv_still_folds_into_its_bias():
    g = GraphBuilder(SHAPE)
    shift = np.array([0.5, -1.0, 0.25, 2.0], f32)
    y = g.node("Add", [g.const(shift.reshape(1, 4, 1, 1)), g.conv(g.input_name, 4, 4, bias=False)])
    graph = check_all_stages(g.model(y), SHAPE, {"conv"})
    assert [layer.op for layer in graph.layers] == ["conv"]
    np.testing.assert_array_equal(graph.layers[0].bias, shift)


def test_last_axis_constant_against_nchw_is_not_a_conv_bias():
    # [C] broadcasts along W, not along the conv's channels: an affine layer along axis 3.
    g = GraphBuilder((1, 4, 4, 4))
    y = g.node("Add", [g.conv(g.input_name, 4, 4, pads=[1, 1, 1, 1]), g.const(np.arange(4, dtype=f32))])
    graph = check_all_stages(g.model(y), (1, 4, 4, 4), {"affine"})
    assert [(layer.op, layer.axis) for layer in graph.layers][1] == ("affine", 3)


def test_scalar_after_a_clamped_conv_is_a_table_and_x_plus_f_of_x_one_table():
    g = GraphBuilder(SHAPE)
    x = g.node("Relu", [g.conv(g.input_name, 4, 4)])
    y = g.node("Add", [x, g.node("Sigmoid", [g.node("Add", [x, g.const(f32(-1.0))])])])
    graph = check_all_stages(g.model(y), SHAPE, {"unary"})
    assert [layer.op for layer in graph.layers] == ["conv", "unary"]


def test_add_kernel_is_exact_on_one_grid():
    shape = (1, 2, 2, 3)
    layer = Layer(name="a", op="add", inputs=("a", "b"), output="y", input_shapes=(shape, (1, 2, 1, 1)),
                  output_shape=shape)
    qp = QParams(np.array(0.125), np.array(100), 0, 255)
    ql = ops.op("add").quantize(layer, (qp, qp), qp, CONFIG.quant, None)
    rng = np.random.default_rng(2)
    a, b = rng.integers(0, 256, shape).astype(np.uint8), rng.integers(0, 256, (1, 2, 1, 1)).astype(np.uint8)
    y, _ = ops.op("add").execute(ql, [a, b], None)
    np.testing.assert_array_equal(y, np.clip(a.astype(int) + b.astype(int) - 100, 0, 255))


def _general_path(module, ql, inputs):
    """The broadcasting path (rescale each input, sum in int32, requantize) that the one-pass kernel must equal."""
    from tpusim.ops.add import ADD_LEFT_SHIFT
    from tpusim.quant.qlayer import INT32_MAX, INT32_MIN, centered, rescale, rescale_output

    total = np.zeros(ql.layer.output_shape, np.int32)
    for q, qp, r, sign in zip(inputs, ql.input_qparams, ql.input_rescales, module.signs):
        term = rescale(centered(q, qp.zero_point) << ADD_LEFT_SHIFT, r, 0, INT32_MIN, INT32_MAX)
        total = total + term if sign > 0 else total - term
    return rescale_output(ql, total)


@pytest.mark.parametrize("name", ["add", "sub"])
@pytest.mark.parametrize("grids", [
    ((0.109375, 100, 0, 255), (0.0703125, 3, 0, 255), (0.203125, 0, 0, 255)),
    ((0.109375, 0, -128, 127), (0.3125, 0, -128, 127), (0.046875, -3, -128, 127)),
    ((0.5, 128, 0, 255), (0.5, 128, 0, 255), (0.5, 128, 0, 255)),       # one grid: exact sums, clamps at both ends
])
@pytest.mark.parametrize("layouts", [("nchw", "nchw"), ("channels-last", "channels-last"), ("nchw", "channels-last")])
def test_one_pass_kernel_equals_the_general_path(name, grids, layouts):
    shape = (2, 16, 5, 7)
    layer = Layer(name="a", op=name, inputs=("a", "b"), output="y", input_shapes=(shape, shape), output_shape=shape)
    qa, qb, qy = (QParams(np.array(s), np.array(z), lo, hi) for s, z, lo, hi in grids)
    module = ops.op(name)
    ql = module.quantize(layer, (qa, qb), qy, CONFIG.quant, None)
    rng = np.random.default_rng(len(name))
    a = rng.integers(qa.qmin, qa.qmax + 1, shape).astype(qa.storage_dtype)
    b = rng.integers(qb.qmin, qb.qmax + 1, shape).astype(qb.storage_dtype)
    want = _general_path(module, ql, [a, b])

    def stored(q, layout):
        return q if layout == "nchw" else np.ascontiguousarray(q.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)

    inputs = [stored(a, layouts[0]), stored(b, layouts[1])]
    got, wrapped = module.execute(ql, inputs, None)
    assert got.dtype == want.dtype and wrapped == 0
    np.testing.assert_array_equal(got, want)
    assert np.count_nonzero(got == ql.out_qmin)
    for table in (True, False):  # 8-bit inputs take the table; the arithmetic kernel holds it too
        fused = _FusedAdd.of(ql, module.signs, table=table)
        assert fused._looks_up is table
        by_kernel = fused(inputs)
        assert by_kernel.dtype == want.dtype
        np.testing.assert_array_equal(by_kernel, want)
        if layouts[0] == layouts[1] == "channels-last":
            assert by_kernel.transpose(0, 2, 3, 1).flags.c_contiguous  # the output keeps its inputs' memory order


@pytest.mark.parametrize("name", ["add", "sub"])
def test_one_pass_kernel_on_every_pair_of_values_with_ties_at_both_signs(name):
    # Inputs on one grid and an output step four times theirs: the output is (q_a -+ q_b - 2 z) / 4 exactly,
    # so every residue mod 4 occurs and the halves round away from zero on both sides of zero.
    a, b = (np.repeat(np.arange(256, dtype=np.uint8), 256), np.tile(np.arange(256, dtype=np.uint8), 256))
    shape = (1, 256, 16, 16)
    layer = Layer(name="a", op=name, inputs=("a", "b"), output="y", input_shapes=(shape, shape), output_shape=shape)
    module = ops.op(name)
    grid = QParams(np.array(0.5), np.array(128), 0, 255)
    ql = module.quantize(layer, (grid, grid), QParams(np.array(2.0), np.array(128), 0, 255), CONFIG.quant, None)
    inputs = [a.reshape(shape), b.reshape(shape)]
    got, _ = module.execute(ql, inputs, None)
    np.testing.assert_array_equal(got, _general_path(module, ql, inputs))
    for table in (True, False):
        np.testing.assert_array_equal(_FusedAdd.of(ql, module.signs, table=table)(inputs), got)
    signed = -1 if name == "sub" else 1
    total = (a.astype(int) - 128) + signed * (b.astype(int) - 128)
    np.testing.assert_array_equal(got.reshape(-1), np.clip(np.sign(total) * ((np.abs(total) + 2) // 4) + 128, 0, 255))


def test_rescales_that_could_leave_int32_take_the_general_path():
    # A hand-made layer whose input rescale multiplies by 8: terms reach 255 * 2**23, past int32, where the
    # general path clamps them; the one-pass kernel's shortcuts do not hold and it must not run.
    import dataclasses

    from tpusim.quant.qlayer import Requant

    shape = (1, 4, 3, 3)
    layer = Layer(name="a", op="add", inputs=("a", "b"), output="y", input_shapes=(shape, shape), output_shape=shape)
    grid = QParams(np.array(0.5), np.array(0), 0, 255)
    ql = ops.op("add").quantize(layer, (grid, grid), grid, CONFIG.quant, None)
    ql = dataclasses.replace(ql, input_rescales=(Requant.of(8.0), Requant.of(8.0)))
    a = np.full(shape, 255, np.uint8)
    got, _ = ops.op("add").execute(ql, [a, a], None)
    want = _general_path(ops.op("add"), ql, [a, a])
    np.testing.assert_array_equal(got, want)
    # Where the shortcuts fail, the table (built by the general path) is the one fused kernel, on any CPU.
    assert _FusedAdd.of(ql, (1, 1), table=False)._looks_up
    # Both terms clamp to 2**31 - 1 and their int32 sum wraps to -2: the lowest output, where unclamped
    # arithmetic gives the highest.
    assert not want.any()
    from tpusim.ops.add import _add_block

    unclamped = np.empty(a.size, np.uint8)
    _add_block(a.reshape(-1), a.reshape(-1), 0, 0, int(ql.input_rescales[0].m0[0]), int(ql.input_rescales[1].m0[0]),
               int(ql.requant.m0[0]), int(ql.input_rescales[0].shift[0]), int(ql.input_rescales[1].shift[0]),
               int(ql.requant.shift[0]), False, 0, 0, 255, unclamped)
    assert (unclamped == 255).all()


@pytest.mark.parametrize("name", ["add", "sub"])
@pytest.mark.parametrize("dtypes", [(np.uint8, np.int8), (np.int8, np.uint8), (np.int8, np.int8)])
def test_table_holds_the_general_path_for_every_pair_of_bytes_of_either_sign(name, dtypes):
    # The table is indexed by the inputs' bytes: an int8 input's negative values sit in its upper half.
    grids = {np.dtype(np.uint8): QParams(np.array(0.0703125), np.array(3), 0, 255),
             np.dtype(np.int8): QParams(np.array(0.109375), np.array(-5), -128, 127)}
    qa, qb = (grids[np.dtype(d)] for d in dtypes)
    shape = (1, 256, 16, 16)
    layer = Layer(name="a", op=name, inputs=("a", "b"), output="y", input_shapes=(shape, shape), output_shape=shape)
    module = ops.op(name)
    ql = module.quantize(layer, (qa, qb), QParams(np.array(0.15625), np.array(-2), -128, 127), CONFIG.quant, None)
    bytes_a, bytes_b = np.repeat(np.arange(256, dtype=np.uint8), 256), np.tile(np.arange(256, dtype=np.uint8), 256)
    inputs = [bytes_a.view(dtypes[0]).reshape(shape), bytes_b.view(dtypes[1]).reshape(shape)]
    fused = _FusedAdd.of(ql, module.signs)
    assert fused._looks_up and fused.takes(inputs)
    np.testing.assert_array_equal(fused(inputs), _general_path(module, ql, inputs))
    assert not fused.takes([inputs[0].astype(np.int32), inputs[1]])  # another dtype than prepared: general path
