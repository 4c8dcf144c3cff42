"""Integer-only execution of a :class:`QuantizedGraph`, as the chip computes it.

The input is quantized once; from then on every value is an 8-bit integer in the unified buffer or
an int32 in the accumulators. Each layer runs its op module's integer kernel (:mod:`tpusim.ops`):
conv is im2col (padded with the input zero point, i.e. real zero) followed by the int8 GEMM of the
matrix unit with the folded int32 bias, wrapping modulo ``2**acc_bits`` (with the default engine,
channels-last and with the requantization fused into the GEMM, so conv outputs are NCHW-shaped views
of channels-last memory; every tensor's values are the same either way); requantization, pooling,
residual add and concat rescales use dyadic multipliers and the rounding shift of
:func:`tpusim.quant.fixed_point.requantize`; table ops look their 256 entries up. Softmax is the one
float step.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from tpusim import ops
from tpusim.ops.base import ExecOptions, GemmEngine, MatrixUnit
from tpusim.quant.arithmetic import dequantize, quantize
from tpusim.quant.qlayer import QLayer, QuantizedGraph
from tpusim.walk import walk

ProgressCallback = Callable[[int, int, str], None]  # (layers done, total layers, name of the layer just run)

__all__ = ["GemmEngine", "IntegerRun", "MatrixUnit", "run_integer", "run_layer"]


@dataclass(frozen=True, eq=False)
class IntegerRun:
    outputs: dict[str, np.ndarray]      # graph outputs as the chip's integers (uint8 or int8)
    dequantized: dict[str, np.ndarray]  # the same outputs dequantized to float32
    tensors: dict[str, np.ndarray]      # every tensor's integers with keep_all, else the outputs only
    wrapped: dict[str, int]             # per matrix layer: outputs whose exact sum left the accumulator


def run_layer(ql: QLayer, inputs: list[np.ndarray], acc_bits: int = 32,
              engine: GemmEngine = "int8-gemm") -> tuple[np.ndarray, int]:
    """One layer on integer inputs: (integer output, wrapped accumulations)."""
    return _run_layer(ops.op(ql.layer.op), ql, inputs, ExecOptions(acc_bits, engine))


def _run_layer(module: ops.Op, ql: QLayer, inputs: list[np.ndarray], options: ExecOptions) -> tuple[np.ndarray, int]:
    y, wrapped = module.execute(ql, inputs, options)
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
    :mod:`tpusim.kernels.gemm` (on ``numba.get_num_threads()`` threads, AVX-512 VNNI where the CPU has
    it; the thread count changes no integer); ``exact-blas``
    computes the same integers with float32 BLAS on chunks of K small enough that every partial sum
    is an exactly representable integer (slower, and much slower when BLAS threads compete for busy cores);
    tests hold the two equal, wrap counts included. A callable ``MatrixUnit`` (for example the
    PE-level array of :mod:`tpusim.kernels.systolic`) may stand in for either.
    """
    graph = qgraph.graph
    wrapped: dict[str, int] = {}
    total = len(qgraph.layers)
    options = ExecOptions(acc_bits, engine)

    def step(index: int, layer, inputs: list[np.ndarray]) -> np.ndarray:
        ql = qgraph.layers[index]
        module = ops.op(layer.op)
        y, count = _run_layer(module, ql, inputs, options)
        if module.accumulates:
            wrapped[ql.name] = count
        if progress is not None:
            progress(index + 1, total, ql.name)
        return y

    sources = {graph.input_name: quantize(np.asarray(x_float, np.float32), qgraph.input_qparams)}
    tensors = walk(graph, sources, step, keep_all)
    outputs = {name: tensors[name] for name in graph.outputs}
    dequantized = {name: dequantize(q, qgraph.tensor_qparams[name]) for name, q in outputs.items()}
    return IntegerRun(outputs=outputs, dequantized=dequantized, tensors=tensors if keep_all else dict(outputs),
                      wrapped=wrapped)
