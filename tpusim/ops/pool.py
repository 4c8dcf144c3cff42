"""MaxPool and AveragePool (2-D, strides, pads, auto_pad, ceil_mode, count_include_pad).

Both keep their input's grid (white paper sec. 2.3.3, and what ONNX Runtime's quantizer does): max
pooling only picks values; average pooling sums each window in integers and rescales by
``1 / count`` with a dyadic multiplier per window size (``requant`` is indexed by the count).
Vector unit: one pass per output vector per window element (the unit reads each window position
once), plus the average's requantization of every output element.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from tpusim import jit
from tpusim.frontend.context import LowerContext, node_attrs, pool_output_hw, require_4d, spatial_pads
from tpusim.ir import PoolAttrs
from tpusim.ops import register
from tpusim.ops.base import Op, VectorCost, vectors

if TYPE_CHECKING:  # annotations only
    from tpusim.quant.qlayer import QLayer


def _lower_pool(ctx: LowerContext, node, op: str) -> None:
    x, shape = ctx.activation_input(node)
    require_4d(ctx, node, shape)
    attrs = node_attrs(node)
    kernel = tuple(int(k) for k in attrs["kernel_shape"])
    strides = tuple(int(s) for s in attrs.get("strides", (1, 1)))
    dilations = tuple(int(d) for d in attrs.get("dilations", (1, 1)))
    if dilations != (1, 1):
        raise ctx.fail(node, "dilated pooling is not supported")
    if len(kernel) != 2:
        raise ctx.fail(node, f"only 2-D pooling is supported (kernel_shape {kernel})")
    pads = spatial_pads(ctx, node, attrs, (shape[2], shape[3]), kernel, strides, dilations)
    pool = PoolAttrs(kernel=kernel, strides=strides, pads=pads, ceil_mode=bool(attrs.get("ceil_mode", 0)),
                     count_include_pad=bool(attrs.get("count_include_pad", 0)))
    h_out, w_out = pool_output_hw(shape[2], shape[3], pool)
    ctx.add_simple(node, op, [(x, shape)], (shape[0], shape[1], h_out, w_out), pool=pool)


def _pool_cost(layer, out_elements: int, lanes: int, int8: bool, averaging: bool) -> VectorCost:
    (kh, kw), (sh, sw) = layer.pool.kernel, layer.pool.strides
    window = kh * kw
    return VectorCost(layer.activation.label, f"{layer.op[:3]}{kh}x{kw}/{sh}x{sw}", vectors(out_elements, lanes) * window,
                      activation_ops=out_elements if layer.activation.kind != "none" else 0,
                      pool_ops=out_elements * window, requant_ops=out_elements if averaging and int8 else 0)


def _pool_export_attrs(layer) -> dict:
    p = layer.pool
    return dict(kernel_shape=list(p.kernel), strides=list(p.strides), pads=list(p.pads), ceil_mode=int(p.ceil_mode))


@register
class MaxPool(Op):
    name = "maxpool"
    onnx_types = ("MaxPool",)
    inherits_grid = True
    fusable = True

    def lower(self, ctx, node):
        if len(node.output) > 1 and node.output[1] and ctx.consumers.get(node.output[1], 0):
            raise ctx.fail(node, "the Indices output is read; only the pooled values are supported")
        _lower_pool(ctx, node, self.name)

    def reference(self, layer, inputs):
        from tpusim import tensor_ops
        return tensor_ops.maxpool(inputs[0], layer.pool)

    def quantize(self, layer, in_qps, y_qp, quant, input_mean):
        from tpusim.quant.qlayer import plain_qlayer
        return plain_qlayer(layer, in_qps, y_qp)

    def execute(self, ql, inputs, options):
        return integer_maxpool(inputs[0], ql.layer.pool, ql.out_qmin, ql.out_qmax), 0

    def vector_cost(self, layer, in_elements, out_elements, lanes, int8):
        return _pool_cost(layer, out_elements, lanes, int8, averaging=False)

    def export(self, b, layer, inputs, weight, bias, y):
        b.node("MaxPool", inputs, y, layer.name, **_pool_export_attrs(layer))


@jit.kernel(cache=True, nogil=True)
def _column_range(offset, stride, width, w_out):
    """The outputs [first, last) whose window column at ``offset`` from ow * stride lies in [0, width)."""
    return max(0, -(offset // stride)), min(w_out, (width - 1 - offset) // stride + 1)


@jit.kernel(cache=True, nogil=True)
def _maxpool_channels_last_kernel(rows, channels, kh, kw, sh, sw, top, left, qmin, qmax, out):
    """rows (B, H, W * C), out (B, Hout, Wout * C): channels-last memory with each image row flat.
    out[b, oh, ow * C + c] = clamp(max of the window's in-bounds elements, qmin, qmax).

    Padding and ceil-mode overhang hold the dtype's lowest value in ONNX's definition, so they are
    skipped; a window with no element at all clamps that lowest value (qmin). Each input row and
    window column is one pass over the output row: a single run of W * C elements when sw is 1,
    else a run of C per output, so that LLVM vectorises long runs rather than the few outputs per row.
    """
    height, width = rows.shape[1], rows.shape[2] // channels
    h_out, w_out = out.shape[1], out.shape[2] // channels
    for b in range(rows.shape[0]):
        for oh in range(h_out):
            best = out[b, oh]
            best[:] = qmin
            for h in range(max(oh * sh - top, 0), min(oh * sh - top + kh, height)):
                row = rows[b, h]
                for j in range(kw):
                    offset = j - left  # input column of output ow is ow * sw + offset
                    first, last = _column_range(offset, sw, width, w_out)
                    if sw == 1:
                        dst = best[first * channels : last * channels]
                        src = row[(first + offset) * channels : (last + offset) * channels]
                        for k in range(dst.size):
                            dst[k] = max(dst[k], src[k])
                    else:
                        for ow in range(first, last):
                            dst = best[ow * channels : (ow + 1) * channels]
                            src = row[(ow * sw + offset) * channels : (ow * sw + offset + 1) * channels]
                            for k in range(channels):
                                dst[k] = max(dst[k], src[k])
            for k in range(best.size):
                best[k] = min(best[k], qmax)


def integer_maxpool(x: np.ndarray, pool: PoolAttrs, qmin: int, qmax: int) -> np.ndarray:
    """Max pooling of integers clamped to [qmin, qmax] (within x's dtype); oracle: ``tensor_ops.maxpool``.

    Pooled in channels-last memory (free for what the integer conv returns, a copy for NCHW memory);
    the output is an NCHW-shaped view of channels-last memory, which the next conv reads as is.
    """
    from tpusim.tensor_ops import channels_last
    batch, channels = x.shape[:2]
    h_out, w_out = pool_output_hw(x.shape[2], x.shape[3], pool)
    (kh, kw), (sh, sw), (top, left, _, _) = pool.kernel, pool.strides, pool.pads
    xt = channels_last(x)
    out = np.empty((batch, h_out, w_out, channels), x.dtype)
    _maxpool_channels_last_kernel(xt.reshape(batch, xt.shape[1], -1), channels, kh, kw, sh, sw, top, left,
                                  x.dtype.type(qmin), x.dtype.type(qmax), out.reshape(batch, h_out, -1))
    return out.transpose(0, 3, 1, 2)


@jit.kernel(cache=True, nogil=True, imports={"requantize_value": "tpusim.kernels.rounding"})
def _avgpool_channels_last_kernel(rows, channels, input_zero_point, kh, kw, sh, sw, top, left, counts, multiplier,
                                  right, half, zero_point, qmin, qmax, out):
    """rows (B, H, W * C), out (B, Hout, Wout * C) as in :func:`_maxpool_channels_last_kernel`:
    out[b, oh, ow * C + c] = requantize(sum of the window's in-bounds x - input_zero_point) with the
    constants of its window's element count ``counts[oh, ow]`` (multiplier[count], right[count],
    half[count]), as :func:`tpusim.quant.fixed_point.requantize` rounds. Padding and ceil-mode
    overhang hold the zero point, so they add nothing. The sums wrap in int32 as numpy's do."""
    height, width = rows.shape[1], rows.shape[2] // channels
    h_out, w_out = out.shape[1], out.shape[2] // channels
    sums = np.empty(w_out * channels, np.int32)
    for b in range(rows.shape[0]):
        for oh in range(h_out):
            sums[:] = 0
            for h in range(max(oh * sh - top, 0), min(oh * sh - top + kh, height)):
                row = rows[b, h]
                for j in range(kw):
                    offset = j - left
                    first, last = _column_range(offset, sw, width, w_out)
                    if sw == 1:
                        dst = sums[first * channels : last * channels]
                        src = row[(first + offset) * channels : (last + offset) * channels]
                        for k in range(dst.size):
                            dst[k] += np.int32(src[k]) - input_zero_point
                    else:
                        for ow in range(first, last):
                            dst = sums[ow * channels : (ow + 1) * channels]
                            src = row[(ow * sw + offset) * channels : (ow * sw + offset + 1) * channels]
                            for k in range(channels):
                                dst[k] += np.int32(src[k]) - input_zero_point
            for ow in range(w_out):
                count = counts[oh, ow]
                scale, bits, rounding = multiplier[count], right[count], half[count]
                src, dst = sums[ow * channels : (ow + 1) * channels], out[b, oh, ow * channels : (ow + 1) * channels]
                for c in range(channels):
                    dst[c] = requantize_value(src[c], scale, bits, rounding, zero_point, qmin, qmax)


def integer_avgpool(ql: QLayer, x: np.ndarray) -> np.ndarray:
    """The layer's average pooling of integers x (requantized per window count); oracle:
    :func:`integer_avgpool_reference`. Layout as :func:`integer_maxpool`'s."""
    from tpusim.kernels.rounding import requantize_constants
    from tpusim.tensor_ops import channels_last
    pool = ql.layer.pool
    batch, channels = x.shape[:2]
    h_out, w_out = ql.pool_counts.shape
    (kh, kw), (sh, sw), (top, left, _, _) = pool.kernel, pool.strides, pool.pads
    xt = channels_last(x)
    out = np.empty((batch, h_out, w_out, channels), ql.output_qparams.storage_dtype)
    _avgpool_channels_last_kernel(xt.reshape(batch, xt.shape[1], -1), channels,
                                  np.int32(ql.input_qparams[0].zero_point), kh, kw, sh, sw, top, left,
                                  np.ascontiguousarray(ql.pool_counts, np.int64),
                                  *requantize_constants(ql.requant.m0, ql.requant.shift, ql.requant.channels),
                                  np.int64(ql.output_qparams.zero_point), np.int64(ql.out_qmin),
                                  np.int64(ql.out_qmax), out.reshape(batch, h_out, -1))
    return out.transpose(0, 3, 1, 2)


def _window_sums(x: np.ndarray, pool: PoolAttrs, out_hw: tuple[int, int]) -> np.ndarray:
    """Sum of each pooling window of an int32 tensor, padding (and ceil-mode overhang) counting 0."""
    (kh, kw), (sh, sw), (pt, pl, _, _) = pool.kernel, pool.strides, pool.pads
    h_out, w_out = out_hw
    pb = max(0, (h_out - 1) * sh + kh - x.shape[2] - pt)
    pr = max(0, (w_out - 1) * sw + kw - x.shape[3] - pl)
    padded = np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr)))
    sums = np.zeros((*x.shape[:2], h_out, w_out), np.int32)
    for i in range(kh):
        for j in range(kw):
            sums += padded[:, :, i : i + sh * (h_out - 1) + 1 : sh, j : j + sw * (w_out - 1) + 1 : sw]
    return sums


