import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from tpusim.errors import ModelError
from tpusim.quant.arithmetic import (
    QParams,
    activation_qparams,
    bias_to_int32,
    dequantize,
    integer_range,
    quantize,
    quantize_reference,
    symmetric_scale,
    weight_qparams,
)


def test_integer_ranges():
    assert integer_range(symmetric=False) == (0, 255)
    assert integer_range(symmetric=True) == (-127, 127)
    assert integer_range(symmetric=True, num_bits=4) == (-7, 7)


def test_asymmetric_activation_params_exact():
    qp = activation_qparams(-1.0, 3.0, "asymmetric-uint8")
    assert qp.scale == np.float64(np.float32(4.0 / 255.0))
    assert qp.zero_point == 64  # rint(1 / (4 / 255)) = rint(63.75)
    assert (qp.qmin, qp.qmax, qp.axis, qp.storage_dtype) == (0, 255, None, np.uint8)
    assert quantize(np.float32(0.0), qp) == 64 and dequantize(np.uint8(64), qp) == 0.0


def test_asymmetric_range_is_widened_to_contain_zero():
    positive = activation_qparams(1.0, 3.0, "asymmetric-uint8")
    assert positive.zero_point == 0 and positive.scale == np.float64(np.float32(3.0 / 255.0))
    negative = activation_qparams(-2.0, -1.0, "asymmetric-uint8")
    assert negative.zero_point == 255


def test_symmetric_activation_params():
    qp = activation_qparams(-2.0, 1.0, "symmetric-int8")
    assert qp.scale == np.float64(np.float32(2.0 / 127.0)) and qp.zero_point == 0
    assert (qp.qmin, qp.qmax, qp.storage_dtype) == (-127, 127, np.int8)
    np.testing.assert_array_equal(quantize(np.array([-2.0, 2.0, 5.0, -9.0]), qp), [-127, 127, 127, -127])


@pytest.mark.parametrize("scheme", ["asymmetric-uint8", "symmetric-int8"])
def test_degenerate_range_still_has_a_positive_scale(scheme):
    qp = activation_qparams(0.0, 0.0, scheme)
    assert qp.scale == 1.0 and qp.zero_point == 0
    assert dequantize(quantize(np.zeros(3), qp), qp).tolist() == [0.0, 0.0, 0.0]


def test_invalid_activation_requests():
    with pytest.raises(ValueError, match="scheme"):
        activation_qparams(-1.0, 1.0, "asymmetric-int4")
    with pytest.raises(ValueError, match="range"):
        activation_qparams(1.0, -1.0, "asymmetric-uint8")


def test_round_half_to_even_and_saturation():
    qp = QParams(np.array(1.0), np.array(0), -127, 127)
    x = np.array([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5, 127.5, 1e9, -np.inf], dtype=np.float32)
    np.testing.assert_array_equal(quantize(x, qp), [0, 2, 2, 0, -2, -2, 126, 127, 127, -127])
    shifted = QParams(np.array(0.5), np.array(10), 0, 255)
    # x / s = 2.5 -> 2 (even), + 10
    assert quantize(np.float32(1.25), shifted) == 12


def test_quantize_error_within_half_a_step_inside_the_range():
    rng = np.random.default_rng(0)
    x = rng.uniform(-0.7, 2.3, 10000).astype(np.float32)
    qp = activation_qparams(-0.7, 2.3, "asymmetric-uint8")
    error = np.abs(dequantize(quantize(x, qp), qp) - x)
    assert error.max() <= 0.5 * qp.scale * (1 + 1e-5)


