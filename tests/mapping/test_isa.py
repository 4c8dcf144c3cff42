"""ISA: instructions are frozen, and the listing has one line per instruction with its operands."""
import dataclasses
from pathlib import Path

import numpy as np
import pytest

from tpusim.config import load_config
from tpusim.ir import Graph, Layer
from tpusim.mapping import MatrixMultiply, Sync, UbRegion, compile_program
from tpusim.mapping.isa import format_instruction, mnemonic

BASE = load_config(Path(__file__).resolve().parents[2] / "configs" / "tpu_v1.yaml")


def program():
    layer = Layer("fc", "gemm", ("x",), "fc", ((8, 300),), (8, 20), weight=np.broadcast_to(np.int8(0), (20, 300)))
    return compile_program(Graph("g", "x", (8, 300), ("fc",), (layer,)), BASE)


def test_listing_has_one_line_per_instruction():
    p = program()
    lines = p.listing().splitlines()
    assert len(lines) == len(p.instructions) == 8  # RHM, 2 x (RW, MMUL), ACT, WHM, SYNC
    assert [line.split()[1] for line in lines] == ["RHM", "RW", "MMUL", "RW", "MMUL", "ACT", "WHM", "SYNC"]
    assert all(line.endswith("; fc") for line in lines)


def test_instruction_format_names_every_operand():
    ins = MatrixMultiply(0, UbRegion(0x100, 64), 2048, 8, 44, 20, 880, 352, load_weights=True, accumulate=False)
    text = format_instruction(ins)
    assert text.startswith("MMUL ")
    assert "src=ub[0x100+64]" in text and "acc_addr=2048" in text and "load_weights=1" in text
    assert mnemonic(Sync(0)) == "SYNC"


def test_instructions_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        program().instructions[0].layer = 3
