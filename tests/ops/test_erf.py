import math

import numpy as np

from onnx_graphs import GraphBuilder
from op_checks import check_all_stages
from tpusim.ops.erf import _KERNEL_VALUES, _erf_kernel, erf, erf_reference

SHAPE = (1, 4, 8, 8)


def test_erf_op():
    g = GraphBuilder(SHAPE)
    y = g.node("Erf", [g.conv(g.input_name, 4, 4)])
    graph = check_all_stages(g.model(y), SHAPE, {"erf"})
    assert [layer.op for layer in graph.layers] == ["conv", "erf"]


def test_erf_matches_math_erf_to_double_precision():
    x = np.concatenate([np.linspace(-8, 8, 16001), [0.0, 1e-300, -1e-12, 5.999999, 6.0, 40.0]])
    np.testing.assert_allclose(erf(x), [math.erf(v) for v in x], rtol=4e-15, atol=1e-300)
    x32 = np.linspace(-5, 5, 10001, dtype=np.float32)
    np.testing.assert_array_equal(erf(x32), np.array([math.erf(v) for v in x32.astype(np.float64)], np.float32))
    assert erf(x32).dtype == np.float32 and np.isnan(erf(np.array([np.nan])))[0]


def test_the_compiled_erf_equals_its_series_oracle():
    rng = np.random.default_rng(0)
    x32 = np.concatenate([np.linspace(-7, 7, 200_001, dtype=np.float32), 2 * rng.standard_normal(100_000, np.float32),
                          np.array([0.0, -0.0, 6.0, -6.0, np.inf, -np.inf], np.float32)])
    assert np.array_equal(erf(x32), erf_reference(x32))  # float32: the same value, bit for bit
    x64 = x32[:300_000].astype(np.float64).reshape(3, -1)
    assert erf(x64).shape == x64.shape
    np.testing.assert_allclose(erf(x64), erf_reference(x64), rtol=0, atol=4e-15)


def test_a_few_values_get_the_kernels_bits_from_python():
    rng = np.random.default_rng(1)
    for dtype in (np.float32, np.float64):
        x = np.concatenate([3 * rng.standard_normal(2 * _KERNEL_VALUES), [0.0, -0.0, 1e-300, 6.0, -40.0, np.inf, np.nan]])
        x = x.astype(dtype)
        compiled = np.empty_like(x)
        _erf_kernel(x, compiled)
        for size in (1, 4801, _KERNEL_VALUES - 1):
            part = np.concatenate([x[:size - 7], x[-7:]]) if size > 7 else x[:size]
            expected = np.empty_like(part)
            _erf_kernel(part, expected)
            assert erf(part).tobytes() == expected.tobytes()
        assert erf(x).tobytes() == compiled.tobytes()
