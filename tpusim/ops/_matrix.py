"""What the matrix ops (conv, gemm) share: their quantization rule and the matrix unit's sums.

Matrix layers keep int8 weights (symmetric, [-127, 127]), an int32 bias on the accumulator's grid
``s_w * s_x`` and a requantization multiplier ``s_x * s_w / s_y`` as a dyadic ``(m0, shift)`` pair,
one per tensor or per output channel. The input zero point's contribution ``-z_x * sum_k W_q`` is
constant, so it is folded into the bias the accumulators start from (DESIGN.md sec. 5); padding the
input with ``z_x`` keeps the identity exact at the borders. A fused ReLU/ReLU6 is only a tighter
[qmin, qmax] of the requantized output.
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import numpy as np

from tpusim.config import QuantConfig
from tpusim.errors import ModelError
from tpusim.ir import Layer
from tpusim.ops.base import GemmEngine

if TYPE_CHECKING:  # annotations only
    from tpusim.quant.arithmetic import QParams
    from tpusim.quant.qlayer import QLayer


def _bias_safe_weight_qparams(layer: Layer, w_qp: QParams, x_qp: QParams) -> QParams:
    """Raise weight scales just enough that each int32 accumulator start (bias / (s_w s_x) minus the
    folded zero-point term, at most |z_x| 127 K) fits in int32.

    Trained nets have dead channels (weights ~1e-9 with a real bias); their per-channel scale would
    make the integer bias overflow. ONNX Runtime's quantizer adjusts the weight scale the same way."""
    from tpusim.quant.arithmetic import QParams
    from tpusim.quant.qlayer import INT32_MAX, scalar
    if layer.bias is None:
        return w_qp
    n_out = layer.weight.shape[0]
    k = layer.weight.size // n_out
    room = INT32_MAX - abs(int(x_qp.zero_point)) * w_qp.qmax * k
    if room <= 0:
        raise ModelError(f"{layer.name}: K={k} products with zero point {int(x_qp.zero_point)} cannot fit an int32 "
                         "accumulator")
    needed = np.abs(layer.bias.astype(np.float64)) / (scalar(x_qp.scale) * room)
    if w_qp.axis is None:
        needed = np.array(needed.max())
    floor = np.nextafter(needed.astype(np.float32), np.float32(np.inf)).astype(np.float64)
    if np.all(floor <= w_qp.scale):
        return w_qp
    return QParams(np.maximum(w_qp.scale, floor), w_qp.zero_point, w_qp.qmin, w_qp.qmax, w_qp.axis)


def _model_weights(layer: Layer) -> tuple[QParams, np.ndarray]:
    """A QDQ model's own weight grid and integers; its float weights are exactly ``scale * q``."""
    from tpusim.quant.arithmetic import QParams, dequantize, quantize
    scale = np.asarray(layer.attr("weight_scale"), np.float64)
    n_out = layer.weight.shape[0]
    per_channel = scale.size > 1
    w_qp = QParams(scale.reshape(n_out) if per_channel else scale.reshape(()),
                   np.zeros(n_out if per_channel else (), np.int32), int(layer.attr("weight_qmin")), 127,
                   axis=0 if per_channel else None)
    weight_q = quantize(layer.weight, w_qp)
    if not np.array_equal(dequantize(weight_q, w_qp), layer.weight):
        raise ModelError(f"{layer.name}: the float weights are not the model's integers times its scales (was a "
                         "BatchNormalization folded into a quantized conv? run onnxruntime.quantization."
                         "quant_pre_process before quantize_static)")
    return w_qp, weight_q


def quantize_matrix_layer(layer: Layer, x_qp: QParams, y_qp: QParams, quant: QuantConfig,
                          input_mean: np.ndarray | None) -> QLayer:
    from tpusim.quant.arithmetic import bias_to_int32, dequantize, quantize, weight_qparams
    from tpusim.quant.bias_correction import correct_bias
    from tpusim.quant.qlayer import INT32_MAX, INT32_MIN, QLayer, Requant, activation_bounds, scalar
    if layer.attr("weight_scale") is not None:
        w_qp, weight_q = _model_weights(layer)
    else:
        w_qp = weight_qparams(layer.weight, quant.weights, axis=0, name=f"{layer.name} weight")
        w_qp = _bias_safe_weight_qparams(layer, w_qp, x_qp)
        weight_q = quantize(layer.weight, w_qp)
    if input_mean is not None:
        layer = dataclasses.replace(layer, bias=correct_bias(layer, dequantize(weight_q, w_qp), input_mean))
    n_out = layer.weight.shape[0]
    s_x, z_x = scalar(x_qp.scale), int(x_qp.zero_point)
    s_w = np.broadcast_to(w_qp.scale, (n_out,))
    bias = np.zeros(n_out, np.float32) if layer.bias is None else layer.bias
    model_bias = layer.attr("bias_int32")
    bias_q = bias_to_int32(bias, s_w, s_x) if model_bias is None else np.asarray(model_bias, np.int32)
    acc_bias = bias_q.astype(np.int64) - z_x * weight_q.reshape(n_out, -1).sum(axis=1, dtype=np.int64)
    if acc_bias.min() < INT32_MIN or acc_bias.max() > INT32_MAX:
        raise ModelError(f"{layer.name}: bias with the folded zero-point term does not fit an int32 accumulator")
    requant = Requant.of(s_x * w_qp.scale / scalar(y_qp.scale))
    out_qmin, out_qmax = activation_bounds(y_qp, layer)
    return QLayer(
        layer=layer, input_qparams=(x_qp,), output_qparams=y_qp, out_qmin=out_qmin, out_qmax=out_qmax,
        weight_q=weight_q, weight_qparams=w_qp, bias_q=bias_q, acc_bias=acc_bias.astype(np.int32),
        requant=requant,
    )


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


def accumulate(cols: np.ndarray, weight: np.ndarray, acc_bias: np.ndarray, acc_bits: int,
               engine: GemmEngine) -> tuple[np.ndarray, int]:
    """(groups, M, K) activations x (groups, N/g, K) weights + bias -> (groups, M, N/g) int32 accumulators."""
    from tpusim.kernels.gemm import grouped_int8_gemm
    from tpusim.quant.qlayer import INT32_MAX, INT32_MIN
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
        if result.min(initial=0) < INT32_MIN or result.max(initial=0) > INT32_MAX:
            # Accumulators wider than 32 bits: the activation unit reads int32, which holds any sum
            # of realistic K; a wider one is a model this chip cannot requantize.
            raise OverflowError(f"accumulator values beyond int32 with acc_bits={acc_bits}")
        acc[g] = result
        wrapped += count
    return acc, wrapped