def integer_avgpool_reference(ql: QLayer, x: np.ndarray) -> np.ndarray:
    """Numpy oracle of :func:`integer_avgpool`: the padded window sums, rescaled count by count."""
    from tpusim.quant.qlayer import Requant, centered, rescale
    # Padding holds the zero point, so it adds nothing to the centred sums.
    sums = _window_sums(centered(x, ql.input_qparams[0].zero_point), ql.layer.pool, ql.pool_counts.shape)
    out = np.empty(sums.shape, ql.output_qparams.storage_dtype)
    zero_point = int(ql.output_qparams.zero_point)
    for count in np.unique(ql.pool_counts):
        at = ql.pool_counts == count
        picked = Requant(ql.requant.m0[count : count + 1], ql.requant.shift[count : count + 1],
                         ql.requant.real[count : count + 1])
        out[:, :, at] = rescale(sums[:, :, at], picked, zero_point, ql.out_qmin, ql.out_qmax)
    return out


@register
class AveragePool(Op):
    name = "avgpool"
    onnx_types = ("AveragePool",)
    inherits_grid = True
    fusable = True

    def lower(self, ctx, node):
        _lower_pool(ctx, node, self.name)

    def reference(self, layer, inputs):
        from tpusim import tensor_ops
        return tensor_ops.avgpool(inputs[0], layer.pool)

    def quantize(self, layer, in_qps, y_qp, quant, input_mean):
        from tpusim import tensor_ops
        from tpusim.quant.qlayer import Requant, plain_qlayer, scalar
        x_qp = in_qps[0]
        _, _, h, w = layer.input_shapes[0]
        counts = tensor_ops.pool_counts(h, w, layer.pool).astype(np.int64)
        window = layer.pool.kernel[0] * layer.pool.kernel[1]
        ratio = scalar(x_qp.scale) / scalar(y_qp.scale)
        # Index 0 is never used (every window holds an element); keeping it makes m0[count] a direct lookup.
        requant = Requant.of(np.array([0.0] + [ratio / c for c in range(1, window + 1)]))
        return plain_qlayer(layer, in_qps, y_qp, requant=requant, pool_counts=counts)

    def execute(self, ql: QLayer, inputs, options):
        return integer_avgpool(ql, inputs[0]), 0

    def vector_cost(self, layer, in_elements, out_elements, lanes, int8):
        return _pool_cost(layer, out_elements, lanes, int8, averaging=True)

    def export(self, b, layer, inputs, weight, bias, y):
        b.node("AveragePool", inputs, y, layer.name, count_include_pad=int(layer.pool.count_include_pad),
               **_pool_export_attrs(layer))
