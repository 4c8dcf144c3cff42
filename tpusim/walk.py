"""The one graph walk: evaluate layers in order, freeing each tensor after its last reader.

The FP32 reference, the integer executor and the accuracy study all run a graph through this, each
with its own ``step`` (how one layer turns its input arrays into its output array).
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from tpusim.ir import Graph, Layer

Step = Callable[[int, Layer, list[np.ndarray]], np.ndarray]  # (layer index, layer, input arrays) -> output


def walk(graph: Graph, sources: dict[str, np.ndarray], step: Step, keep_all: bool = False) -> dict[str, np.ndarray]:
    """Every tensor with ``keep_all``, else the graph outputs. ``sources`` holds the graph input."""
    tensors = dict(sources)
    remaining: dict[str, int] = {}
    for layer in graph.layers:
        for name in layer.inputs:
            remaining[name] = remaining.get(name, 0) + 1
    outputs = set(graph.outputs)
    for index, layer in enumerate(graph.layers):
        tensors[layer.output] = step(index, layer, [tensors[name] for name in layer.inputs])
        if not keep_all:
            for name in layer.inputs:
                remaining[name] -= 1
                if remaining[name] == 0 and name not in outputs:
                    del tensors[name]
    if keep_all:
        return tensors
    return {name: tensors[name] for name in graph.outputs}
