import numpy as np
import pytest

from tpusim.ops.global_avgpool import channel_sums
from tpusim.quant.qlayer import centered


@pytest.mark.parametrize("dtype, zero_point", [(np.uint8, 131), (np.int8, -7)])
@pytest.mark.parametrize("shape", [(1, 2048, 7, 7), (2, 5, 3, 4)])
def test_channel_sums_of_channels_last_memory_equal_numpys(dtype, zero_point, shape):
    info = np.iinfo(dtype)
    x = np.random.default_rng(shape[1]).integers(info.min, info.max + 1, shape).astype(dtype)
    want = centered(x, zero_point).sum(axis=(2, 3), keepdims=True, dtype=np.int32)
    stored = np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)  # as the integer conv returns it
    for source in (x, stored):
        got = channel_sums(source, zero_point)
        assert got.shape == want.shape and got.dtype == np.int32
        np.testing.assert_array_equal(got, want)


def test_channel_sums_wrap_modulo_2_to_the_32_like_numpy():
    x = np.full((1, 1, 2**12, 2**12), 255, np.uint8)  # 2**24 pixels of 255: the exact sum is past 2**31
    got = channel_sums(np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2), 0)
    assert int(got[0, 0, 0, 0]) == (255 * 2**24 + 2**31) % 2**32 - 2**31 == int(x.sum(dtype=np.int32))
