"""FP32 reference execution of a lowered :class:`Graph` in numpy.

This is the front end's own evaluator of the BN-folded, activation-fused graph; tests compare it with
ONNX Runtime on the original model, and the quantizer measures int8 fidelity against it.
"""
from __future__ import annotations

import numpy as np

from tpusim import tensor_ops
from tpusim.ir import Graph, Layer


def _gemm(layer: Layer, x: np.ndarray) -> np.ndarray:
    k = layer.weight.shape[1]
    y = x.reshape(-1, k) @ layer.weight.T
    if layer.bias is not None:
        y = y + layer.bias
    return y.reshape(layer.output_shape)


def run_layer(layer: Layer, inputs: list[np.ndarray]) -> np.ndarray:
    """Evaluate one lowered layer (including its fused activation) on float inputs."""
    x = inputs[0]
    op = layer.op
    if op == "conv":
        y = tensor_ops.conv2d(x, layer.weight, layer.bias, layer.conv)
    elif op == "gemm":
        y = _gemm(layer, x)
    elif op == "maxpool":
        y = tensor_ops.maxpool(x, layer.pool)
    elif op == "avgpool":
        y = tensor_ops.avgpool(x, layer.pool)
    elif op == "global_avgpool":
        y = x.mean(axis=(2, 3), keepdims=True)
    elif op == "add":
        y = inputs[0] + inputs[1]
    elif op == "concat":
        y = np.concatenate(inputs, axis=layer.axis)
    elif op == "reshape":
        y = x.reshape(layer.output_shape)
    elif op == "softmax":
        y = tensor_ops.softmax(x, layer.axis)
    elif op == "sigmoid":
        y = tensor_ops.sigmoid(x)
    elif op == "tanh":
        y = np.tanh(x)
    elif op == "activation":
        y = x
    else:
        raise ValueError(f"no reference for op {op!r}")
    return layer.activation.apply(y).astype(np.float32, copy=False)


def run_reference(graph: Graph, x: np.ndarray, keep_all: bool = False) -> dict[str, np.ndarray]:
    """Run the graph on input ``x``; returns the graph outputs (or every tensor with ``keep_all``)."""
    tensors: dict[str, np.ndarray] = {graph.input_name: np.asarray(x, dtype=np.float32)}
    remaining_uses: dict[str, int] = {}
    for layer in graph.layers:
        for name in layer.inputs:
            remaining_uses[name] = remaining_uses.get(name, 0) + 1
    for layer in graph.layers:
        tensors[layer.output] = run_layer(layer, [tensors[name] for name in layer.inputs])
        if not keep_all:
            for name in layer.inputs:
                remaining_uses[name] -= 1
                if remaining_uses[name] == 0 and name not in graph.outputs:
                    del tensors[name]
    if keep_all:
        return tensors
    return {name: tensors[name] for name in graph.outputs}
