"""The per-operation energy reference table, read once from a cited YAML file.

Accelergy style: the table is built once and every energy in the simulator is a count of
actions times one of its entries (see :mod:`tpusim.energy.model`). The file format is
documented in ``configs/energy/horowitz45.yaml``; a bad file raises :class:`ConfigError` as
one line naming the file and the key path.
"""
from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal


from tpusim.config import parse_yaml, read_file_bytes
from tpusim.errors import ConfigError

ARITHMETIC_OPS = (
    "int8_add",
    "int32_add",
    "int8_mul",
    "int32_mul",
    "fp16_add",
    "fp16_mul",
    "fp32_add",
    "fp32_mul",
    "int32_shift",
    "int8_compare",
    "int32_compare",
)
_TOP_KEYS = ("name", "process", "arithmetic", "sram", "dram", "register", "host_link", "idle_pe")
_SRAM_KEYS = ("anchors", "extrapolation_exponent", "write_to_read_ratio")
_ANCHOR_KEYS = ("capacity_bytes", "pj_per_64bit_read", "source")
BITS_PER_BYTE = 8
_ANCHOR_READ_BYTES = 8  # anchors are given per 64-bit read


@dataclass(frozen=True)
class SramAnchor:
    capacity_bytes: int
    pj_per_byte: float


@dataclass(frozen=True)
class EnergyTable:
    """Energies in pJ at one process point; every entry keeps its ``source`` string."""

    path: str
    name: str
    process: str
    arithmetic_pj: tuple[tuple[str, float], ...]
    sram_anchors: tuple[SramAnchor, ...]  # increasing capacity, non-decreasing energy
    sram_extrapolation_exponent: float
    sram_write_to_read_ratio: float
    dram_pj_per_bit: tuple[tuple[str, float], ...]  # technology -> pJ/bit
    register_pj_per_bit: float
    host_link_pj_per_bit: float
    idle_pe_pj_per_cycle: float
    sources: tuple[tuple[str, str], ...]  # key path -> source text

    def op_pj(self, op: str) -> float:
        return dict(self.arithmetic_pj)[op]

    def source(self, key_path: str) -> str:
        return dict(self.sources)[key_path]

    def mac_pj(self, datatype: str) -> float:
        """int8: 8-bit multiply into a 32-bit accumulate; fp32: fp32 multiply + fp32 add."""
        if datatype == "int8":
            return self.op_pj("int8_mul") + self.op_pj("int32_add")
        if datatype == "fp32":
            return self.op_pj("fp32_mul") + self.op_pj("fp32_add")
        raise ValueError(f"no MAC energy for datatype {datatype!r} (expected int8 or fp32)")

    @property
    def requant_pj(self) -> float:
        """int32 -> int8: fixed-point multiply, rounding add, right shift, clamp to two bounds."""
        return (
            self.op_pj("int32_mul")
            + self.op_pj("int32_add")
            + self.op_pj("int32_shift")
            + 2 * self.op_pj("int32_compare")
        )

    @property
    def nonlinearity_pj(self) -> float:
        """A ReLU-style clamp on an 8-bit output is one 8-bit compare."""
        return self.op_pj("int8_compare")

    @property
    def pool_pj(self) -> float:
        """A pooling op priced as a 32-bit add: exact for average pooling's int32 sum, an upper
        bound for max pooling's 8-bit compare (the counts do not tell them apart)."""
        return self.op_pj("int32_add")

    @property
    def register_pj_per_byte(self) -> float:
        return self.register_pj_per_bit * BITS_PER_BYTE

    @property
    def host_link_pj_per_byte(self) -> float:
        return self.host_link_pj_per_bit * BITS_PER_BYTE

    def sram_pj_per_byte(self, capacity_bytes: float, access: Literal["read", "write"] = "read") -> float:
        """Energy per byte accessed in an SRAM of ``capacity_bytes``, by the rule in the table file:
        log-log interpolation between anchors, power-law extrapolation outside them."""
        if capacity_bytes <= 0:
            raise ValueError(f"SRAM capacity must be positive, got {capacity_bytes}")
        anchors = self.sram_anchors
        i = bisect.bisect_right([a.capacity_bytes for a in anchors], capacity_bytes) - 1
        if i < 0 or i == len(anchors) - 1:
            base = anchors[max(i, 0)]
            exponent = self.sram_extrapolation_exponent
        else:
            base, upper = anchors[i], anchors[i + 1]
            exponent = math.log(upper.pj_per_byte / base.pj_per_byte) / math.log(
                upper.capacity_bytes / base.capacity_bytes
            )
        read = base.pj_per_byte * (capacity_bytes / base.capacity_bytes) ** exponent
        if access == "read":
            return read
        if access == "write":
            return read * self.sram_write_to_read_ratio
        raise ValueError(f"SRAM access must be 'read' or 'write', got {access!r}")

    def dram_pj_per_byte(self, technology: str) -> float:
        per_bit = dict(self.dram_pj_per_bit)
        if technology not in per_bit:
            raise ConfigError(
                f"{self.path}: dram.{technology}: missing (the config's weight_memory.technology "
                f"names it; this table has {', '.join(per_bit)})"
            )
        return per_bit[technology] * BITS_PER_BYTE


# (file, its bytes) -> the table built from them. A run reads its table four times (the config check, the
# run, the per-tensor twin run, the rescale prices), a YAML parse each time; the bytes are read every time,
# so an edited file is read afresh. Tables are frozen: one object can serve every caller.
_BUILT: dict[tuple[str, bytes], EnergyTable] = {}
_BUILT_KEPT = 8


