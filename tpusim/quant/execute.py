"""Integer-only execution of a :class:`QuantizedGraph`, as the chip computes it.

The input is quantized once; from then on every value is an 8-bit integer in the unified buffer or
an int32 in the accumulators. Conv is im2col (padded with the input zero point, i.e. real zero)
followed by the int8 GEMM of the matrix unit with the folded int32 bias, wrapping modulo
``2**acc_bits``; requantization, pooling, residual add and concat rescales use dyadic multipliers
and the rounding shift of :func:`tpusim.quant.fixed_point.requantize`; sigmoid/tanh are table
look-ups. Softmax is the one float step (see :mod:`tpusim.quant.quantize`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import numpy as np

from tpusim import tensor_ops
from tpusim.ir import PoolAttrs
from tpusim.kernels.gemm import grouped_int8_gemm
from tpusim.quant.arithmetic import dequantize, quantize
from tpusim.quant.fixed_point import requantize
from tpusim.quant.quantize import ADD_LEFT_SHIFT, QLayer, QuantizedGraph, Requant

# A matrix unit: (activations (M, K), weights (K, N) int8, int32 bias (N,), acc_bits) -> (accumulators, wraps).
MatrixUnit = Callable[[np.ndarray, np.ndarray, np.ndarray, int], tuple[np.ndarray, int]]
GemmEngine = Literal["exact-blas", "int8-gemm"] | MatrixUnit
ProgressCallback = Callable[[int, int, str], None]  # (layers done, total layers, name of the layer just run)

_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1


@dataclass(frozen=True, eq=False)
class IntegerRun:
    outputs: dict[str, np.ndarray]      # graph outputs as the chip's integers (uint8 or int8)
    dequantized: dict[str, np.ndarray]  # the same outputs dequantized to float32
    tensors: dict[str, np.ndarray]      # every tensor's integers with keep_all, else the outputs only
    wrapped: dict[str, int]             # per matrix layer: outputs whose exact sum left the accumulator


def _rescale(values: np.ndarray, r: Requant, zero_point: int, qmin: int, qmax: int, channel_axis: int = 1) -> np.ndarray:
    return requantize(values, r.m0, r.shift, zero_point, qmin, qmax, channel_axis=channel_axis)


def _centered(q: np.ndarray, zero_point: np.ndarray) -> np.ndarray:
    return q.astype(np.int32) - np.int32(zero_point)


# |x| <= 255 and |w| <= 127 (+1 for int8 activations' -128): a float32 sum of this many products,
# taken in any order, only ever holds integers below 2**24, so it is exact.
_EXACT_FLOAT32_TERMS = 2**24 // (255 * 128)


def _wrap(exact: np.ndarray, acc_bits: int) -> tuple[np.ndarray, int]:
    """Exact int64 sums as the acc_bits two's-complement accumulator holds them, and how many wrapped."""
    half = np.int64(1) << (acc_bits - 1)
    stored = ((exact + half) & ((np.int64(1) << acc_bits) - 1)) - half if acc_bits < 64 else exact
    return stored, int(np.count_nonzero(stored != exact))


def _gemm_blas(cols: np.ndarray, weight_t: np.ndarray, bias: np.ndarray, acc_bits: int) -> tuple[np.ndarray, int]:
    """The matrix unit's integer sums evaluated exactly with float32 BLAS, K cut into exact chunks."""
    k_total = cols.shape[1]
    x = cols.astype(np.float32)
    w = weight_t.astype(np.float32)
    exact = (x[:, :_EXACT_FLOAT32_TERMS] @ w[:_EXACT_FLOAT32_TERMS]).astype(np.int64)
    for k0 in range(_EXACT_FLOAT32_TERMS, k_total, _EXACT_FLOAT32_TERMS):
        exact += (x[:, k0 : k0 + _EXACT_FLOAT32_TERMS] @ w[k0 : k0 + _EXACT_FLOAT32_TERMS]).astype(np.int64)
    exact += bias.astype(np.int64)
    return _wrap(exact, acc_bits)