def test_weight_params_per_tensor_and_per_channel():
    w = np.array([[0.5, -1.0, 0.25], [2.0, 0.0, -0.5], [0.0, 0.0, 0.0]], dtype=np.float32)
    tensor = weight_qparams(w, "per-tensor")
    assert tensor.scale == np.float64(np.float32(2.0 / 127)) and tensor.axis is None
    channel = weight_qparams(w, "per-channel", axis=0)
    np.testing.assert_array_equal(channel.scale, np.float32([1.0 / 127, 2.0 / 127, 1.0]).astype(np.float64))
    np.testing.assert_array_equal(channel.zero_point, [0, 0, 0])
    q = quantize(w, channel)
    assert q.dtype == np.int8
    np.testing.assert_array_equal(q, [[64, -127, 32], [127, 0, -32], [0, 0, 0]])  # 63.5 -> 64
    with pytest.raises(ValueError, match="channel parameters"):
        quantize(w[:2], channel)
    w_in_last_axis = weight_qparams(w.T, "per-channel", axis=-1)
    assert w_in_last_axis.axis == 1
    np.testing.assert_array_equal(quantize(w.T, w_in_last_axis), q.T)


def test_weight_params_reject_bad_tensors():
    with pytest.raises(ModelError, match="fc.weight"):
        weight_qparams(np.array([1.0, np.nan]), "per-tensor", name="fc.weight")
    with pytest.raises(ValueError, match="granularity"):
        weight_qparams(np.ones(3), "per-row")


def test_qparams_validation():
    with pytest.raises(ValueError, match="float32"):
        QParams(np.array(0.1), np.array(0), 0, 255)
    with pytest.raises(ValueError, match="zero points"):
        QParams(np.array(1.0), np.array(300), 0, 255)
    with pytest.raises(ValueError, match="axis"):
        QParams(np.array([1.0, 2.0]), np.array([0, 0]), -127, 127)
    with pytest.raises(ValueError, match="positive"):
        QParams(np.array(0.0), np.array(0), -127, 127)


def test_bias_to_int32():
    s_w = np.array([0.5, 0.25])
    np.testing.assert_array_equal(bias_to_int32(np.array([1.3, -0.7]), s_w, 0.1), [26, -28])
    # half to even on the accumulator grid: 2.5 -> 2, 3.5 -> 4
    np.testing.assert_array_equal(bias_to_int32(np.array([2.5, 3.5]), 1.0, 1.0), [2, 4])
    saturated = bias_to_int32(np.array([1.0, -1.0]), 1e-6, 1e-6)
    np.testing.assert_array_equal(saturated, [2**31 - 1, -(2**31)])
    assert saturated.dtype == np.int32


