"""Mapping: layers -> weight tiles -> a TPU-v1-like instruction stream (pure, no I/O)."""
from tpusim.mapping.isa import (
    Activate,
    Instruction,
    LayerMapping,
    MatrixMultiply,
    Program,
    ReadHostMemory,
    ReadWeights,
    ReadWeightsFromUb,
    Sync,
    UbRegion,
    WriteHostMemory,
    WriteWeightMemory,
)
from tpusim.mapping.tiler import compile_program

__all__ = [
    "Activate",
    "Instruction",
    "LayerMapping",
    "MatrixMultiply",
    "Program",
    "ReadHostMemory",
    "ReadWeights",
    "ReadWeightsFromUb",
    "Sync",
    "UbRegion",
    "WriteHostMemory",
    "WriteWeightMemory",
    "compile_program",
]