def _accumulate(cols: np.ndarray, weight: np.ndarray, acc_bias: np.ndarray, acc_bits: int,
                engine: GemmEngine) -> tuple[np.ndarray, int]:
    """(groups, M, K) activations x (groups, N/g, K) weights + bias -> (groups, M, N/g) int32 accumulators."""
    groups, m, _ = cols.shape
    n_g = weight.shape[1]
    if engine == "int8-gemm" and acc_bits <= 32:
        # One kernel call for all groups. Its (groups, M, N/g) result is a view of channel-major
        # memory, so col2nchw of a batch-1 result is a free reshape.
        return grouped_int8_gemm(cols, weight, acc_bits, acc_bias)
    acc = np.empty((groups, m, n_g), np.int32)
    wrapped = 0
    for g in range(groups):
        bias = acc_bias[g * n_g : (g + 1) * n_g]
        if callable(engine):
            result, count = engine(cols[g], np.ascontiguousarray(weight[g].T), bias, acc_bits)
        elif engine == "int8-gemm":
            result, count = grouped_int8_gemm(cols[g : g + 1], weight[g : g + 1], acc_bits, bias)
            result = result[0]
        else:
            result, count = _gemm_blas(cols[g], weight[g].T, bias, acc_bits)
        if result.min(initial=0) < _INT32_MIN or result.max(initial=0) > _INT32_MAX:
            # Accumulators wider than 32 bits: the activation unit reads int32, which holds any sum
            # of realistic K; a wider one is a model this chip cannot requantize.
            raise OverflowError(f"accumulator values beyond int32 with acc_bits={acc_bits}")
        acc[g] = result
        wrapped += count
    return acc, wrapped


