"""Dtype-generic NCHW tensor operations in numpy, shared by the FP32 reference, the workload
generators and the integer executor. They favour clarity; the hot integer paths use Numba kernels
(:func:`im2col_channels_last`, whose oracle is :func:`im2col` with its columns permuted)."""
from __future__ import annotations

import numpy as np
from numba import njit, types
from numba.core import cgutils, errors
from numba.extending import intrinsic

from tpusim.frontend.context import conv_output_hw, pool_output_hw
from tpusim.ir import ConvAttrs, PoolAttrs
from tpusim.kernels.gemm import claim_task, finish_task, run_tasks, thread_count


# Channels per group from which im2col goes through a channels-last copy (few channels: tiny runs).
_CHANNELS_LAST_MIN = 16


def im2col(x: np.ndarray, attrs: ConvAttrs, pad_value: float | int = 0) -> np.ndarray:
    """(B, C, H, W) -> (groups, B*Hout*Wout, C/groups*kh*kw), K ordered (c, kh, kw) like OIHW."""
    b, c, h, w = x.shape
    (kh, kw), (sh, sw), (pt, pl, pb, pr), (dh, dw) = attrs.kernel, attrs.strides, attrs.pads, attrs.dilations
    h_out, w_out = conv_output_hw(h, w, attrs)
    xp = np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr)), constant_values=pad_value) if any(attrs.pads) else x
    g = attrs.groups
    if kh == kw == 1:
        # One window: the columns are the (strided) input moved to channels-last, a single copy.
        picked = xp[:, :, : sh * (h_out - 1) + 1 : sh, : sw * (w_out - 1) + 1 : sw]
        channels_last = picked.reshape(b, g, c // g, h_out, w_out).transpose(1, 0, 3, 4, 2).copy()
        return channels_last.reshape(g, b * h_out * w_out, c // g)
    if c // g >= _CHANNELS_LAST_MIN:
        # Channels-last first: each window copy then moves whole runs of channels straight into
        # place, about twice as fast as transposing the finished columns.
        xt = np.ascontiguousarray(xp.reshape(b, g, c // g, *xp.shape[2:]).transpose(1, 0, 3, 4, 2))
        cols = np.empty((g, b, h_out, w_out, c // g, kh, kw), dtype=x.dtype)
        for i in range(kh):
            for j in range(kw):
                hs, ws = i * dh, j * dw
                cols[..., i, j] = xt[:, :, hs : hs + sh * (h_out - 1) + 1 : sh, ws : ws + sw * (w_out - 1) + 1 : sw]
        return cols.reshape(g, b * h_out * w_out, (c // g) * kh * kw)
    cols = np.empty((b, c, kh, kw, h_out, w_out), dtype=x.dtype)
    for i in range(kh):
        for j in range(kw):
            hs, ws = i * dh, j * dw
            cols[:, :, i, j] = xp[:, :, hs : hs + sh * (h_out - 1) + 1 : sh, ws : ws + sw * (w_out - 1) + 1 : sw]
    cols = cols.reshape(b, g, c // g, kh, kw, h_out * w_out)
    return np.ascontiguousarray(cols.transpose(1, 0, 5, 2, 3, 4).reshape(g, b * h_out * w_out, (c // g) * kh * kw))


@njit(cache=True, nogil=True)
def _to_channels_last(x, out):
    """out[b, h, w, c] = x[b, c, h, w] for C-contiguous x, one input row at a time (contiguous reads)."""
    batch, channels, height, width = x.shape
    for b in range(batch):
        for h in range(height):
            row = out[b, h]
            for c in range(channels):
                src = x[b, c, h]
                for w in range(width):
                    row[w, c] = src[w]


def channels_last(x: np.ndarray) -> np.ndarray:
    """(B, C, H, W) -> its (B, H, W, C) C-contiguous transpose: a free view when x is one of those
    (an NCHW-shaped view of channels-last memory, as the integer conv returns), else a copy. An NCHW
    input with few channels (a network's image) is copied by a compiled loop: numpy's transposing
    copy of 3 channels takes six times as long."""
    xt = x.transpose(0, 2, 3, 1)
    if xt.flags.c_contiguous:
        return xt
    if x.shape[1] < _CHANNELS_LAST_MIN and x.flags.c_contiguous and x.dtype.kind in "iu":
        out = np.empty(xt.shape, x.dtype)
        _to_channels_last(x, out)
        return out
    return np.ascontiguousarray(xt)


@njit(cache=True, nogil=True)
def _to_channels_first(xt, out):
    """out[b, c, h, w] = xt[b, h, w, c] for C-contiguous xt, one input row at a time (read from the caches)."""
    batch, height, width, channels = xt.shape
    for b in range(batch):
        for h in range(height):
            row = xt[b, h]
            for c in range(channels):
                dst = out[b, c, h]
                for w in range(width):
                    dst[w] = row[w, c]


def channels_first(x: np.ndarray) -> np.ndarray:
    """(B, C, H, W) as C-contiguous memory: x itself when it is, a copy otherwise. An NCHW-shaped view of
    channels-last memory (as the integer conv returns, and a GEMM's output rows are) is copied by a compiled
    loop: numpy's transposing copy of ResNet-50's tensors takes 2-4 times as long (0.4-1.0 against 0.2-0.3 ns
    a byte)."""
    if x.flags.c_contiguous:
        return x
    xt = x.transpose(0, 2, 3, 1) if x.ndim == 4 else None
    if xt is not None and xt.flags.c_contiguous and x.dtype.kind in "iuf":
        out = np.empty(x.shape, x.dtype)
        _to_channels_first(xt, out)
        return out
    return np.ascontiguousarray(x)


def in_memory_order(x: np.ndarray) -> tuple[np.ndarray, tuple[int, ...]]:
    """(x's axes in the order of its memory, C-contiguous; the permutation that puts them back): an element-wise
    kernel runs over the first flat and its output, viewed through the second, has x's shape and layout. An
    NCHW-shaped view of channels-last memory (what the integer conv returns) is transposed for free, its channels
    last; an array whose memory is not dense in any axis order is copied in C order."""
    order = tuple(sorted(range(x.ndim), key=lambda axis: -x.strides[axis]))
    view = x.transpose(order)
    if not view.flags.c_contiguous:
        order, view = tuple(range(x.ndim)), np.ascontiguousarray(x)
    return view, tuple(np.argsort(order))


@intrinsic
def _copy_run(typingctx, src, start, dst, at, length):
    """dst[at : at + length] = src[start : start + length] for 1-D contiguous arrays of one dtype, by
    llvm.memcpy: libc's copy of a short run takes a few overlapping vector moves where a loop
    (LLVM's vectorised body, remainder and alias checks) took four times as long. Unchecked: the
    caller keeps both runs inside their arrays."""
    if src.dtype != dst.dtype or src.layout != "C" or dst.layout != "C" or src.ndim != 1 or dst.ndim != 1:
        raise errors.TypingError(f"_copy_run takes two 1-D C-contiguous arrays of one dtype, got {src} and {dst}")
    sig = types.void(src, start, dst, at, length)

    def codegen(context, builder, signature, args):
        source, target = (context.make_array(signature.args[a])(context, builder, args[a]) for a in (0, 2))
        itemsize = context.get_abi_sizeof(context.get_data_type(signature.args[0].dtype))
        cgutils.raw_memcpy(builder, builder.gep(target.data, [args[3]]), builder.gep(source.data, [args[1]]), args[4],
                           itemsize)
        return context.get_dummy_value()

    return sig, codegen


@njit(cache=True, nogil=True)
def _gather_windows(flat, shape, groups, kh, kw, sh, sw, top, left, dh, dw, pad_value, h_out, w_out, cols,
                    rows_per_task, counters):
    """cols[g, m, (i kw + j) Cg + c] = xt[b, oh sh - top + i dh, ow sw - left + j dw, g Cg + c], m = (b, oh, ow),
    for the channels-last input xt = flat.reshape(shape); pad_value where the window leaves the input.
    Columns past kh kw Cg are left alone. A task is rows_per_task output rows (g, b, oh), claimed from
    counters (:func:`tpusim.kernels.gemm.run_tasks`)."""
    batch, height, width, channels = shape
    per_group = channels // groups
    rows = groups * batch * h_out
    task = claim_task(counters)
    while task * rows_per_task < rows:
        for r in range(task * rows_per_task, min((task + 1) * rows_per_task, rows)):
            g, b, oh = r // (batch * h_out), r // h_out % batch, r % h_out
            for ow in range(w_out):
                row = cols[g, (b * h_out + oh) * w_out + ow]
                iw0 = ow * sw - left
                for i in range(kh):
                    ih = oh * sh - top + i * dh
                    pixel0 = ((b * height + ih) * width + iw0) * channels
                    if groups == 1 and dw == 1 and 0 <= ih < height and 0 <= iw0 and iw0 + kw <= width:
                        # The window row's kw pixels are adjacent in memory: one run of kw * C values.
                        _copy_run(flat, pixel0, row, i * kw * channels, kw * channels)
                        continue
                    for j in range(kw):
                        iw = iw0 + j * dw
                        base = (i * kw + j) * per_group
                        if 0 <= ih < height and 0 <= iw < width:
                            _copy_run(flat, pixel0 + j * dw * channels + g * per_group, row, base, per_group)
                        else:
                            padding = row[base : base + per_group]
                            for c in range(per_group):
                                padding[c] = pad_value
        finish_task(counters)
        task = claim_task(counters)


# Bytes of columns per im2col task on more than one thread: a smaller gather is not worth waking a helper.
_GATHER_TASK_BYTES = 256 * 1024


def im2col_channels_last(x: np.ndarray, attrs: ConvAttrs, pad_value: int = 0, depth: int | None = None) -> np.ndarray:
    """(B, C, H, W) integers -> (groups, B*Hout*Wout, depth) columns, K ordered (kh, kw, c).

    The windows of :func:`im2col` (its oracle), each window's elements in channels-last order
    (weights must be permuted OIHW -> OHWI to match); columns from K = C/groups*kh*kw up to
    ``depth`` (default K) are zero, so a GEMM kernel that wants K in whole blocks needs no second
    copy. Window rows are copied as runs of channels from the channels-last input, and a 1x1 stride-1
    conv of one group takes that input itself, with no copy when x is already channels-last memory.
    """
    b, c, h, w = x.shape
    (kh, kw), (sh, sw), (pt, pl, _, _), (dh, dw) = attrs.kernel, attrs.strides, attrs.pads, attrs.dilations
    g = attrs.groups
    h_out, w_out = conv_output_hw(h, w, attrs)
    k = c // g * kh * kw
    depth = k if depth is None else depth
    if depth < k:
        raise ValueError(f"depth {depth} is below the window size {k}")
    xt = channels_last(x)
    if kh == kw == sh == sw == g == 1 and not any(attrs.pads) and depth == k:
        return xt.reshape(1, b * h * w, c)
    cols = (np.empty if depth == k else np.zeros)((g, b * h_out * w_out, depth), x.dtype)
    rows = g * b * h_out
    threads = thread_count()
    tasks = max(1, min(4 * threads if threads > 1 else 1,
                       cols.nbytes // _GATHER_TASK_BYTES, rows))
    rows_per_task = -(-rows // tasks)
    run_tasks(_gather_windows, -(-rows // rows_per_task), xt.reshape(-1), xt.shape, g, kh, kw, sh, sw, pt, pl, dh, dw,
              x.dtype.type(pad_value), h_out, w_out, cols, rows_per_task)
    return cols


def col2nchw(y: np.ndarray, batch: int, h_out: int, w_out: int) -> np.ndarray:
    """(groups, B*Hout*Wout, N/groups) -> (B, N, Hout, Wout)."""
    g, _, n = y.shape
    if g == 1:
        return channels_first(y.reshape(batch, h_out, w_out, n).transpose(0, 3, 1, 2))
    return np.ascontiguousarray(y.reshape(g, batch, h_out, w_out, n).transpose(1, 0, 4, 2, 3).reshape(batch, g * n, h_out, w_out))


def conv2d(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None, attrs: ConvAttrs) -> np.ndarray:
    """Float convolution via im2col + matmul; weight is OIHW."""
    b, _, h, w = x.shape
    h_out, w_out = conv_output_hw(h, w, attrs)
    g = attrs.groups
    cols = im2col(x, attrs)
    wmat = weight.reshape(g, weight.shape[0] // g, -1)
    y = np.matmul(cols, wmat.transpose(0, 2, 1))
    out = col2nchw(y, b, h_out, w_out)
    if bias is not None:
        out = out + bias.reshape(1, -1, 1, 1).astype(out.dtype)
    return out


def _pool_windows(x: np.ndarray, attrs: PoolAttrs, pad_value: float) -> np.ndarray:
    """(B, C, H, W) -> (B, C, Hout, Wout, kh*kw) windows, padded with pad_value."""
    b, c, h, w = x.shape
    (kh, kw), (sh, sw), (pt, pl, _, _) = attrs.kernel, attrs.strides, attrs.pads
    h_out, w_out = pool_output_hw(h, w, attrs)
    need_h = (h_out - 1) * sh + kh
    need_w = (w_out - 1) * sw + kw
    pb = max(0, need_h - h - pt)
    pr = max(0, need_w - w - pl)
    xp = np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr)), constant_values=pad_value)
    win = np.empty((b, c, h_out, w_out, kh * kw), dtype=x.dtype)
    for i in range(kh):
        for j in range(kw):
            win[..., i * kw + j] = xp[:, :, i : i + sh * (h_out - 1) + 1 : sh, j : j + sw * (w_out - 1) + 1 : sw]
    return win


def pool_counts(h: int, w: int, attrs: PoolAttrs) -> np.ndarray:
    """Number of elements averaged per output window, (Hout, Wout)."""
    ones = np.ones((1, 1, h, w), dtype=np.float64)
    if attrs.count_include_pad:
        (pt, pl, pb, pr) = attrs.pads
        ones = np.pad(ones, ((0, 0), (0, 0), (pt, pb), (pl, pr)), constant_values=1.0)
        shifted = PoolAttrs(attrs.kernel, attrs.strides, (0, 0, 0, 0), attrs.ceil_mode, True)
        return _pool_windows(ones, shifted, 0.0).sum(-1)[0, 0]
    return _pool_windows(ones, attrs, 0.0).sum(-1)[0, 0]


def maxpool(x: np.ndarray, attrs: PoolAttrs) -> np.ndarray:
    lowest = np.iinfo(x.dtype).min if np.issubdtype(x.dtype, np.integer) else -np.inf
    return _pool_windows(x, attrs, lowest).max(-1)


def avgpool(x: np.ndarray, attrs: PoolAttrs) -> np.ndarray:
    sums = _pool_windows(x.astype(np.float64), attrs, 0.0).sum(-1)
    return (sums / pool_counts(x.shape[2], x.shape[3], attrs)).astype(x.dtype)


def softmax(x: np.ndarray, axis: int) -> np.ndarray:
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)
