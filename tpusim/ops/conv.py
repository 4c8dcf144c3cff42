"""Conv (2-D; groups, depthwise, strides, pads including auto_pad, dilations) on the matrix unit.

The array computes it as a GEMM per group (``Layer.gemm``: M = batch x Hout x Wout, K = Cin/g x kh x
kw, N = Cout/g) with im2col done on the fly by the unified buffer's input path; the integer executor
pads im2col with the input zero point (real zero) and requantizes the int32 accumulators. With the
int8 kernel (the default engine) the columns are channels-last (K ordered kh, kw, c, the weights
permuted to match: the same sums), the requantization runs inside the GEMM, and the output is an
NCHW-shaped view of channels-last memory, so the next conv's columns need no transpose. A depthwise conv
(one input and one output channel per group: MobileNet's, EfficientNet's) has a direct kernel of its own,
the same integers: as a GEMM it is a group per channel of one output and kh x kw products each, which
the tiled GEMM kernels spend their tiles on (MobileNet-v2: 118 of its 131 ms of integer execution).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from tpusim import jit
from tpusim.derived import derived_from
from tpusim.frontend.context import LowerContext, conv_output_hw, node_attrs, require_4d, spatial_pads
from tpusim.ir import ConvAttrs, Layer
from tpusim.ops import register
from tpusim.ops._matrix import accumulate, quantize_matrix_layer
from tpusim.ops.base import ExecOptions, Op

if TYPE_CHECKING:  # annotations only
    from tpusim.quant.qlayer import QLayer


def _channels_last_weight(weight_q: np.ndarray, groups: int, depth: int) -> np.ndarray:
    """OIHW int8 weights as (groups, N/groups, depth) rows in im2col_channels_last's (kh, kw, c) order,
    zero-padded to depth; built once per weight array (the kernel then caches its own packing of it)."""
    def build() -> np.ndarray:
        n_out = weight_q.shape[0]
        rows = weight_q.transpose(0, 2, 3, 1).reshape(groups, n_out // groups, -1)
        packed = np.zeros((groups, n_out // groups, depth), np.int8)
        packed[..., : rows.shape[2]] = rows
        return packed

    return derived_from(weight_q, ("ohwi", groups, depth), build)


class _ChannelsLastConv:
    """One conv layer's int8-kernel path, prepared once per layer, activation dtype and accumulator width
    (depth, weights in column order, the kernel's constants); it holds no reference to the QLayer."""

    def __init__(self, ql: QLayer, x_dtype: np.dtype, acc_bits: int):
        from tpusim.kernels.gemm import RequantizedGemm, vnni_depth
        from tpusim.quant.arithmetic import storage_dtype
        from tpusim.tensor_ops import im2col_channels_last
        layer = ql.layer
        self._conv, self._output_shape = layer.conv, layer.output_shape
        groups, n_out = layer.conv.groups, layer.output_shape[1]
        self._depth = vnni_depth(ql.weight_q[0].size, n_out // groups, acc_bits)
        self._pad_value = int(ql.input_qparams[0].zero_point)
        weight = _channels_last_weight(ql.weight_q, groups, self._depth)
        self._gemm = RequantizedGemm(weight, ql.acc_bias, acc_bits, ql.requant.m0, ql.requant.shift,
                                     int(ql.output_qparams.zero_point), ql.out_qmin, ql.out_qmax,
                                     storage_dtype(ql.out_qmin, ql.out_qmax), x_dtype)
        self._columns = im2col_channels_last  # (bound here: an import per call costs more than the lookup)

    def __call__(self, x: np.ndarray) -> tuple[np.ndarray, int]:
        batch, n_out, h_out, w_out = self._output_shape
        y, wrapped = self._gemm(self._columns(x, self._conv, self._pad_value, self._depth))
        return y.reshape(batch, h_out, w_out, n_out).transpose(0, 3, 1, 2), wrapped


_GEMM = "tpusim.kernels.gemm"


@jit.kernel(cache=True, nogil=True, imports={"claim_task": _GEMM, "finish_task": _GEMM, "wrap_to_bits": _GEMM,
                                             "requantize_value": "tpusim.kernels.rounding"})
def _depthwise_kernel(xt, w, bias, sh, sw, top, left, dh, dw, pad_value, acc_bits, multiplier, right, half,
                      zero_point, qmin, qmax, out, wrapped, counters):
    """A depthwise conv of channels-last xt (B, H, W, C) with w (kh, kw, C) int64 into out (B, Hout, Wout, C),
    fused as the GEMM kernels fuse it: out[b, oh, ow, c] = requantize(wrap(sum over (i, j) of x[b, ih, iw, c] *
    w[i, j, c] + bias[c])), x being ``pad_value`` (the input zero point) outside the input, the sums exact in
    int64 and ``wrapped[task]`` counting those the acc_bits accumulator does not hold; the requantization is
    :func:`tpusim.quant.fixed_point.requantize`'s. A task is one output row (b, oh), claimed from counters.
    Every loop over channels runs over whole rows from 0, which LLVM vectorises."""
    batch, height, width, channels = xt.shape
    kh, kw = w.shape[0], w.shape[1]
    h_out, w_out = out.shape[1], out.shape[2]
    exact = np.empty(channels, np.int64)
    task = claim_task(counters)
    while task < batch * h_out:
        b, oh = task // h_out, task % h_out
        task_wrapped = 0
        for ow in range(w_out):
            exact[:] = bias
            for i in range(kh):
                ih = oh * sh - top + i * dh
                for j in range(kw):
                    iw = ow * sw - left + j * dw
                    taps = w[i, j]
                    if 0 <= ih < height and 0 <= iw < width:
                        pixel = xt[b, ih, iw]
                        for c in range(channels):
                            exact[c] += np.int64(pixel[c]) * taps[c]
                    else:
                        for c in range(channels):
                            exact[c] += pad_value * taps[c]
            dst = out[b, oh, ow]
            for c in range(channels):
                stored = wrap_to_bits(exact[c], acc_bits)
                task_wrapped += stored != exact[c]
                dst[c] = requantize_value(stored, multiplier[c], right[c], half[c], zero_point, qmin, qmax)
        wrapped[task] = task_wrapped
        finish_task(counters)
        task = claim_task(counters)


class _DepthwiseConv:
    """One depthwise conv layer's int8-kernel path (:func:`_depthwise_kernel`), prepared once per layer and
    accumulator width; like :class:`_ChannelsLastConv` it returns an NCHW-shaped view of channels-last memory."""

    def __init__(self, ql: QLayer, acc_bits: int):
        from tpusim.kernels.gemm import run_tasks
        from tpusim.kernels.rounding import requantize_constants
        from tpusim.quant.arithmetic import storage_dtype
        from tpusim.tensor_ops import channels_last
        layer = ql.layer
        conv = layer.conv
        self._output_shape = layer.output_shape
        channels = layer.output_shape[1]
        self._weight = np.ascontiguousarray(ql.weight_q[:, 0].transpose(1, 2, 0), dtype=np.int64)  # (kh, kw, C)
        self._bias = np.zeros(channels, np.int64) if ql.acc_bias is None else ql.acc_bias.astype(np.int64)
        top, left = conv.pads[0], conv.pads[1]
        self._constants = (conv.strides[0], conv.strides[1], top, left, conv.dilations[0], conv.dilations[1],
                           np.int64(ql.input_qparams[0].zero_point), acc_bits,
                           *requantize_constants(ql.requant.m0, ql.requant.shift, channels),
                           np.int64(ql.output_qparams.zero_point),
                           np.int64(ql.out_qmin), np.int64(ql.out_qmax))
        self._out_dtype = storage_dtype(ql.out_qmin, ql.out_qmax)
        self._run_tasks, self._channels_last = run_tasks, channels_last  # (as _ChannelsLastConv binds its own)

    def __call__(self, x: np.ndarray) -> tuple[np.ndarray, int]:
        batch, channels, h_out, w_out = self._output_shape
        out = np.empty((batch, h_out, w_out, channels), self._out_dtype)
        wrapped = np.zeros(batch * h_out, np.int64)
        self._run_tasks(_depthwise_kernel, wrapped.size, self._channels_last(x), self._weight, self._bias,
                        *self._constants, out, wrapped)
        return out.transpose(0, 3, 1, 2), int(wrapped.sum())


def _depthwise(layer: Layer) -> bool:
    """One input and one output channel per group."""
    return layer.conv.groups > 1 and layer.conv.groups == layer.input_shapes[0][1] == layer.output_shape[1]


@register
class Conv(Op):
    name = "conv"
    onnx_types = ("Conv",)
    matrix = True
    accumulates = True
    fusable = True

    def lower(self, ctx: LowerContext, node) -> None:
        x, shape = ctx.activation_input(node)
        require_4d(ctx, node, shape)
        weight = ctx.constant(node, 1, "weight").astype(np.float32, copy=False)  # (no layer writes into a weight)
        bias = ctx.optional_constant(node, 2, "bias")
        attrs = node_attrs(node)
        if weight.ndim != 4:
            raise ctx.fail(node, f"only 2-D convolutions are supported (weight shape {weight.shape})")
        groups = int(attrs.get("group", 1))
        c_out, c_in_g, kh, kw = weight.shape
        if shape[1] != c_in_g * groups or c_out % groups:
            raise ctx.fail(node, f"weight {weight.shape} with group={groups} does not fit input {shape}")
        kernel = tuple(int(k) for k in attrs.get("kernel_shape", (kh, kw)))
        if kernel != (kh, kw):
            raise ctx.fail(node, f"kernel_shape {kernel} disagrees with weight shape {weight.shape}")
        strides = tuple(int(s) for s in attrs.get("strides", (1, 1)))
        dilations = tuple(int(d) for d in attrs.get("dilations", (1, 1)))
        pads = spatial_pads(ctx, node, attrs, (shape[2], shape[3]), kernel, strides, dilations)
        conv = ConvAttrs(kernel=kernel, strides=strides, pads=pads, dilations=dilations, groups=groups)
        h_out, w_out = conv_output_hw(shape[2], shape[3], conv)
        if h_out < 1 or w_out < 1:
            raise ctx.fail(node, f"output would be empty for input {shape}")
        ctx.add_simple(node, self.name, [(x, shape)], (shape[0], c_out, h_out, w_out), weight=weight,
                       bias=None if bias is None else bias.astype(np.float32).reshape(c_out), conv=conv)

    def reference(self, layer: Layer, inputs):
        from tpusim import tensor_ops
        return tensor_ops.conv2d(inputs[0], layer.weight, layer.bias, layer.conv)

    def quantize(self, layer, in_qps, y_qp, quant, input_mean):
        return quantize_matrix_layer(layer, in_qps[0], y_qp, quant, input_mean)

    def execute(self, ql: QLayer, inputs, options: ExecOptions):
        if options.engine == "int8-gemm" and options.acc_bits <= 32:
            return self._execute_channels_last(ql, inputs[0], options.acc_bits)
        from tpusim import tensor_ops
        from tpusim.quant.qlayer import rescale_output
        layer = ql.layer
        batch, _, h_out, w_out = layer.output_shape
        cols = tensor_ops.im2col(inputs[0], layer.conv, pad_value=int(ql.input_qparams[0].zero_point))
        groups = layer.conv.groups
        weight = ql.weight_q.reshape(groups, ql.weight_q.shape[0] // groups, -1)
        acc, wrapped = accumulate(cols, weight, ql.acc_bias, options.acc_bits, options.engine)
        acc = tensor_ops.col2nchw(acc, batch, h_out, w_out)
        return rescale_output(ql, acc), wrapped

    def _execute_channels_last(self, ql: QLayer, x: np.ndarray, acc_bits: int):
        """The int8 kernel's path: channels-last columns, requantization fused into the GEMM, and an
        NCHW-shaped view of channels-last memory out, which the next conv reads with no transpose."""
        if _depthwise(ql.layer):
            return derived_from(ql, ("depthwise", acc_bits), lambda: _DepthwiseConv(ql, acc_bits))(x)
        plan = derived_from(ql, ("channels-last", acc_bits, x.dtype.str),
                            lambda: _ChannelsLastConv(ql, x.dtype, acc_bits))
        return plan(x)

    def export(self, b, layer, inputs, weight, bias, y):
        c = layer.conv
        b.node("Conv", [inputs[0], weight] + ([bias] if bias else []), y, layer.name, kernel_shape=list(c.kernel),
               strides=list(c.strides), pads=list(c.pads), dilations=list(c.dilations), group=c.groups)
