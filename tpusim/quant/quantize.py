"""Lowered FP32 :class:`Graph` + calibration statistics -> :class:`QuantizedGraph` (what the chip stores).

Every tensor has one set of per-tensor activation parameters. Ops whose output values lie on the grid
of their input reuse the input's parameters, so the chip needs no requantization there:

- ``maxpool`` and ``reshape`` (values are copied, never changed);
- ``activation`` (a stand-alone ReLU/Clip: an integer clamp on the input's grid);
- ``avgpool``: the output keeps the input's grid (white paper sec. 2.3.3, and what ONNX Runtime's
  quantizer does) but still needs one dyadic rescale by ``1 / count`` after summing the window.

Every other tensor (the graph input, outputs of conv, gemm, add, concat, global_avgpool, softmax,
sigmoid, tanh) gets its own parameters from its calibrated range.

Matrix layers keep int8 weights (symmetric, [-127, 127]), an int32 bias on the accumulator's grid
``s_w * s_x`` and a requantization multiplier ``s_x * s_w / s_y`` as a dyadic ``(m0, shift)`` pair,
one per tensor or per output channel. The input zero point's contribution ``-z_x * sum_k W_q`` is
constant, so it is folded into the bias the accumulators start from (DESIGN.md sec. 5); padding the
input with ``z_x`` keeps the identity exact at the borders. A fused ReLU/ReLU6 is only a tighter
[qmin, qmax] of the requantized output.

Add rescales both inputs into a common fixed-point domain (``(q - z) << ADD_LEFT_SHIFT`` times
``s_i / (2 max(s_a, s_b))``), sums and requantizes the sum. Concat requantizes each input whose grid
differs from the output's. Sigmoid and tanh of an 8-bit input are exactly a 256-entry table computed
offline, so they are integer-only at run time. Softmax is not elementwise: the vector unit
dequantizes, evaluates it in float32 and quantizes (the one float step of the chip model).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Mapping

import numpy as np

from tpusim.config import QuantConfig
from tpusim.errors import ModelError
from tpusim.ir import Graph, Layer
from tpusim.quant.arithmetic import (
    QParams,
    activation_qparams,
    bias_to_int32,
    dequantize,
    quantize,
    weight_qparams,
)
from tpusim.quant.bias_correction import correct_bias, histogram_means
from tpusim.quant.fixed_point import quantize_multiplier
from tpusim.quant.histogram import TensorStats
from tpusim.quant.ranges import select_range
from tpusim import tensor_ops

PASS_THROUGH_OPS = ("maxpool", "reshape", "activation", "avgpool")
LUT_OPS = ("sigmoid", "tanh")
# Headroom bits of the add's common domain: |q - z| <= 255 shifted by 20 stays below 2**28, so the
# two rescaled inputs and their sum fit an int32, and 20 fractional bits make the rescale error
# negligible next to the output's rounding (TensorFlow Lite uses the same layout for 8-bit add).
ADD_LEFT_SHIFT = 20
_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1


@dataclass(frozen=True, eq=False)
class Requant:
    """A dyadic multiplier ``m0 * 2**(-31 - shift)``; one entry, or one per output channel."""

    m0: np.ndarray
    shift: np.ndarray
    real: np.ndarray  # the real multiplier it approximates (float64), for reports and tests

    @staticmethod
    def of(real: np.ndarray | float) -> "Requant":
        real = np.atleast_1d(np.asarray(real, dtype=np.float64))
        m0, shift = quantize_multiplier(real)
        return Requant(m0=m0, shift=shift, real=real)

    @property
    def channels(self) -> int:
        return int(self.m0.size)


@dataclass(frozen=True, eq=False)
class QLayer:
    """One layer as the chip stores it. Fields that do not apply to the op are None."""

    layer: Layer                        # the float layer (bias corrected when bias correction is on)
    input_qparams: tuple[QParams, ...]
    output_qparams: QParams
    out_qmin: int                       # the output grid tightened by the fused activation
    out_qmax: int
    weight_q: np.ndarray | None = None  # int8, shaped like layer.weight
    weight_qparams: QParams | None = None
    bias_q: np.ndarray | None = None    # int32 at s_w * s_x: the bias as a QDQ model stores it
    acc_bias: np.ndarray | None = None  # int32: bias_q - z_x * sum_k W_q, what the accumulators start from
    requant: Requant | None = None      # output rescale (avgpool: indexed by the window's element count)
    input_rescales: tuple[Requant | None, ...] = ()  # add/concat: per input (None: same grid as output)
    pool_counts: np.ndarray | None = None  # avgpool: elements per output window, (Hout, Wout)
    lut: np.ndarray | None = None       # sigmoid/tanh: output integer for input q at lut[q - qmin]

    @property
    def name(self) -> str:
        return self.layer.name


@dataclass(frozen=True, eq=False)
class QuantizedGraph:
    graph: Graph                         # the float graph quantized (biases as corrected)
    quant: QuantConfig
    tensor_qparams: Mapping[str, QParams]  # every tensor's activation parameters
    layers: tuple[QLayer, ...]

    @property
    def input_qparams(self) -> QParams:
        return self.tensor_qparams[self.graph.input_name]

    def layer(self, name: str) -> QLayer:
        for qlayer in self.layers:
            if qlayer.name == name:
                return qlayer
        raise KeyError(name)


def own_params_tensors(graph: Graph) -> list[str]:
    """Tensors whose parameters come from their own calibrated range (the rest inherit their input's)."""
    return [graph.input_name] + [layer.output for layer in graph.layers if layer.op not in PASS_THROUGH_OPS]


def activation_bounds(qp: QParams, layer: Layer) -> tuple[int, int]:
    """[qmin, qmax] of the output grid clamped by the layer's fused activation, quantized as ONNX does."""
    act = layer.activation
    qmin, qmax = qp.qmin, qp.qmax
    if act.kind == "none":
        return qmin, qmax
    if np.isfinite(act.lo):
        qmin = max(qmin, int(quantize(np.float32(act.lo), qp)))
    if np.isfinite(act.hi):
        qmax = min(qmax, int(quantize(np.float32(act.hi), qp)))
    return qmin, qmax


def _activation_params(graph: Graph, stats: Mapping[str, TensorStats], quant: QuantConfig) -> dict[str, QParams]:
    symmetric = quant.activations == "symmetric-int8"
    params: dict[str, QParams] = {}
    for tensor in own_params_tensors(graph):
        if tensor not in stats:
            raise ModelError(f"{graph.name}: no calibration statistics for tensor {tensor!r}")
        lo, hi = select_range(quant.calibration, stats[tensor], symmetric=symmetric, percentile=quant.percentile)
        params[tensor] = activation_qparams(lo, hi, quant.activations)
    for layer in graph.layers:
        if layer.op in PASS_THROUGH_OPS:
            params[layer.output] = params[layer.inputs[0]]
    return params


def _scalar(values: np.ndarray) -> float:
    return float(np.asarray(values).reshape(-1)[0])


def _bias_safe_weight_qparams(layer: Layer, w_qp: QParams, x_qp: QParams) -> QParams:
    """Raise weight scales just enough that each int32 accumulator start (bias / (s_w s_x) minus the
    folded zero-point term, at most |z_x| 127 K) fits in int32.

    Trained nets have dead channels (weights ~1e-9 with a real bias); their per-channel scale would
    make the integer bias overflow. ONNX Runtime's quantizer adjusts the weight scale the same way."""
    if layer.bias is None:
        return w_qp
    n_out = layer.weight.shape[0]
    k = layer.weight.size // n_out
    room = _INT32_MAX - abs(int(x_qp.zero_point)) * w_qp.qmax * k
    if room <= 0:
        raise ModelError(f"{layer.name}: K={k} products with zero point {int(x_qp.zero_point)} cannot fit an int32 "
                         "accumulator")
    needed = np.abs(layer.bias.astype(np.float64)) / (_scalar(x_qp.scale) * room)
    if w_qp.axis is None:
        needed = np.array(needed.max())
    floor = np.nextafter(needed.astype(np.float32), np.float32(np.inf)).astype(np.float64)
    if np.all(floor <= w_qp.scale):
        return w_qp
    return QParams(np.maximum(w_qp.scale, floor), w_qp.zero_point, w_qp.qmin, w_qp.qmax, w_qp.axis)


def _matrix_layer(layer: Layer, x_qp: QParams, y_qp: QParams, quant: QuantConfig, input_mean) -> QLayer:
    w_qp = weight_qparams(layer.weight, quant.weights, axis=0, name=f"{layer.name} weight")
    w_qp = _bias_safe_weight_qparams(layer, w_qp, x_qp)
    weight_q = quantize(layer.weight, w_qp)
    if input_mean is not None:
        layer = dataclasses.replace(layer, bias=correct_bias(layer, dequantize(weight_q, w_qp), input_mean))
    n_out = layer.weight.shape[0]
    s_x, z_x = _scalar(x_qp.scale), int(x_qp.zero_point)
    s_w = np.broadcast_to(w_qp.scale, (n_out,))
    bias = np.zeros(n_out, np.float32) if layer.bias is None else layer.bias
    bias_q = bias_to_int32(bias, s_w, s_x)
    acc_bias = bias_q.astype(np.int64) - z_x * weight_q.reshape(n_out, -1).astype(np.int64).sum(axis=1)
    if acc_bias.min() < _INT32_MIN or acc_bias.max() > _INT32_MAX:
        raise ModelError(f"{layer.name}: bias with the folded zero-point term does not fit an int32 accumulator")
    real = s_x * w_qp.scale / _scalar(y_qp.scale)
    requant = Requant.of(real)
    out_qmin, out_qmax = activation_bounds(y_qp, layer)
    return QLayer(
        layer=layer, input_qparams=(x_qp,), output_qparams=y_qp, out_qmin=out_qmin, out_qmax=out_qmax,
        weight_q=weight_q, weight_qparams=w_qp, bias_q=bias_q, acc_bias=acc_bias.astype(np.int32),
        requant=requant,
    )


def _add_layer(layer: Layer, in_qps: tuple[QParams, ...], y_qp: QParams) -> QLayer:
    scales = [_scalar(qp.scale) for qp in in_qps]
    twice_max = 2.0 * max(scales)
    rescales = tuple(Requant.of(s / twice_max) for s in scales)
    requant = Requant.of(twice_max / (2.0**ADD_LEFT_SHIFT * _scalar(y_qp.scale)))
    out_qmin, out_qmax = activation_bounds(y_qp, layer)
    return QLayer(layer=layer, input_qparams=in_qps, output_qparams=y_qp, out_qmin=out_qmin, out_qmax=out_qmax,
                  requant=requant, input_rescales=rescales)


def _same_grid(a: QParams, b: QParams) -> bool:
    return _scalar(a.scale) == _scalar(b.scale) and int(a.zero_point) == int(b.zero_point) and a.qmin == b.qmin


def _concat_layer(layer: Layer, in_qps: tuple[QParams, ...], y_qp: QParams) -> QLayer:
    rescales = tuple(None if _same_grid(qp, y_qp) else Requant.of(_scalar(qp.scale) / _scalar(y_qp.scale))
                     for qp in in_qps)
    return QLayer(layer=layer, input_qparams=in_qps, output_qparams=y_qp, out_qmin=y_qp.qmin, out_qmax=y_qp.qmax,
                  input_rescales=rescales)


def _avgpool_layer(layer: Layer, x_qp: QParams, y_qp: QParams) -> QLayer:
    _, _, h, w = layer.input_shapes[0]
    counts = tensor_ops.pool_counts(h, w, layer.pool).astype(np.int64)
    window = layer.pool.kernel[0] * layer.pool.kernel[1]
    ratio = _scalar(x_qp.scale) / _scalar(y_qp.scale)
    # Index 0 is never used (every window holds an element); keeping it makes m0[count] a direct lookup.
    requant = Requant.of(np.array([0.0] + [ratio / c for c in range(1, window + 1)]))
    out_qmin, out_qmax = activation_bounds(y_qp, layer)
    return QLayer(layer=layer, input_qparams=(x_qp,), output_qparams=y_qp, out_qmin=out_qmin, out_qmax=out_qmax,
                  requant=requant, pool_counts=counts)


def _global_avgpool_layer(layer: Layer, x_qp: QParams, y_qp: QParams) -> QLayer:
    _, _, h, w = layer.input_shapes[0]
    requant = Requant.of(_scalar(x_qp.scale) / (_scalar(y_qp.scale) * h * w))
    out_qmin, out_qmax = activation_bounds(y_qp, layer)
    return QLayer(layer=layer, input_qparams=(x_qp,), output_qparams=y_qp, out_qmin=out_qmin, out_qmax=out_qmax,
                  requant=requant)


def elementwise_lut(layer: Layer, x_qp: QParams, y_qp: QParams) -> np.ndarray:
    """Output integer for every input integer q in [qmin, qmax] (indexed by q - qmin).

    Built with the same float32 dequantize -> f -> quantize steps a QDQ model takes, so the table is
    what ONNX Runtime computes element by element.
    """
    grid = np.arange(x_qp.qmin, x_qp.qmax + 1)
    x = dequantize(grid, x_qp)
    y = tensor_ops.sigmoid(x) if layer.op == "sigmoid" else np.tanh(x)
    y = layer.activation.apply(y.astype(np.float32))
    return quantize(y, y_qp)


def _simple_layer(layer: Layer, in_qps: tuple[QParams, ...], y_qp: QParams) -> QLayer:
    out_qmin, out_qmax = activation_bounds(y_qp, layer)
    lut = elementwise_lut(layer, in_qps[0], y_qp) if layer.op in LUT_OPS else None
    return QLayer(layer=layer, input_qparams=in_qps, output_qparams=y_qp, out_qmin=out_qmin, out_qmax=out_qmax,
                  lut=lut)


def quantize_graph(
    graph: Graph,
    stats: Mapping[str, TensorStats],
    quant: QuantConfig,
    input_means: Mapping[str, np.ndarray] | None = None,
) -> QuantizedGraph:
    """Quantize every layer of ``graph`` with ranges chosen from ``stats`` as ``quant`` says.

    With ``quant.bias_correction``, each matrix layer's bias is corrected by ``-(W_q - W) E[x]``
    (white paper eq. 26). ``input_means`` gives ``E[x]`` per tensor (per channel, e.g. from
    :func:`tpusim.quant.bias_correction.input_channel_means`); without it the per-tensor mean of the
    calibration histogram is used.
    """
    params = _activation_params(graph, stats, quant)
    means: Mapping[str, np.ndarray] | None = None
    if quant.bias_correction:
        means = input_means if input_means is not None else histogram_means(stats)
    qlayers = []
    for layer in graph.layers:
        in_qps = tuple(params[name] for name in layer.inputs)
        y_qp = params[layer.output]
        if layer.is_matrix:
            mean = None if means is None else means[layer.inputs[0]]
            qlayers.append(_matrix_layer(layer, in_qps[0], y_qp, quant, mean))
        elif layer.op == "add":
            qlayers.append(_add_layer(layer, in_qps, y_qp))
        elif layer.op == "concat":
            qlayers.append(_concat_layer(layer, in_qps, y_qp))
        elif layer.op == "avgpool":
            qlayers.append(_avgpool_layer(layer, in_qps[0], y_qp))
        elif layer.op == "global_avgpool":
            qlayers.append(_global_avgpool_layer(layer, in_qps[0], y_qp))
        else:
            qlayers.append(_simple_layer(layer, in_qps, y_qp))
    float_graph = dataclasses.replace(graph, layers=tuple(q.layer for q in qlayers))
    return QuantizedGraph(graph=float_graph, quant=quant, tensor_qparams=params, layers=tuple(qlayers))