def _run_onnx(nodes, inputs, initializers, output_type, output_shape):
    graph = helper.make_graph(
        nodes,
        "q",
        [helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
         for name, v in inputs.items()],
        [helper.make_tensor_value_info("y", output_type, output_shape)],
        [numpy_helper.from_array(v, name) for name, v in initializers.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, inputs)[0]


def test_quantize_and_dequantize_match_onnx_runtime_bit_for_bit():
    rng = np.random.default_rng(7)
    qp = activation_qparams(-1.3, 4.1, "asymmetric-uint8")
    scale = np.float32(qp.scale)
    ties = ((np.arange(-200, 200) + 0.5) * scale).astype(np.float32)  # x / s lands near k + 0.5
    x = np.concatenate([rng.uniform(-2, 5, 20000).astype(np.float32), ties, np.float32([0, -0.0, 1e6, -1e6])])
    node = helper.make_node("QuantizeLinear", ["x", "s", "z"], ["y"])
    expected = _run_onnx([node], {"x": x}, {"s": np.array(scale), "z": np.array(qp.zero_point, dtype=np.uint8)},
                         TensorProto.UINT8, x.shape)
    ours = quantize(x, qp)
    assert ours.dtype == expected.dtype
    np.testing.assert_array_equal(ours, expected)
    node = helper.make_node("DequantizeLinear", ["x", "s", "z"], ["y"])
    expected = _run_onnx([node], {"x": ours}, {"s": np.array(scale), "z": np.array(qp.zero_point, dtype=np.uint8)},
                         TensorProto.FLOAT, x.shape)
    np.testing.assert_array_equal(dequantize(ours, qp), expected)


def test_per_channel_quantize_matches_onnx_runtime():
    rng = np.random.default_rng(8)
    w = (rng.normal(size=(6, 3, 3, 3)) * rng.uniform(0.01, 3, size=(6, 1, 1, 1))).astype(np.float32)
    qp = weight_qparams(w, "per-channel", axis=0)
    node = helper.make_node("QuantizeLinear", ["x", "s", "z"], ["y"], axis=0)
    expected = _run_onnx([node], {"x": w}, {"s": qp.scale.astype(np.float32), "z": qp.zero_point.astype(np.int8)},
                         TensorProto.INT8, w.shape)
    np.testing.assert_array_equal(quantize(w, qp), expected)


@pytest.mark.parametrize("qp", [
    QParams(np.array(0.5), np.array(0), -128, 127),
    QParams(np.array(0.0625), np.array(128), 0, 255),
    QParams(np.array(3.0), np.array(-7), -32768, 32767),
    QParams(np.array([0.5, 0.25, 2.0]), np.array([0, 10, -3]), -128, 127, axis=1),
    QParams(np.array([0.5, 0.25, 2.0, 1.0]), np.array([0, 1, 2, 3]), 0, 255, axis=-1),
], ids=["int8", "uint8", "int16", "per-channel axis 1", "per-channel last axis"])
def test_quantize_equals_its_numpy_oracle_bit_for_bit(qp):
    rng = np.random.default_rng(3)
    shape = (2, 3, 5, 4)
    x = (rng.standard_normal(shape) * 200).astype(np.float32)
    x.flat[:40] = np.arange(40, dtype=np.float32) * 0.25 - 5.0  # ties (k + 0.5) * scale, which round to even
    x.flat[40:43] = (np.inf, -np.inf, 1e30)
    got, want = quantize(x, qp), quantize_reference(x, qp)
    assert got.dtype == want.dtype == qp.storage_dtype and got.shape == want.shape == shape
    np.testing.assert_array_equal(got, want)
    assert quantize(x.astype(np.float64), qp).tobytes() == quantize_reference(x.astype(np.float64), qp).tobytes()


def test_quantize_of_a_scalar_and_an_empty_tensor():
    qp = QParams(np.array(0.5), np.array(0), -128, 127)
    assert quantize(np.float32(1.25), qp).shape == () and int(quantize(np.float32(1.25), qp)) == 2
    assert quantize(np.zeros((0, 3), np.float32), qp).shape == (0, 3)
    with pytest.raises(ValueError, match="channel parameters"):
        quantize(np.zeros((2, 4), np.float32), QParams(np.array([1.0, 2.0, 3.0]), np.zeros(3), -128, 127, axis=1))


@pytest.mark.parametrize("granularity", ["per-tensor", "per-channel"])
def test_weight_scales_are_those_of_the_largest_magnitude_per_channel(granularity):
    rng = np.random.default_rng(4)
    w = rng.standard_normal((6, 3, 3, 3)).astype(np.float32)
    w[1] = -np.abs(w[1]) * 5  # a channel whose largest magnitude is its minimum
    w[2] = 0.0
    w[3] = -0.0
    for axis in (0, 1, -1):
        got = weight_qparams(w, granularity, axis=axis)
        rows = np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)
        amax = np.max(np.abs(w)) if granularity == "per-tensor" else np.max(np.abs(rows), axis=1)
        assert np.array_equal(got.scale, symmetric_scale(amax, 127))
        assert got.axis == (None if granularity == "per-tensor" else axis % w.ndim)
    for bad in (np.nan, np.inf, -np.inf):
        broken = w.copy()
        broken[4, 1, 2, 0] = bad
        with pytest.raises(ModelError, match="conv1 weight: weight tensor contains NaN or inf"):
            weight_qparams(broken, granularity, name="conv1 weight")
