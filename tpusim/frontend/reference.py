"""FP32 reference execution of a lowered :class:`Graph` in numpy.

This is the front end's own evaluator of the BN-folded, activation-fused graph; tests compare it with
ONNX Runtime on the original model, and the quantizer measures int8 fidelity against it. Each op's
arithmetic is its module's ``reference`` (:mod:`tpusim.ops`).
"""
from __future__ import annotations

import numpy as np

from tpusim import ops
from tpusim.ir import Graph, Layer
from tpusim.walk import walk


def run_layer(layer: Layer, inputs: list[np.ndarray]) -> np.ndarray:
    """Evaluate one lowered layer (including its fused activation) on float inputs."""
    y = ops.op(layer.op).reference(layer, inputs)
    return layer.activation.apply(y).astype(np.float32, copy=False)


def run_reference(graph: Graph, x: np.ndarray, keep_all: bool = False) -> dict[str, np.ndarray]:
    """Run the graph on input ``x``; returns the graph outputs (or every tensor with ``keep_all``)."""
    return walk(graph, {graph.input_name: np.asarray(x, dtype=np.float32)},
                lambda _, layer, inputs: run_layer(layer, inputs), keep_all)
