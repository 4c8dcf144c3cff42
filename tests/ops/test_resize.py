import numpy as np
import pytest

from onnx_graphs import GraphBuilder, run_onnxruntime
from op_checks import CONFIG, check_all_stages

from tpusim.frontend import lower_model, run_reference
from tpusim.frontend.canonical import canonicalize
from tpusim.ops import op
from tpusim.quant.arithmetic import activation_qparams

SHAPE = (1, 3, 5, 6)


def _resized(mode: str, scales=None, sizes=None, opset: int = 17, **attrs):
    g = GraphBuilder(SHAPE, opset=opset)
    x = g.conv(g.input_name, 3, 4, pads=[1, 1, 1, 1])  # (1, 4, 5, 6)
    if opset < 10:  # Upsample: scales an attribute at opset 7, an input at 9
        args = [x] if opset < 9 else [x, g.const(np.array(scales, np.float32))]
        r = g.node("Upsample", args, mode=mode, **({"scales": [float(s) for s in scales]} if opset < 9 else {}))
    else:
        args = [x, "", g.const(np.array(scales, np.float32)) if scales is not None else ""]
        if sizes is not None:
            args.append(g.const(np.array(sizes, np.int64)))
        r = g.node("Resize", args, mode=mode, **attrs)
    # sizes hard-code the batch, as torch writes them: the model then declares batch 1 too.
    return g.model(g.conv(r, 4, 2), batch_dim=1 if sizes is not None or opset < 10 else "batch")


CASES = {
    # torch nn.Upsample(scale_factor=2, mode="nearest")
    "nearest_asymmetric_floor": dict(mode="nearest", scales=[1, 1, 2, 2], coordinate_transformation_mode="asymmetric",
                                     nearest_mode="floor"),
    # a non-integer ratio by sizes, the ONNX defaults (half_pixel, round_prefer_floor)
    "nearest_half_pixel_sizes": dict(mode="nearest", sizes=[1, 4, 8, 9]),
    "nearest_downsample_ceil": dict(mode="nearest", scales=[1, 1, 0.6, 0.5], nearest_mode="ceil",
                                    coordinate_transformation_mode="asymmetric"),
    "nearest_align_corners_prefer_ceil": dict(mode="nearest", sizes=[1, 4, 9, 11], nearest_mode="round_prefer_ceil",
                                              coordinate_transformation_mode="align_corners"),
    # torch bilinear, align_corners=False (both spellings torch has exported) and True
    "linear_half_pixel": dict(mode="linear", scales=[1, 1, 2, 2], coordinate_transformation_mode="half_pixel"),
    "linear_pytorch_half_pixel": dict(mode="linear", scales=[1, 1, 1.5, 2.5],
                                      coordinate_transformation_mode="pytorch_half_pixel"),
    "linear_align_corners_sizes": dict(mode="linear", sizes=[1, 4, 9, 7],
                                       coordinate_transformation_mode="align_corners"),
    # opset 18: sizes for the listed axes only
    "linear_axes_opset18": dict(mode="linear", sizes=[10, 9], axes=[2, 3], opset=18),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_resize_through_every_stage(case):
    graph = check_all_stages(_resized(**CASES[case]), SHAPE, {"resize"})
    assert [layer.op for layer in graph.layers] == ["conv", "resize", "conv"]
    assert graph.layers[1].attr("mode") == CASES[case]["mode"]


@pytest.mark.parametrize("opset, mode, scales", [(7, "nearest", [1, 1, 2, 3]), (9, "linear", [1, 1, 2, 2])])
def test_opset_7_9_upsample_is_canonicalised_to_resize(opset, mode, scales):
    # The version converter renames tensors, so the stages run on the canonical model; its FP32
    # reference is checked against ONNX Runtime on the original Upsample model as well.
    original = _resized(mode, scales, opset=opset)
    canonical = canonicalize(original, "u.onnx", batch=1).model
    x = np.random.default_rng(4).standard_normal(SHAPE).astype(np.float32)
    graph = lower_model(original, "u.onnx")
    (theirs,) = run_onnxruntime(original, x)
    np.testing.assert_allclose(run_reference(graph, x)[graph.outputs[0]], theirs, atol=1e-4 * float(np.ptp(theirs)))
    graph = check_all_stages(canonical, SHAPE, {"resize"})
    assert [layer.op for layer in graph.layers] == ["conv", "resize", "conv"]
    assert graph.layers[1].attr("coordinate_transformation_mode") == "asymmetric"
    assert graph.layers[1].attr("scales") == tuple(float(s) for s in scales)


def _layer_and_integers(**case):
    layer = lower_model(_resized(**case), "r.onnx").layers[1]
    qp = activation_qparams(-1.0, 2.0, "asymmetric-uint8")
    module = op("resize")
    q = np.random.default_rng(3).integers(0, 256, layer.input_shapes[0], dtype=np.uint8)
    out, _ = module.execute(module.quantize(layer, (qp,), qp, CONFIG.quant, None), [q], None)
    return layer, module, q, out, int(qp.zero_point)


def test_nearest_integers_are_an_exact_gather_costing_one_pass_per_vector():
    layer, module, q, out, _ = _layer_and_integers(**CASES["nearest_asymmetric_floor"])
    np.testing.assert_array_equal(out, q.repeat(2, axis=2).repeat(2, axis=3))
    assert module.vector_cost(layer, [q.size], out.size, 256, True).passes == -(-out.size // 256)


def test_linear_is_a_float_step_on_the_input_grid_with_four_taps():
    layer, module, q, out, zero = _layer_and_integers(**CASES["linear_half_pixel"])
    assert module.inherits_grid and out.dtype == np.uint8
    # 2x half-pixel: output 2i of an axis sits at i - 1/4, blending 3/4 of input i with 1/4 of input i - 1;
    # the float step rounds the blend of the centred integers to the nearest integer.
    qi = q.astype(np.int64) - zero
    blend = (9 * qi[:, :, 1:, 1:] + 3 * qi[:, :, :-1, 1:] + 3 * qi[:, :, 1:, :-1] + qi[:, :, :-1, :-1]) / 16
    np.testing.assert_allclose(out[:, :, 2::2, 2::2].astype(np.int64) - zero, blend, atol=0.5 + 1e-6)
    cost = module.vector_cost(layer, [q.size], out.size, 256, True)
    assert cost.passes == 4 * -(-out.size // 256) and cost.requant_ops == out.size
