"""Bias correction (white paper sec. 3.3, eq. 25-27): remove the expected output shift of quantized weights.

With ``dW = dequant(W_q) - W``, the quantized layer's expected output is off by ``dW E[x]``; the
corrected float bias is ``b - dW E[x]``, quantized like any bias, so it costs nothing at run time.
``E[x]`` per input channel comes from an FP32 run over calibration data (empirical correction:
by linearity ``dW E[x] = E[W_q x] - E[W x]``, eq. 27), or, when only histograms are at hand, the
per-tensor mean of the calibration histogram. Conv padding is ignored: border windows see fewer
real inputs than ``E[x]`` assumes, a small error next to the shift being removed.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np

from tpusim.frontend.reference import run_reference
from tpusim.ir import Graph, Layer
from tpusim.quant.histogram import TensorStats


def histogram_means(stats: Mapping[str, TensorStats]) -> dict[str, np.ndarray]:
    """Per-tensor mean of each calibration histogram (bin centres cut to the exact extremes)."""
    means = {}
    for name, s in stats.items():
        centres = np.clip((s.edges[:-1] + s.edges[1:]) / 2.0, s.min, s.max)
        means[name] = np.array(float(np.dot(s.counts, centres) / s.count))
    return means


def input_channel_means(graph: Graph, inputs: np.ndarray) -> dict[str, np.ndarray]:
    """``E[x]`` per channel (axis 1; per feature for 2-D) of every matrix layer's input, from FP32 runs.

    The graph runs one batch of ``graph.batch`` samples at a time (its shapes are fixed); a last
    partial batch is left out.
    """
    batch_size = graph.batch
    wanted = {layer.inputs[0] for layer in graph.matrix_layers}
    sums: dict[str, np.ndarray] = {}
    rows: dict[str, int] = {}
    for start in range(0, len(inputs) - batch_size + 1, batch_size):
        tensors = run_reference(graph, inputs[start : start + batch_size], keep_all=True)
        for name in wanted:
            t = tensors[name].astype(np.float64)
            t = t.reshape(-1, t.shape[-1]) if t.ndim == 2 else np.moveaxis(t, 1, -1).reshape(-1, t.shape[1])
            sums[name] = sums.get(name, 0.0) + t.sum(axis=0)
            rows[name] = rows.get(name, 0) + t.shape[0]
        del tensors  # before the next batch's run: one batch's tensors held at a time, not two
    return {name: sums[name] / rows[name] for name in wanted}


def bias_shift(layer: Layer, weight_dequant: np.ndarray, input_mean: np.ndarray) -> np.ndarray:
    """``dW E[x]`` per output channel; ``input_mean`` is per input channel (or one scalar)."""
    delta = weight_dequant.astype(np.float64) - layer.weight.astype(np.float64)
    n_out = delta.shape[0]
    if layer.op == "gemm":
        mean = np.broadcast_to(np.asarray(input_mean, np.float64), (delta.shape[1],))
        return delta @ mean
    groups = layer.conv.groups
    c_in_g = delta.shape[1]
    mean = np.broadcast_to(np.asarray(input_mean, np.float64), (groups * c_in_g,)).reshape(groups, c_in_g)
    per_channel = delta.sum(axis=(2, 3)).reshape(groups, n_out // groups, c_in_g)
    return np.einsum("gnc,gc->gn", per_channel, mean).reshape(n_out)


def correct_bias(layer: Layer, weight_dequant: np.ndarray, input_mean: np.ndarray) -> np.ndarray:
    """The float bias minus the expected shift the quantized weights would add (eq. 26)."""
    bias = np.zeros(layer.weight.shape[0]) if layer.bias is None else layer.bias.astype(np.float64)
    return (bias - bias_shift(layer, weight_dequant, input_mean)).astype(np.float32)
