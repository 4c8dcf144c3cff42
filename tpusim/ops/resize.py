"""Resize (opset 11+: ``scales`` or ``sizes`` input, opset 18's ``axes``) of the spatial axes (2, ...)
of an activation, batch and channels unchanged:

- ``nearest`` with coordinate_transformation_mode half_pixel, pytorch_half_pixel, align_corners or
  asymmetric and any nearest_mode (torch's ``nn.Upsample(mode="nearest")`` is asymmetric + floor),
  on any rank >= 3;
- ``linear`` (bilinear, NCHW) with half_pixel, pytorch_half_pixel, align_corners or asymmetric:
  ``align_corners=False`` and ``True`` of torch's bilinear upsampling.
Opsets 7-9's Upsample reaches the front end as a Resize: canonicalisation converts it (with
asymmetric coordinates and floor rounding, which Upsample means).

Coordinates follow the ONNX spec in float32 (the order ONNX Runtime evaluates them in); a linear
source coordinate is clamped to [0, size - 1] and blends its two neighbours (both weights 0.5 when
they coincide at the edge), the four corner products summed in the order ONNX Runtime sums them,
so the float results agree bit for bit (measured on random inputs for every coordinate mode).

Integers: nearest is an exact gather on the input's grid. Linear is a float step in the vector
unit, like Softmax: dequantize, interpolate in float32, quantize to the input's own grid (a convex
blend never leaves the input's range, so the output inherits the input's parameters).

Vector unit: nearest is a copy, one pass per output vector. Linear blends the 2 x 2 neighbours of
each output: :data:`LINEAR_TAPS` (4) passes per output vector (one per neighbour, each a
multiply-add of every output element), and one requantization per output element.
"""
from __future__ import annotations

import numpy as np

from tpusim.frontend.context import node_attrs
from tpusim.ops import register
from tpusim.ops._layout import copy_cost, normalized_axes
from tpusim.ops.base import Op, VectorCost, vectors
from tpusim.ops.reshape import add_reshape

# tf_half_pixel_for_nearest (deprecated) and tf_crop_and_resize are left out: ONNX Runtime, which the
# integer model is checked against, does not run the first, and the second crops by an roi.
_COORDINATES = ("half_pixel", "pytorch_half_pixel", "align_corners", "asymmetric")
_NEAREST = ("round_prefer_floor", "round_prefer_ceil", "floor", "ceil")
LINEAR_TAPS = 4  # bilinear: the 2 x 2 neighbours of every output element


def _source_coordinates(out_len: int, in_len: int, scale: float, mode: str) -> np.ndarray:
    """Each output index's coordinate in the input, in float32 (ONNX Resize, coordinate_transformation_mode)."""
    o = np.arange(out_len, dtype=np.float32)
    s = np.float32(scale)
    if mode == "half_pixel":
        return (o + 0.5) / s - 0.5
    if mode == "pytorch_half_pixel":
        return (o + 0.5) / s - 0.5 if out_len > 1 else np.zeros(1, np.float32)
    if mode == "align_corners":
        return o * np.float32(in_len - 1) / np.float32(out_len - 1) if out_len > 1 else np.zeros(1, np.float32)
    return o / s  # asymmetric


def _nearest_indices(x: np.ndarray, in_len: int, mode: str) -> np.ndarray:
    low = np.floor(x)
    tie = (x - low) == 0.5
    if mode == "round_prefer_floor":
        picked = np.where(tie, low, np.rint(x))
    elif mode == "round_prefer_ceil":
        picked = np.where(tie, low + 1, np.rint(x))
    elif mode == "floor":
        picked = low
    else:
        picked = np.ceil(x)
    return np.clip(picked, 0, in_len - 1).astype(np.int64)


def _resized_axes(layer) -> list[int]:
    scales = layer.attr("scales")
    return [a for a in range(2, len(layer.output_shape)) if scales[a] != 1.0]


def _linear_weights(out_len: int, in_len: int, scale: float, mode: str):
    """Per output index: the two neighbours (lo, hi) and their weights, in float32; a coordinate is
    clamped to [0, in_len - 1] and at the last element both neighbours coincide with weight 0.5."""
    src = np.clip(_source_coordinates(out_len, in_len, scale, mode), 0, in_len - 1)
    lo = src.astype(np.int64)
    hi = np.minimum(lo + 1, in_len - 1)
    edge = lo == hi
    w_lo = np.where(edge, np.float32(0.5), np.abs(src - hi.astype(np.float32))).astype(np.float32)
    w_hi = np.where(edge, np.float32(0.5), np.abs(src - lo.astype(np.float32))).astype(np.float32)
    return lo, hi, w_lo, w_hi


def _resize(x: np.ndarray, layer) -> np.ndarray:
    """The resized tensor: a gather (nearest) or a float32 bilinear blend (linear)."""
    scales, coord = layer.attr("scales"), layer.attr("coordinate_transformation_mode")
    if layer.attr("mode") == "nearest":
        y = x
        for axis in _resized_axes(layer):
            src = _source_coordinates(layer.output_shape[axis], x.shape[axis], scales[axis], coord)
            y = np.take(y, _nearest_indices(src, x.shape[axis], layer.attr("nearest_mode")), axis=axis)
        return np.ascontiguousarray(y)
    (_, _, h, w), (_, _, h_out, w_out) = x.shape, layer.output_shape
    y0, y1, wy0, wy1 = (a[:, None] for a in _linear_weights(h_out, h, scales[2], coord))
    x0, x1, wx0, wx1 = _linear_weights(w_out, w, scales[3], coord)
    # The four corners' weights are products taken first and the terms summed in this order: the same
    # float32 operations ONNX Runtime's bilinear kernel does, so the float step rounds as it does.
    return ((wx0 * wy0) * x[:, :, y0, x0] + (wx1 * wy0) * x[:, :, y0, x1]
            + (wx0 * wy1) * x[:, :, y1, x0] + (wx1 * wy1) * x[:, :, y1, x1])


