"""Numba kernels of the matrix unit, each with a naive numpy oracle.

- gemm: int8 x int8 GEMM into a wrapping acc_bits accumulator (functional model).
- systolic: the cycle-stepped weight-stationary PE array (values and cycles; ground truth).
"""
from tpusim.kernels.gemm import GemmResult, int8_gemm, int8_gemm_reference
from tpusim.kernels.systolic import (
    ArrayRun,
    PeGemmResult,
    pe_array_reference,
    pe_array_run,
    pe_gemm,
    stream_starts,
    tile_sequence_cycles,
)

__all__ = [
    "ArrayRun",
    "GemmResult",
    "PeGemmResult",
    "int8_gemm",
    "int8_gemm_reference",
    "pe_array_reference",
    "pe_array_run",
    "pe_gemm",
    "stream_starts",
    "tile_sequence_cycles",
]
