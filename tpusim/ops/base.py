"""The interface every op module implements, and the value types it hands to the stages.

One op, one place (DESIGN.md sec. 8): an op's module holds its lowering (ONNX node -> layer
record), FP32 reference, quantization rule, integer kernel, vector-unit cost and ONNX export.
Stages look an op up in :mod:`tpusim.ops` and call these methods; none of them branches on op names.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Literal, Sequence

import numpy as np

if TYPE_CHECKING:  # only for annotations: op modules import the stages' value types, never the stages
    import onnx

    from tpusim.config import QuantConfig
    from tpusim.frontend.context import LowerContext
    from tpusim.ir import Layer
    from tpusim.quant.arithmetic import QParams
    from tpusim.quant.qlayer import QLayer

# A matrix unit: (activations (M, K), weights (K, N) int8, int32 bias (N,), acc_bits) -> (accumulators, wraps).
MatrixUnit = Callable[[np.ndarray, np.ndarray, np.ndarray, int], tuple[np.ndarray, int]]
GemmEngine = Literal["exact-blas", "int8-gemm"] | MatrixUnit


@dataclass(frozen=True)
class ExecOptions:
    """How the integer executor evaluates the matrix unit's sums."""

    acc_bits: int = 32
    engine: Any = "int8-gemm"  # GemmEngine


@dataclass(frozen=True)
class VectorCost:
    """A non-matrix layer's work in the activation unit: ``passes`` lanes-wide vectors (its occupancy
    in cycles), element ops by kind, and the function/pooling labels the instruction listing shows."""

    function: str
    pooling: str
    passes: int
    activation_ops: int = 0
    pool_ops: int = 0
    requant_ops: int = 0


def vectors(elements: int, lanes: int) -> int:
    return -(-elements // lanes)


class Op:
    """Base of every op module's class; one registered instance per layer op name."""

    name: ClassVar[str]                       # the Layer.op this module owns ("" for lowering-only modules)
    onnx_types: ClassVar[tuple[str, ...]] = ()  # ONNX op types whose nodes this module lowers
    matrix: ClassVar[bool] = False            # its GEMM (Layer.gemm) is mapped onto the array by the tiler
    inherits_grid: ClassVar[bool] = False     # output values lie on input 0's grid: no parameters of its own
    in_place: ClassVar[bool] = False          # may overwrite an input nobody reads afterwards
    alias: ClassVar[bool] = False             # output is input 0 with another shape: no code, no bytes
    fusable: ClassVar[bool] = False           # a following Relu/Clip can be fused into its output
    applies_activation: ClassVar[bool] = False  # the op is its layer's clamp (exported as that clamp itself)
    accumulates: ClassVar[bool] = False       # sums on the matrix unit's accumulators (wraps and PE-level
                                              # cycles are counted per layer)
    schedules_itself: ClassVar[bool] = False  # emits its own instructions (``emit``) instead of the tiler's
                                              # matrix or vector mapping (recurrent steps, on-chip weights)

    def lower(self, ctx: "LowerContext", node: "onnx.NodeProto") -> None:
        raise NotImplementedError

    def reference(self, layer: "Layer", inputs: list[np.ndarray]) -> np.ndarray:
        """FP32 output before the fused activation."""
        raise NotImplementedError

    def quantize(self, layer: "Layer", in_qps: tuple["QParams", ...], y_qp: "QParams", quant: "QuantConfig",
                 input_mean: np.ndarray | None) -> "QLayer":
        raise NotImplementedError

    def execute(self, ql: "QLayer", inputs: list[np.ndarray], options: ExecOptions) -> tuple[np.ndarray, int]:
        """Integer output (on the output grid) and the number of wrapped accumulations."""
        raise NotImplementedError

    def vector_cost(self, layer: "Layer", in_elements: Sequence[int], out_elements: int, lanes: int,
                    int8: bool) -> VectorCost:
        raise NotImplementedError

    def emit(self, compiler: Any, index: int, layer: "Layer", out: Any, is_output: bool) -> None:
        """Append this layer's instructions to ``compiler.code`` (tpusim.mapping.tiler._Compiler) and its
        LayerMapping to ``compiler.mappings``; only for ops with ``schedules_itself``."""
        raise NotImplementedError

    def export(self, b: Any, layer: "Layer", inputs: list[str], weight: str | None, bias: str | None, y: str) -> None:
        """Emit the layer's own op (without its fused activation) as ONNX nodes on float tensors."""
        raise NotImplementedError
