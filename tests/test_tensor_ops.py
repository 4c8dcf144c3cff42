import numpy as np
import pytest

from tpusim import tensor_ops
from tpusim.ir import ConvAttrs


def channels_last_memory(x):
    """The same values as x behind the same NCHW shape, stored channels-last (as the integer conv returns them)."""
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)


@pytest.mark.parametrize("shape, kernel, strides, pads, dilations, groups", [
    ((1, 64, 12, 12), (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1),
    ((1, 3, 23, 23), (7, 7), (2, 2), (3, 3, 3, 3), (1, 1), 1),   # a stem: runs of kw * C values
    ((2, 16, 9, 8), (1, 1), (2, 2), (0, 0, 0, 0), (1, 1), 1),
    ((1, 16, 9, 8), (1, 1), (1, 1), (0, 0, 0, 0), (1, 1), 1),
    ((2, 32, 15, 13), (3, 3), (2, 1), (1, 0, 2, 1), (1, 1), 4),
    ((2, 6, 9, 9), (3, 2), (1, 2), (2, 1, 2, 0), (2, 3), 3),
    ((1, 8, 6, 6), (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 8),     # depthwise
    ((1, 3, 224, 224), (7, 7), (2, 2), (3, 3, 3, 3), (1, 1), 1),  # megabytes of columns: several tasks per thread
])
@pytest.mark.parametrize("dtype", [np.uint8, np.int8])
@pytest.mark.parametrize("layout", ["nchw", "channels-last"])
def test_channels_last_im2col_is_im2col_with_its_window_elements_permuted(shape, kernel, strides, pads, dilations,
                                                                          groups, dtype, layout):
    rng = np.random.default_rng(sum(shape) + groups)
    x = rng.integers(-100 if dtype == np.int8 else 0, 120, shape).astype(dtype)
    attrs = ConvAttrs(kernel=kernel, strides=strides, pads=pads, dilations=dilations, groups=groups)
    per_group = shape[1] // groups
    k = per_group * kernel[0] * kernel[1]
    want = tensor_ops.im2col(x, attrs, pad_value=7)
    want = want.reshape(groups, -1, per_group, *kernel).transpose(0, 1, 3, 4, 2).reshape(groups, -1, k)
    source = x if layout == "nchw" else channels_last_memory(x)
    for depth in (k, k + 13):
        got = tensor_ops.im2col_channels_last(source, attrs, 7, depth)
        assert got.shape == (groups, want.shape[1], depth) and got.dtype == x.dtype
        np.testing.assert_array_equal(got[..., :k], want)
        assert not got[..., k:].any()


def test_a_pointwise_conv_of_channels_last_memory_takes_the_input_itself():
    x = channels_last_memory(np.arange(2 * 64 * 3 * 5, dtype=np.uint8).reshape(2, 64, 3, 5))
    attrs = ConvAttrs(kernel=(1, 1), strides=(1, 1), pads=(0, 0, 0, 0), dilations=(1, 1), groups=1)
    cols = tensor_ops.im2col_channels_last(x, attrs)
    assert np.shares_memory(cols, x)
    np.testing.assert_array_equal(cols[0], x.transpose(0, 2, 3, 1).reshape(-1, 64))


def test_depth_below_the_window_is_rejected():
    attrs = ConvAttrs(kernel=(3, 3), strides=(1, 1), pads=(1, 1, 1, 1), dilations=(1, 1), groups=1)
    with pytest.raises(ValueError, match="depth"):
        tensor_ops.im2col_channels_last(np.zeros((1, 2, 4, 4), np.uint8), attrs, 0, 17)


@pytest.mark.parametrize("shape", [(1, 3, 5, 7), (2, 15, 4, 3), (1, 64, 3, 5)])
@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.float32])
def test_channels_last_is_the_transpose_and_a_view_of_channels_last_memory(shape, dtype):
    x = np.random.default_rng(sum(shape)).integers(-100, 100, shape).astype(dtype)
    got = tensor_ops.channels_last(x)  # few integer channels: the compiled copy; else numpy's
    assert got.flags.c_contiguous and got.dtype == x.dtype
    np.testing.assert_array_equal(got, x.transpose(0, 2, 3, 1))
    stored = channels_last_memory(x)
    assert np.shares_memory(tensor_ops.channels_last(stored), stored)


@pytest.mark.parametrize("shape", [(1, 3, 5, 7), (2, 15, 4, 3), (1, 64, 3, 5), (3, 17, 1, 9)])
@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int32, np.float32])
def test_channels_first_is_the_contiguous_copy_and_x_itself_where_x_is_contiguous(shape, dtype):
    x = np.random.default_rng(sum(shape)).integers(-100, 100, shape).astype(dtype)
    assert tensor_ops.channels_first(x) is x
    for view in (channels_last_memory(x), x[:, :, ::-1], x.transpose(0, 1, 3, 2).copy().transpose(0, 1, 3, 2)):
        got = tensor_ops.channels_first(view)  # channels-last memory: the compiled copy; else numpy's
        assert got.flags.c_contiguous and got.dtype == x.dtype
        assert got is view if view.flags.c_contiguous else not np.shares_memory(got, view)  # (an axis of 1: contiguous)
        np.testing.assert_array_equal(got, view)


@pytest.mark.parametrize("groups, batch, h, w, n", [(1, 1, 3, 5, 7), (1, 2, 4, 1, 16), (2, 2, 3, 3, 4), (1, 1, 1, 1, 9)])
@pytest.mark.parametrize("dtype", [np.float32, np.int32])
def test_col2nchw_moves_each_groups_channels_into_place(groups, batch, h, w, n, dtype):
    y = np.random.default_rng(groups + h).standard_normal((groups, batch * h * w, n)).astype(dtype)
    got = tensor_ops.col2nchw(y, batch, h, w)
    want = np.concatenate([y[g].reshape(batch, h, w, n).transpose(0, 3, 1, 2) for g in range(groups)], axis=1)
    assert got.flags.c_contiguous and got.dtype == y.dtype
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("make, copied", [
    (lambda x: x, False),
    (channels_last_memory, False),                                    # the integer conv's outputs
    (lambda x: np.ascontiguousarray(x.transpose(2, 0, 3, 1)).transpose(1, 3, 0, 2), False),
    (lambda x: x[:, ::2], True),                                      # not dense in any order
    (lambda x: x[:, :, ::-1], True),
])
def test_in_memory_order_views_dense_memory_and_puts_its_axes_back(make, copied):
    x = make(np.arange(2 * 6 * 4 * 5, dtype=np.int16).reshape(2, 6, 4, 5))
    flat, back = tensor_ops.in_memory_order(x)
    assert flat.flags.c_contiguous
    assert np.shares_memory(flat, x) != copied
    np.testing.assert_array_equal(flat.transpose(back), x)
    out = np.empty_like(flat)  # an element-wise kernel's output, viewed back: x's shape and layout
    assert out.transpose(back).strides == (x.strides if not copied else np.ascontiguousarray(x).strides)
