"""A TPU-v1-like instruction set (Jouppi et al. 2017, sec. 2): each instruction is a frozen dataclass.

Addresses are byte addresses in the unified buffer (``ub_*``), the host memory (``host_addr``) and the
weight memory (``dram_addr``); accumulator addresses (``acc_addr``) count accumulator rows. Every
instruction names the graph layer it belongs to (``layer``, an index into ``Program.layer_names``) so
that the engine can charge its cycles and bytes to that layer. Operands also carry the few derived
quantities the engine needs for timing and counting (rows streamed, vector passes, element ops), so
the engine never has to know what a convolution or a pooling window is.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Literal, Union

from tpusim.ir import GemmShape

RequantMode = Literal["none", "per-tensor", "per-channel"]


@dataclass(frozen=True)
class UbRegion:
    """A contiguous byte range of the unified buffer; dependences between instructions are on these."""

    addr: int
    nbytes: int

    def __str__(self) -> str:
        return f"ub[{self.addr:#x}+{self.nbytes}]"


@dataclass(frozen=True)
class ReadHostMemory:
    """PCIe host -> unified buffer. ``spill`` marks a refill of an activation that did not fit."""

    layer: int
    host_addr: int
    dst: UbRegion
    spill: bool


@dataclass(frozen=True)
class WriteHostMemory:
    """Unified buffer -> PCIe host. ``spill`` marks an activation evicted because it did not fit."""

    layer: int
    src: UbRegion
    host_addr: int
    spill: bool


@dataclass(frozen=True)
class ReadWeights:
    """Weight memory -> weight FIFO: one tile (``rows`` x ``cols`` of real weights, zero-padded on chip)."""

    layer: int
    dram_addr: int
    nbytes: int
    rows: int
    cols: int


@dataclass(frozen=True)
class WriteWeightMemory:
    """PCIe host -> weight memory: an operand computed on the chip (attention's K or V), back from the
    host, written where ``ReadWeights`` then fetches it as tiles. TPU v1's weight memory is filled only
    by the host (Jouppi et al. 2017, sec. 2), so this round trip is how such an operand becomes the
    array's stationary weights."""

    layer: int
    host_addr: int
    dram_addr: int
    nbytes: int


@dataclass(frozen=True)
class ReadWeightsFromUb:
    """Unified buffer -> weight FIFO over a direct path (later TPUs have one; TPU v1 does not): one tile
    (``rows`` x ``cols``) of an operand computed on the chip, read from ``src``."""

    layer: int
    src: UbRegion
    nbytes: int
    rows: int
    cols: int


@dataclass(frozen=True)
class MatrixMultiply:
    """Stream ``m_rows`` input vectors from ``src`` through the array into accumulator rows.

    ``load_weights``: pop the next tile from the weight FIFO and shift it in before streaming (into
    the shadow registers while the previous tile streams, or, without weight double buffering, after
    the array has drained); otherwise keep the weights in the array. ``accumulate``: add to the
    accumulators instead of overwriting them (K folds after the first). ``k_rows`` x ``n_cols`` is
    the used part of the tile; ``macs_per_row`` the useful MACs per streamed vector (smaller than
    ``k_rows * n_cols`` when groups are packed block-diagonally). ``input_bytes`` is what the input
    path reads from the unified buffer (im2col is done on the fly, so overlapping windows are re-read).
    """

    layer: int
    src: UbRegion
    acc_addr: int
    m_rows: int
    k_rows: int
    n_cols: int
    macs_per_row: int
    input_bytes: int
    load_weights: bool
    accumulate: bool


@dataclass(frozen=True)
class Activate:
    """Activation unit: read accumulators and/or unified-buffer operands, apply the function, pooling
    and requantization, write ``dst``.

    ``acc_rows`` > 0 means the source is accumulator rows ``[acc_addr, acc_addr + acc_rows)``
    (``cols`` wide). ``vector_passes`` is the number of ``lanes``-wide vectors the unit processes
    (its occupancy in cycles); ``out_bytes`` is what it writes (``dst`` is the address range it spans).
    ``extra_requant_pass``: per-channel requantization without per-lane multipliers; the unit writes the
    accumulator rows back scaled by the shared multiplier and reads them again to apply each channel's.
    """

    layer: int
    function: str
    pooling: str
    requant: RequantMode
    acc_addr: int
    acc_rows: int
    cols: int
    sources: tuple[UbRegion, ...]
    dst: UbRegion
    out_bytes: int
    vector_passes: int
    activation_ops: int
    pool_ops: int
    requant_ops: int
    requant_scale_bytes: int
    extra_requant_pass: bool = False


@dataclass(frozen=True)
class Sync:
    """Wait until every unit has finished every earlier instruction (end of the inference)."""

    layer: int


Instruction = Union[ReadHostMemory, WriteHostMemory, ReadWeights, WriteWeightMemory, ReadWeightsFromUb,
                    MatrixMultiply, Activate, Sync]

_MNEMONICS = {
    ReadHostMemory: "RHM",
    WriteHostMemory: "WHM",
    ReadWeights: "RW",
    WriteWeightMemory: "WWM",
    ReadWeightsFromUb: "RWUB",
    MatrixMultiply: "MMUL",
    Activate: "ACT",
    Sync: "SYNC",
}


def mnemonic(instruction: Instruction) -> str:
    return _MNEMONICS[type(instruction)]


def format_instruction(instruction: Instruction) -> str:
    operands = []
    for f in fields(instruction):
        if f.name == "layer":
            continue
        value = getattr(instruction, f.name)
        if isinstance(value, tuple):
            value = "(" + ",".join(str(v) for v in value) + ")"
        elif isinstance(value, bool):
            value = int(value)
        operands.append(f"{f.name}={value}")
    return f"{mnemonic(instruction):<5} " + " ".join(operands)


@dataclass(frozen=True)
class LayerMapping:
    """How one layer was mapped: tile counts and the fraction of the array's MAC slots doing real work
    while streaming (``mapping_utilization``; 1.0 for a layer whose K and N fill every tile)."""

    name: str
    op: str
    gemm: GemmShape | None
    column_tiles: int
    k_folds: int
    m_chunks: int
    groups_per_tile: int
    weight_tiles: int
    spilled: bool
    mapping_utilization: float


@dataclass(frozen=True, eq=False)
class Program:
    """An instruction stream for one inference, compiled for one hardware configuration.

    A batch too large for the unified buffer may run as several passes over sub-batches
    (``pass_batches``, in order): the graph's layers then appear once per pass in ``layer_names``,
    ``layer_ops`` and ``mappings``, pass ``p``'s copy of graph layer ``j`` at index
    ``p * layers_per_pass + j``.
    """

    graph_name: str
    config_name: str
    rows: int
    cols: int
    layer_names: tuple[str, ...]
    layer_ops: tuple[str, ...]
    mappings: tuple[LayerMapping, ...]
    instructions: tuple[Instruction, ...]
    pass_batches: tuple[int, ...]

    @property
    def passes(self) -> int:
        return len(self.pass_batches)

    @property
    def sub_batch(self) -> int:
        """Inputs per pass (the last pass may hold fewer)."""
        return self.pass_batches[0]

    @property
    def layers_per_pass(self) -> int:
        return len(self.layer_names) // self.passes

    def graph_layer(self, index: int) -> int:
        """The graph layer that program layer ``index`` (an instruction's ``layer``) is a pass of."""
        return index % self.layers_per_pass

    def listing(self) -> str:
        """One line per instruction: index, mnemonic, operands, and the layer (and pass) it belongs to."""
        width = len(str(max(len(self.instructions) - 1, 0)))
        lines = []
        for i, ins in enumerate(self.instructions):
            where = self.layer_names[ins.layer]
            if self.passes > 1:
                where += f" (pass {ins.layer // self.layers_per_pass + 1}/{self.passes})"
            lines.append(f"{i:>{width}} {format_instruction(ins)}  ; {where}")
        return "\n".join(lines)
