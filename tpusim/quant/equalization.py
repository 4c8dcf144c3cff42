"""Cross-layer equalization (white paper sec. 3.2, eq. 20-22; Nagel et al. 2019, "Data-free quantization").

Two matrix layers in a row, ``h = f(W1 x + b1)`` and ``y = W2 h + b2``, compute the same function
after ``W1 <- S^-1 W1``, ``b1 <- S^-1 b1``, ``W2 <- W2 S`` for any positive diagonal ``S`` whenever
``f`` is positively homogeneous (``f(s z) = s f(z)`` for ``s > 0``: the identity and ReLU). With
``r1_i`` the range of output channel i of W1 and ``r2_i`` the range of the W2 weights that read
channel i, ``s_i = sqrt(r1_i / r2_i)`` gives both channels the range ``sqrt(r1_i r2_i)``, which
evens out the per-channel weight ranges of both layers (eq. 22) -- what per-tensor int8 weights need.
A chain of layers (expand -> depthwise -> project) is equalized pair by pair, sweeping until the
scales stop changing.

A pair qualifies when the second layer is the only reader of the first layer's output (so no
residual add or concat sees the rescaled tensor) and the activation between them is none, ReLU or
ReLU6. ReLU6 is not scale equivariant: ``min(max(z, 0), 6)`` scaled by ``1/s_i`` would need a
per-channel clip at ``6 / s_i``, which a tensor-wide activation (``tpusim.ir.Activation``) cannot
express. Two policies:

- ``relu6="skip"`` (default): pairs joined by a ReLU6 are left alone, so the FP32 function is
  unchanged up to float rounding. On a ReLU6 network this equalizes only the few pairs joined by
  no activation.
- ``relu6="to_relu"``: what Nagel et al. 2019 did for MobileNet-v2 -- the ReLU6 of an equalized pair
  becomes a ReLU. This changes the FP32 function wherever a pre-activation exceeded 6. It is not
  safe in general: on the pretrained EfficientNet-Lite0 even the bare ReLU6 -> ReLU swap changes the
  top-1 class of every photo view tried (``benchmarks/accuracy_table.py`` reports it), because that
  network was trained to rely on the saturation.

Equalizing ReLU6 pairs exactly needs per-channel clip bounds in the activation unit.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

from tpusim.ir import Activation, Graph, Layer

Relu6Policy = Literal["to_relu", "skip"]
RELU = Activation("relu", 0.0, math.inf)
MAX_SWEEPS = 100
# Stop when no scale of a sweep moved a range by more than this factor.
CONVERGENCE_TOLERANCE = 1e-4


@dataclass(frozen=True)
class EqualizedPair:
    first: str                # layer whose output channels are divided by s
    second: str               # layer whose input channels are multiplied by s
    relu6_replaced: bool      # the ReLU6 between them became a ReLU


def is_relu6(activation: Activation) -> bool:
    return activation.kind == "clip" and activation.lo == 0.0 and activation.hi == 6.0


def _is_homogeneous(activation: Activation) -> bool:
    if activation.kind == "none":
        return True
    return activation.lo == 0.0 and activation.hi == math.inf  # ReLU, however it was spelled


def output_channel_ranges(weight: np.ndarray) -> np.ndarray:
    """max |w| per output channel (axis 0) of an OIHW conv or (N, K) gemm weight."""
    return np.abs(weight.reshape(weight.shape[0], -1)).max(axis=1)


def input_channel_ranges(layer: Layer) -> np.ndarray:
    """max |w| over the weights that read each input channel (grouped convs: within its group)."""
    w = np.abs(layer.weight)
    if layer.op == "gemm":
        return w.max(axis=0)
    groups = layer.conv.groups
    c_out, c_in_per_group = w.shape[:2]
    grouped = w.reshape(groups, c_out // groups, c_in_per_group, -1)
    return grouped.max(axis=(1, 3)).reshape(groups * c_in_per_group)


def range_spread(weight: np.ndarray) -> float:
    """Largest over median per-output-channel range: how much of a per-tensor int8 grid the typical
    channel leaves unused. (The median, not the minimum: trained nets have near-dead channels whose
    ranges are ~1e-10 and would swamp a max/min ratio.)"""
    ranges = output_channel_ranges(weight)
    median = float(np.median(ranges))
    return float(ranges.max()) / median if median > 0 else float("inf")


def equalizable_pairs(graph: Graph, relu6: Relu6Policy = "skip") -> list[EqualizedPair]:
    """Matrix-layer pairs whose joining tensor only the second layer reads, through none/ReLU(/ReLU6)."""
    readers: dict[str, int] = {}
    for layer in graph.layers:
        for name in layer.inputs:
            readers[name] = readers.get(name, 0) + 1
    producers = {layer.output: layer for layer in graph.layers}
    pairs = []
    for second in graph.matrix_layers:
        first = producers.get(second.inputs[0])
        if first is None or not first.is_matrix or readers[first.output] != 1 or first.output in graph.outputs:
            continue
        if second.op == "gemm" and len(second.input_shapes[0]) != 2:
            continue
        replaced = is_relu6(first.activation)
        if replaced and relu6 == "skip":
            continue
        if not replaced and not _is_homogeneous(first.activation):
            continue
        pairs.append(EqualizedPair(first.name, second.name, replaced))
    return pairs


def _scale_input_channels(layer: Layer, weight: np.ndarray, s: np.ndarray) -> np.ndarray:
    if layer.op == "gemm":
        return weight * s.reshape(1, -1)
    groups = layer.conv.groups
    c_out, c_in_per_group = weight.shape[:2]
    grouped = weight.reshape(groups, c_out // groups, c_in_per_group, -1)
    return (grouped * s.reshape(groups, 1, c_in_per_group, 1)).reshape(weight.shape)


def _pair_scales(first_weight: np.ndarray, second: Layer, second_weight: np.ndarray) -> np.ndarray:
    r1 = output_channel_ranges(first_weight)
    r2 = input_channel_ranges(dataclasses.replace(second, weight=second_weight))
    usable = (r1 > 0) & (r2 > 0)
    s = np.ones_like(r1)
    s[usable] = np.sqrt(r1[usable] / r2[usable])
    return s


def equalize_with_report(graph: Graph, relu6: Relu6Policy = "skip") -> tuple[Graph, list[EqualizedPair]]:
    """The equalized graph and the pairs that were rescaled."""
    pairs = equalizable_pairs(graph, relu6)
    by_name = {layer.name: layer for layer in graph.layers}
    weights = {name: by_name[name].weight.astype(np.float64) for p in pairs for name in (p.first, p.second)}
    biases = {name: None if by_name[name].bias is None else by_name[name].bias.astype(np.float64) for name in weights}
    for _ in range(MAX_SWEEPS):
        largest_change = 0.0
        for pair in pairs:
            s = _pair_scales(weights[pair.first], by_name[pair.second], weights[pair.second])
            weights[pair.first] = weights[pair.first] / s.reshape((-1,) + (1,) * (weights[pair.first].ndim - 1))
            if biases[pair.first] is not None:
                biases[pair.first] = biases[pair.first] / s
            weights[pair.second] = _scale_input_channels(by_name[pair.second], weights[pair.second], s)
            largest_change = max(largest_change, float(np.abs(np.log(s)).max(initial=0.0)))
        if largest_change < CONVERGENCE_TOLERANCE:
            break
    replaced = {p.first for p in pairs if p.relu6_replaced}
    layers = []
    for layer in graph.layers:
        if layer.name in weights:
            bias = biases[layer.name]
            layer = dataclasses.replace(
                layer, weight=weights[layer.name].astype(np.float32),
                bias=None if bias is None else bias.astype(np.float32),
                activation=RELU if layer.name in replaced else layer.activation,
            )
        layers.append(layer)
    return dataclasses.replace(graph, layers=tuple(layers)), pairs


def equalize(graph: Graph, relu6: Relu6Policy = "skip") -> Graph:
    """Cross-layer equalization of every qualifying pair; see the module docstring for ReLU6."""
    return equalize_with_report(graph, relu6)[0]