def _conv(ql: QLayer, x: np.ndarray, acc_bits: int, engine: GemmEngine) -> tuple[np.ndarray, int]:
    layer = ql.layer
    batch, _, h_out, w_out = layer.output_shape
    cols = tensor_ops.im2col(x, layer.conv, pad_value=int(ql.input_qparams[0].zero_point))
    groups = layer.conv.groups
    weight = ql.weight_q.reshape(groups, ql.weight_q.shape[0] // groups, -1)
    acc, wrapped = _accumulate(cols, weight, ql.acc_bias, acc_bits, engine)
    acc = tensor_ops.col2nchw(acc, batch, h_out, w_out)
    return _rescale(acc, ql.requant, int(ql.output_qparams.zero_point), ql.out_qmin, ql.out_qmax), wrapped


def _gemm(ql: QLayer, x: np.ndarray, acc_bits: int, engine: GemmEngine) -> tuple[np.ndarray, int]:
    k = ql.weight_q.shape[1]
    acc, wrapped = _accumulate(x.reshape(1, -1, k), ql.weight_q[None], ql.acc_bias, acc_bits, engine)
    acc = acc[0].reshape(ql.layer.output_shape)
    return _rescale(acc, ql.requant, int(ql.output_qparams.zero_point), ql.out_qmin, ql.out_qmax, -1), wrapped


def _clamp(ql: QLayer, q: np.ndarray) -> np.ndarray:
    return np.clip(q, ql.out_qmin, ql.out_qmax).astype(q.dtype)


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


def _avgpool(ql: QLayer, x: np.ndarray) -> np.ndarray:
    # Padding holds the zero point, so it adds nothing to the centred sums.
    sums = _window_sums(_centered(x, ql.input_qparams[0].zero_point), ql.layer.pool, ql.pool_counts.shape)
    out = np.empty(sums.shape, ql.output_qparams.storage_dtype)
    zero_point = int(ql.output_qparams.zero_point)
    for count in np.unique(ql.pool_counts):
        at = ql.pool_counts == count
        picked = Requant(ql.requant.m0[count : count + 1], ql.requant.shift[count : count + 1], ql.requant.real[count : count + 1])
        out[:, :, at] = _rescale(sums[:, :, at], picked, zero_point, ql.out_qmin, ql.out_qmax)
    return out


def _global_avgpool(ql: QLayer, x: np.ndarray) -> np.ndarray:
    sums = _centered(x, ql.input_qparams[0].zero_point).sum(axis=(2, 3), keepdims=True, dtype=np.int32)
    return _rescale(sums, ql.requant, int(ql.output_qparams.zero_point), ql.out_qmin, ql.out_qmax)


def _add(ql: QLayer, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    total = np.zeros(a.shape, np.int32)
    for q, qp, r in zip((a, b), ql.input_qparams, ql.input_rescales):
        shifted = _centered(q, qp.zero_point) << ADD_LEFT_SHIFT
        total += _rescale(shifted, r, 0, _INT32_MIN, _INT32_MAX)
    return _rescale(total, ql.requant, int(ql.output_qparams.zero_point), ql.out_qmin, ql.out_qmax)


def _concat(ql: QLayer, inputs: list[np.ndarray]) -> np.ndarray:
    y_qp = ql.output_qparams
    parts = []
    for q, qp, r in zip(inputs, ql.input_qparams, ql.input_rescales):
        if r is None:
            parts.append(q)
        else:
            parts.append(_rescale(_centered(q, qp.zero_point), r, int(y_qp.zero_point), y_qp.qmin, y_qp.qmax))
    return np.concatenate(parts, axis=ql.layer.axis)


def _softmax(ql: QLayer, x: np.ndarray) -> np.ndarray:
    y = tensor_ops.softmax(dequantize(x, ql.input_qparams[0]), ql.layer.axis)
    return _clamp(ql, quantize(ql.layer.activation.apply(y), ql.output_qparams))


def run_layer(ql: QLayer, inputs: list[np.ndarray], acc_bits: int = 32,
              engine: GemmEngine = "int8-gemm") -> tuple[np.ndarray, int]:
    """One layer on integer inputs: (integer output, wrapped accumulations)."""
    op = ql.layer.op
    x = inputs[0]
    wrapped = 0
    if op == "conv":
        y, wrapped = _conv(ql, x, acc_bits, engine)
    elif op == "gemm":
        y, wrapped = _gemm(ql, x, acc_bits, engine)
    elif op == "maxpool":
        y = _clamp(ql, tensor_ops.maxpool(x, ql.layer.pool))
    elif op == "avgpool":
        y = _avgpool(ql, x)
    elif op == "global_avgpool":
        y = _global_avgpool(ql, x)
    elif op == "add":
        y = _add(ql, inputs[0], inputs[1])
    elif op == "concat":
        y = _concat(ql, inputs)
    elif op == "reshape":
        y = x.reshape(ql.layer.output_shape)
    elif op == "activation":
        y = _clamp(ql, x)
    elif op in ("sigmoid", "tanh"):
        y = ql.lut[x.astype(np.int32) - ql.input_qparams[0].qmin]
    elif op == "softmax":
        y = _softmax(ql, x)
    else:
        raise ValueError(f"no integer execution for op {op!r}")
    # A fused activation may tighten a signed grid to non-negative values; storage follows the tensor's grid.
    return y.astype(ql.output_qparams.storage_dtype, copy=False), wrapped


def run_integer(
    qgraph: QuantizedGraph,
    x_float: np.ndarray,
    keep_all: bool = False,
    acc_bits: int = 32,
    progress: ProgressCallback | None = None,
    engine: GemmEngine = "int8-gemm",
) -> IntegerRun:
    """Run the whole network in integers on the float input ``x_float`` (shaped like the graph input).

    ``engine`` evaluates the matrix unit's sums: ``int8-gemm`` is the Numba kernel of
    :mod:`tpusim.kernels.gemm` (single-threaded, AVX-512 VNNI where the CPU has it); ``exact-blas``
    computes the same integers with float32 BLAS on chunks of K small enough that every partial sum
    is an exactly representable integer (slower, and much slower when BLAS threads compete for busy cores);
    tests hold the two equal, wrap counts included. A callable ``MatrixUnit`` (for example the
    PE-level array of :mod:`tpusim.kernels.systolic`) may stand in for either.
    """
    graph = qgraph.graph
    tensors = {graph.input_name: quantize(np.asarray(x_float, np.float32), qgraph.input_qparams)}
    remaining = {}
    for layer in graph.layers:
        for name in layer.inputs:
            remaining[name] = remaining.get(name, 0) + 1
    wrapped: dict[str, int] = {}
    total = len(qgraph.layers)
    for index, ql in enumerate(qgraph.layers):
        y, count = run_layer(ql, [tensors[name] for name in ql.layer.inputs], acc_bits, engine)
        tensors[ql.layer.output] = y
        if ql.layer.is_matrix:
            wrapped[ql.name] = count
        if not keep_all:
            for name in ql.layer.inputs:
                remaining[name] -= 1
                if remaining[name] == 0 and name not in graph.outputs:
                    del tensors[name]
        if progress is not None:
            progress(index + 1, total, ql.name)
    outputs = {name: tensors[name] for name in graph.outputs}
    dequantized = {name: dequantize(q, qgraph.tensor_qparams[name]) for name, q in outputs.items()}
    return IntegerRun(outputs=outputs, dequantized=dequantized, tensors=tensors if keep_all else dict(outputs),
                      wrapped=wrapped)
