"""Lowered FP32 :class:`Graph` + calibration statistics -> :class:`QuantizedGraph` (what the chip stores).

Every tensor has one set of per-tensor activation parameters. Ops whose output values lie on the grid
of their input (``inherits_grid`` in their module: max pooling, reshape, a stand-alone clamp, average
pooling, which still rescales by ``1 / count``) reuse the input's parameters, so the chip needs no
requantization there; every other tensor (the graph input and the outputs of every other op) gets its
own parameters from its calibrated range. How each op is then quantized (int8 weights and int32 bias,
dyadic multipliers, tables) is its module's ``quantize`` rule (:mod:`tpusim.ops`).
"""
from __future__ import annotations

import dataclasses
from typing import Mapping

import numpy as np

from tpusim import ops
from tpusim.config import QuantConfig
from tpusim.errors import ModelError
from tpusim.ir import Graph
from tpusim.quant.arithmetic import QParams, activation_qparams
from tpusim.quant.bias_correction import histogram_means
from tpusim.quant.fixed_point import MultiplierRangeError
from tpusim.quant.histogram import TensorStats
from tpusim.quant.qlayer import QuantizedGraph
from tpusim.quant.ranges import select_range


def own_params_tensors(graph: Graph) -> list[str]:
    """Tensors whose parameters come from their own calibrated range (the rest inherit their input's)."""
    return [graph.input_name] + [layer.output for layer in graph.layers if not ops.op(layer.op).inherits_grid]


def _activation_params(graph: Graph, stats: Mapping[str, TensorStats], quant: QuantConfig) -> dict[str, QParams]:
    symmetric = quant.activations == "symmetric-int8"
    params: dict[str, QParams] = {}
    for tensor in own_params_tensors(graph):
        if tensor not in stats:
            raise ModelError(f"{graph.name}: no calibration statistics for tensor {tensor!r}")
        lo, hi = select_range(quant.calibration, stats[tensor], symmetric=symmetric, percentile=quant.percentile)
        params[tensor] = activation_qparams(lo, hi, quant.activations)
    for layer in graph.layers:
        if ops.op(layer.op).inherits_grid:
            params[layer.output] = params[layer.inputs[0]]
    return params


def _quantize_layer(graph: Graph, layer, params: Mapping[str, QParams], quant: QuantConfig, mean):
    try:
        return ops.op(layer.op).quantize(layer, tuple(params[name] for name in layer.inputs), params[layer.output],
                                         quant, mean)
    except MultiplierRangeError as exc:
        raise ModelError(f"{graph.name}: layer {layer.name!r}: {exc} (absurd weights or activation ranges?)") from None


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
        mean = None if means is None or not ops.op(layer.op).matrix else means[layer.inputs[0]]
        qlayers.append(_quantize_layer(graph, layer, params, quant, mean))
    float_graph = dataclasses.replace(graph, layers=tuple(q.layer for q in qlayers))
    return QuantizedGraph(graph=float_graph, quant=quant, tensor_qparams=params, layers=tuple(qlayers))


def unquantized_tensors(graph: Graph) -> list[str]:
    """Tensors of a QDQ model that need their own grid on the chip but that the model left in float
    (ONNX Runtime's quantizer skips some ops, e.g. ReduceMean)."""
    return [t for t in own_params_tensors(graph) if t not in graph.model_grids]


def quantize_from_model(graph: Graph, quant: QuantConfig,
                        stats: Mapping[str, TensorStats] | None = None) -> QuantizedGraph:
    """A QDQ model with its own parameters: the grids its QuantizeLinear nodes give every tensor
    (``graph.model_grids``) and, per matrix layer, its weight scales and int32 bias.

    The tensors the model left in float (:func:`unquantized_tensors`) get ranges calibrated as
    ``quant`` says from ``stats``; without statistics for them, one clear error. Ops whose output
    keeps its input's grid keep it here too.
    """
    grids = graph.model_grids
    params: dict[str, QParams] = {}
    symmetric = quant.activations == "symmetric-int8"
    for tensor in own_params_tensors(graph):
        if tensor in grids:
            params[tensor] = grids[tensor]
        elif stats is not None and tensor in stats:
            lo, hi = select_range(quant.calibration, stats[tensor], symmetric=symmetric, percentile=quant.percentile)
            params[tensor] = activation_qparams(lo, hi, quant.activations)
        else:
            raise ModelError(f"{graph.name}: tensor {tensor!r} has no QuantizeLinear/DequantizeLinear in the model "
                             "and no calibration statistics")
    for layer in graph.layers:
        if ops.op(layer.op).inherits_grid:
            params[layer.output] = params[layer.inputs[0]]
    qlayers = [_quantize_layer(graph, layer, params, quant, None) for layer in graph.layers]
    return QuantizedGraph(graph=graph, quant=quant, tensor_qparams=params, layers=tuple(qlayers))