def load_energy_table(path: str | Path) -> EnergyTable:
    """Read, validate and build the table named by a config's ``energy.table``."""
    path = Path(path)
    where = str(path)
    raw = read_file_bytes(path, "energy table file")
    table = _BUILT.get((where, raw))
    if table is None:
        table = _build_table(parse_yaml(raw, path, "energy table file"), where)
        if len(_BUILT) >= _BUILT_KEPT:
            del _BUILT[next(iter(_BUILT))]
        _BUILT[(where, raw)] = table
    return table


class _Reader:
    """Checks one file's YAML against the table format, collecting each entry's source."""

    def __init__(self, where: str) -> None:
        self.where = where
        self.sources: list[tuple[str, str]] = []

    def fail(self, path: str, problem: str) -> ConfigError:
        return ConfigError(f"{self.where}: {path}: {problem}")

    def mapping(self, value: Any, keys: tuple[str, ...] | None, path: str) -> dict:
        """A mapping; with ``keys``, exactly those keys (unknown ones reported first)."""
        if not isinstance(value, dict):
            raise self.fail(path or "top level", f"expected a mapping, got {type(value).__name__}")
        if keys is not None:
            for key in value:
                if key not in keys:
                    raise self.fail(_join(path, key), f"unknown key (expected one of {', '.join(keys)})")
            for key in keys:
                if key not in value:
                    raise self.fail(_join(path, key), "missing key")
        return value

    def text(self, value: Any, path: str) -> str:
        if not isinstance(value, str) or not value.strip():
            raise self.fail(path, f"expected a non-empty string, got {value!r}")
        return value

    def positive(self, value: Any, path: str) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.fail(path, f"expected a number, got {value!r}")
        if not math.isfinite(value) or value <= 0:
            raise self.fail(path, f"must be a finite number > 0, got {value!r}")
        return float(value)

    def cited(self, value: Any, unit: str, path: str) -> float:
        """``{<unit>: number > 0, source: text}``: a number and where it comes from."""
        entry = self.mapping(value, (unit, "source"), path)
        self.sources.append((path, self.text(entry["source"], _join(path, "source"))))
        return self.positive(entry[unit], _join(path, unit))

    def anchors(self, value: Any, path: str) -> tuple[SramAnchor, ...]:
        if not isinstance(value, list) or not value:
            raise self.fail(path, "expected a non-empty list of SRAM anchors")
        anchors: list[SramAnchor] = []
        for i, item in enumerate(value):
            item_path = f"{path}[{i}]"
            entry = self.mapping(item, _ANCHOR_KEYS, item_path)
            capacity = entry["capacity_bytes"]
            if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity <= 0:
                raise self.fail(f"{item_path}.capacity_bytes", f"expected a positive integer, got {capacity!r}")
            per_read = self.positive(entry["pj_per_64bit_read"], f"{item_path}.pj_per_64bit_read")
            self.sources.append((item_path, self.text(entry["source"], f"{item_path}.source")))
            anchor = SramAnchor(capacity, per_read / _ANCHOR_READ_BYTES)
            if anchors and capacity <= anchors[-1].capacity_bytes:
                raise self.fail(f"{item_path}.capacity_bytes", "anchors must be in increasing capacity")
            if anchors and anchor.pj_per_byte < anchors[-1].pj_per_byte:
                raise self.fail(
                    f"{item_path}.pj_per_64bit_read",
                    "must be >= the previous anchor's (a larger SRAM does not cost less per access)",
                )
            anchors.append(anchor)
        return tuple(anchors)


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


def _build_table(data: Any, where: str) -> EnergyTable:
    read = _Reader(where)
    top = read.mapping(data, _TOP_KEYS, "")
    arithmetic = read.mapping(top["arithmetic"], ARITHMETIC_OPS, "arithmetic")
    arithmetic_pj = tuple((op, read.cited(arithmetic[op], "pj", f"arithmetic.{op}")) for op in ARITHMETIC_OPS)
    sram = read.mapping(top["sram"], _SRAM_KEYS, "sram")
    anchors = read.anchors(sram["anchors"], "sram.anchors")
    exponent = read.cited(sram["extrapolation_exponent"], "value", "sram.extrapolation_exponent")
    write_ratio = read.cited(sram["write_to_read_ratio"], "value", "sram.write_to_read_ratio")
    dram = read.mapping(top["dram"], None, "dram")
    if not dram:
        raise read.fail("dram", "expected at least one memory technology")
    dram_pj_per_bit = tuple(
        (read.text(tech, "dram"), read.cited(entry, "pj_per_bit", f"dram.{tech}")) for tech, entry in dram.items()
    )
    return EnergyTable(
        path=where,
        name=read.text(top["name"], "name"),
        process=read.text(top["process"], "process"),
        arithmetic_pj=arithmetic_pj,
        sram_anchors=anchors,
        sram_extrapolation_exponent=exponent,
        sram_write_to_read_ratio=write_ratio,
        dram_pj_per_bit=dram_pj_per_bit,
        register_pj_per_bit=read.cited(top["register"], "pj_per_bit", "register"),
        host_link_pj_per_bit=read.cited(top["host_link"], "pj_per_bit", "host_link"),
        idle_pe_pj_per_cycle=read.cited(top["idle_pe"], "pj_per_cycle", "idle_pe"),
        sources=tuple(read.sources),
    )
