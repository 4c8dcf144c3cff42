"""What the chip stores for a quantized network: :class:`QLayer` per layer, :class:`QuantizedGraph`
for the whole graph, and the small integer helpers that op modules share."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np

from tpusim.config import QuantConfig
from tpusim.ir import Graph, Layer
from tpusim.quant.arithmetic import QParams, quantize
from tpusim.quant.fixed_point import quantize_multiplier, requantize

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1


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
    lut: np.ndarray | None = None       # table ops: output integer for input q at lut[q - qmin]

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


def scalar(values: np.ndarray) -> float:
    return float(np.asarray(values).reshape(-1)[0])


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


def plain_qlayer(layer: Layer, in_qps: tuple[QParams, ...], y_qp: QParams, **fields) -> QLayer:
    """A QLayer whose output grid is ``y_qp`` tightened by the fused activation."""
    out_qmin, out_qmax = activation_bounds(y_qp, layer)
    return QLayer(layer=layer, input_qparams=in_qps, output_qparams=y_qp, out_qmin=out_qmin, out_qmax=out_qmax,
                  **fields)


def rescale(values: np.ndarray, r: Requant, zero_point: int, qmin: int, qmax: int, channel_axis: int = 1) -> np.ndarray:
    return requantize(values, r.m0, r.shift, zero_point, qmin, qmax, channel_axis=channel_axis)


def rescale_output(ql: QLayer, values: np.ndarray, channel_axis: int = 1) -> np.ndarray:
    """int32 values -> the layer's output integers with its own requant and (tightened) bounds."""
    return rescale(values, ql.requant, int(ql.output_qparams.zero_point), ql.out_qmin, ql.out_qmax, channel_axis)


def centered(q: np.ndarray, zero_point: np.ndarray) -> np.ndarray:
    return q.astype(np.int32) - np.int32(zero_point)


def clamp_output(ql: QLayer, q: np.ndarray) -> np.ndarray:
    return np.clip(q, ql.out_qmin, ql.out_qmax).astype(q.dtype)


def same_grid(a: QParams, b: QParams) -> bool:
    return scalar(a.scale) == scalar(b.scale) and int(a.zero_point) == int(b.zero_point) and a.qmin == b.qmin


def rescales_to(in_qps: tuple[QParams, ...], y_qp: QParams) -> tuple[Requant | None, ...]:
    """Per input, the rescale onto the output grid ``y_qp`` (None for an input already on it)."""
    return tuple(None if same_grid(qp, y_qp) else Requant.of(scalar(qp.scale) / scalar(y_qp.scale)) for qp in in_qps)


def on_output_grid(ql: QLayer, inputs: list[np.ndarray]) -> list[np.ndarray]:
    """Each input's integers on the layer's output grid, by its ``input_rescales`` (see :func:`rescales_to`)."""
    y_qp = ql.output_qparams
    return [q if r is None else rescale(centered(q, qp.zero_point), r, int(y_qp.zero_point), y_qp.qmin, y_qp.qmax)
            for q, qp, r in zip(inputs, ql.input_qparams, ql.input_rescales)]
