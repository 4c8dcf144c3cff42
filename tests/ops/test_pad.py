import numpy as np
import pytest

from onnx_graphs import GraphBuilder
from op_checks import CONFIG, check_all_stages

from tpusim.frontend import lower_model
from tpusim.ops import op
from tpusim.quant.arithmetic import activation_qparams, quantize


def _padded(mode: str, pads, value=None, opset: int = 17, axes=None):
    g = GraphBuilder((1, 3, 6, 6), opset=opset)
    x = g.conv(g.input_name, 3, 4, pads=[1, 1, 1, 1])  # (1, 4, 6, 6)
    if opset < 11:
        attrs = {"pads": list(pads)} | ({} if value is None else {"value": value})
        p = g.node("Pad", [x], mode=mode, **attrs)
    else:
        args = [x, g.const(np.array(pads, np.int64))]
        if value is not None or axes is not None:
            args.append(g.const(np.float32(value)) if value is not None else "")
        if axes is not None:
            args.append(g.const(np.array(axes, np.int64)))
        p = g.node("Pad", args, mode=mode)
    return g.model(g.conv(p, 4, 2))


CASES = {
    "zeros": ("constant", [0, 0, 1, 2, 0, 0, 2, 1], None, 17, None),
    "value_and_crop": ("constant", [0, 0, 2, -1, 0, 0, -2, 1], 0.75, 17, None),
    "reflect": ("reflect", [0, 0, 2, 1, 0, 0, 1, 2], None, 17, None),
    "edge": ("edge", [0, 0, 1, 3, 0, 0, 3, 0], None, 17, None),
    "axes_opset18": ("constant", [1, 2, 2, 1], -0.5, 18, [2, 3]),
    "attribute_opset10": ("constant", [0, 0, 1, 1, 0, 0, 2, 2], 0.25, 10, None),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_pad_through_every_stage(case):
    mode, pads, value, opset, axes = CASES[case]
    graph = check_all_stages(_padded(mode, pads, value, opset, axes), (1, 3, 6, 6), {"pad"})
    assert [layer.op for layer in graph.layers] == ["conv", "pad", "conv"]
    layer = graph.layers[1]
    assert layer.attr("mode") == mode
    full = np.array(pads).reshape(2, -1).T.tolist()
    if axes is not None:
        full = [[0, 0], [0, 0]] + full
    assert [list(p) for p in layer.attr("pads")] == full


@pytest.mark.parametrize("value, scheme", [(0.0, "asymmetric-uint8"), (0.0, "symmetric-int8"),
                                           (0.75, "asymmetric-uint8"), (-9.0, "symmetric-int8")])
def test_constant_pad_writes_the_quantized_pad_value(value, scheme):
    graph = lower_model(_padded("constant", [0, 0, 1, 0, 0, 0, 0, 2], value), "p.onnx")
    layer = graph.layers[1]
    qp = activation_qparams(-1.5, 3.0, scheme)
    module = op("pad")
    q = np.random.default_rng(2).integers(qp.qmin, qp.qmax + 1, layer.input_shapes[0]).astype(qp.storage_dtype)
    out, _ = module.execute(module.quantize(layer, (qp,), qp, CONFIG.quant, None), [q], None)
    assert out.shape == (1, 4, 7, 8) and out.dtype == q.dtype
    np.testing.assert_array_equal(out[:, :, 1:, :6], q)
    # The pad value on the input's grid: the zero point for 0, saturated when outside the range (-9).
    expected = int(np.clip(round(value / float(qp.scale)) + int(qp.zero_point), qp.qmin, qp.qmax))
    assert expected == int(quantize(np.float32(value), qp))
    if value == 0.0:
        assert expected == int(qp.zero_point)
    assert np.all(out[:, :, 0] == expected) and np.all(out[:, :, :, 6:] == expected)
    assert module.vector_cost(layer, [q.size], out.size, 256, True).passes == -(-out.size // 256)


def test_zero_pads_are_an_alias():
    graph = lower_model(_padded("constant", [0] * 8), "p.onnx")
    assert [layer.op for layer in graph.layers] == ["conv", "reshape", "conv"]