def _per_axis(ctx, node, values, axes: tuple[int, ...], rank: int, fill) -> list:
    if len(values) != len(axes):
        raise ctx.fail(node, f"{len(values)} scales/sizes for {len(axes)} axes")
    full = [fill[i] for i in range(rank)]
    for axis, v in zip(axes, values):
        full[axis] = v
    return full


@register
class Resize(Op):
    name = "resize"
    onnx_types = ("Resize",)
    inherits_grid = True

    def lower(self, ctx, node):
        x, shape = ctx.activation_input(node)
        rank = len(shape)
        attrs = node_attrs(node)
        mode = attrs.get("mode", "nearest")
        coord = attrs.get("coordinate_transformation_mode", "half_pixel")
        nearest_mode = attrs.get("nearest_mode", "round_prefer_floor")
        if mode not in ("nearest", "linear"):
            raise ctx.fail(node, f"mode {mode!r} is not supported (nearest and linear are)")
        if coord not in _COORDINATES:
            raise ctx.fail(node, f"coordinate_transformation_mode {coord!r} is not supported")
        if nearest_mode not in _NEAREST:
            raise ctx.fail(node, f"nearest_mode {nearest_mode!r} is not supported")
        if int(attrs.get("antialias", 0)) or attrs.get("keep_aspect_ratio_policy", "stretch") != "stretch":
            raise ctx.fail(node, "antialias and keep_aspect_ratio_policy are not supported")
        if rank < 3 or (mode == "linear" and rank != 4):
            wanted = "a 4-D NCHW input for linear" if mode == "linear" else "an N, C, spatial... input"
            raise ctx.fail(node, f"expected {wanted}, got shape {shape}")
        axes = normalized_axes(ctx, node, attrs.get("axes", range(rank)), rank)
        scales = ctx.optional_constant(node, 2, "scales")
        sizes = ctx.optional_constant(node, 3, "sizes")
        from_sizes = sizes is not None and sizes.size > 0
        if from_sizes:
            out = _per_axis(ctx, node, [int(v) for v in sizes.reshape(-1)], axes, rank, shape)
            out[0] = shape[0]  # the batch follows the run's batch size, whatever the file hard-coded
            factors = [float(np.float32(o) / np.float32(i)) for o, i in zip(out, shape)]
        elif scales is not None and scales.size > 0:
            factors = _per_axis(ctx, node, [float(np.float32(v)) for v in scales.reshape(-1)], axes, rank, [1.0] * rank)
            out = [int(np.floor(np.float32(i) * np.float32(f))) for i, f in zip(shape, factors)]
        else:
            raise ctx.fail(node, "neither scales nor sizes is given")
        if out[0] != shape[0] or out[1] != shape[1] or factors[0] != 1.0 or factors[1] != 1.0:
            raise ctx.fail(node, f"only the spatial axes may be resized ({shape} -> {tuple(out)})")
        if min(out) < 1:
            raise ctx.fail(node, f"resizing {shape} gives the empty shape {tuple(out)}")
        if all(f == 1.0 for f in factors):
            add_reshape(ctx, node, x, shape, shape)
            return
        ctx.add_simple(node, self.name, [(x, shape)], tuple(out), attrs=(
            ("mode", mode), ("coordinate_transformation_mode", coord), ("nearest_mode", nearest_mode),
            ("scales", tuple(factors)), ("from_sizes", from_sizes)))

    def reference(self, layer, inputs):
        return _resize(inputs[0], layer)

    def quantize(self, layer, in_qps, y_qp, quant, input_mean):
        from tpusim.quant.qlayer import plain_qlayer
        return plain_qlayer(layer, in_qps, y_qp)

    def execute(self, ql, inputs, options):
        from tpusim.quant.arithmetic import dequantize, quantize
        from tpusim.quant.qlayer import clamp_output
        if ql.layer.attr("mode") == "nearest":
            return _resize(inputs[0], ql.layer), 0
        y = _resize(dequantize(inputs[0], ql.input_qparams[0]), ql.layer)
        return clamp_output(ql, quantize(y, ql.output_qparams)), 0

    def vector_cost(self, layer, in_elements, out_elements, lanes, int8):
        if layer.attr("mode") == "nearest":
            return copy_cost("resize:nearest", out_elements, lanes)
        return VectorCost("resize:linear", "none", LINEAR_TAPS * vectors(out_elements, lanes),
                          activation_ops=LINEAR_TAPS * out_elements, requant_ops=out_elements if int8 else 0)

    def export(self, b, layer, inputs, weight, bias, y):
        if layer.attr("from_sizes"):
            sizes = b.const(f"{layer.name}_sizes", np.array(layer.output_shape, np.int64))
            resize_inputs = [inputs[0], "", "", sizes]
        else:
            resize_inputs = [inputs[0], "", b.const(f"{layer.name}_scales", np.array(layer.attr("scales"), np.float32))]
        b.node("Resize", resize_inputs, y, layer.name, mode=layer.attr("mode"),
               coordinate_transformation_mode=layer.attr("coordinate_transformation_mode"),
               nearest_mode=layer.attr("nearest_mode"))
