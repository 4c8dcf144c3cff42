"""Counts x table -> energy: per-layer dynamic energy by component, and run totals with static power.

Every component is an event count from :class:`~tpusim.ir.LayerCounts` times one price from the
:class:`~tpusim.energy.table.EnergyTable`; the prices depend only on the hardware config and the
table, so they are worked out once per run (:func:`action_prices`). All energies are in pJ.

Where each count's energy goes:
- ``mac_slots - macs`` are idle PE-cycles (padding rows/columns of a tile, zeros of a packed
  depthwise block). Ungated (``energy.idle_pe_gated: false``) each costs its clock (``idle_pe``) and
  the activation and partial-sum register hops (``array_transport``) of a busy slot; gated, neither:
  only the ``macs`` slots move data, as only they compute.
- ``ub_read_bytes`` / ``ub_write_bytes`` are the array-side unified-buffer traffic; the unified
  buffer's side of host and spill transfers is charged to ``host`` and ``spill`` along with the
  PCIe link, so those components hold the whole cost of moving the data.
- ``spill_bytes`` counts both directions; half are unified-buffer reads (spill), half writes (refill).
- ``host_weight_bytes`` (host -> weight memory, an operand computed on chip made the array's weights)
  cost the PCIe link here; their write into the weight memory is counted in ``weight_dram_bytes`` and
  priced like a read (the table has one DRAM figure per technology).
- Per-channel requant multipliers/shifts are read from the unified buffer (assumption: the
  config has no separate parameter memory).
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

from tpusim.config import HardwareConfig
from tpusim.energy.table import BITS_PER_BYTE, EnergyTable
from tpusim.ir import LayerCounts, field_values

PJ_PER_J = 1e12
PARTIAL_SUM_BYTES = 4  # partial sums travel down the array as 32-bit values (int32 or FP32)
OPS_PER_MAC = 2  # TOPS counts a MAC as two operations [Jouppi et al., ISCA 2017]


@dataclass(frozen=True)
class LayerEnergy:
    """Dynamic energy of one layer (or a sum of layers), pJ per component."""

    mac: float = 0.0
    idle_pe: float = 0.0
    array_transport: float = 0.0  # activations hopping right and partial sums hopping down, per PE-cycle moved
    weight_dram: float = 0.0
    weight_fifo: float = 0.0
    weight_shift: float = 0.0
    unified_buffer: float = 0.0
    accumulators: float = 0.0
    activation_unit: float = 0.0  # requant + nonlinearity + pooling
    requant_scales: float = 0.0
    host: float = 0.0
    spill: float = 0.0

    @property
    def total(self) -> float:
        return math.fsum(field_values(self))

    def __add__(self, other: "LayerEnergy") -> "LayerEnergy":
        return LayerEnergy(*(a + b for a, b in zip(field_values(self), field_values(other))))

    def as_dict(self) -> dict[str, float]:
        return {**dict(zip((f.name for f in dataclasses.fields(self)), field_values(self))), "total": self.total}


@dataclass(frozen=True)
class ActionPrices:
    """pJ per counted event on one hardware config; SRAM prices at each memory's capacity."""

    mac: float
    idle_pe_cycle: float  # 0 when idle PEs are clock-gated
    array_hop_busy_slot: float  # one activation register hop + one partial-sum register hop, in a PE doing a MAC
    array_hop_idle_slot: float  # the same hops in a PE with no MAC to do; 0 when idle PEs are clock-gated
    weight_dram_byte: float
    weight_fifo_byte: float  # one write into the FIFO and one read out of it
    weight_shift_byte: float  # one register hop
    ub_read_byte: float
    ub_write_byte: float
    acc_read_byte: float
    acc_write_byte: float
    requant_op: float
    activation_op: float
    pool_op: float
    host_link_byte: float


def accumulator_bytes(cfg: HardwareConfig) -> float:
    return cfg.accumulators.entries * cfg.array.cols * cfg.accumulators.bits / BITS_PER_BYTE


def weight_fifo_bytes(cfg: HardwareConfig) -> int:
    return cfg.weight_fifo.depth_tiles * cfg.tile_bytes


def action_prices(cfg: HardwareConfig, table: EnergyTable) -> ActionPrices:
    ub, acc, fifo = cfg.unified_buffer.capacity_bytes, accumulator_bytes(cfg), weight_fifo_bytes(cfg)
    hop = table.register_pj_per_byte * (cfg.array.element_bytes + PARTIAL_SUM_BYTES)
    return ActionPrices(
        mac=table.mac_pj(cfg.array.datatype),
        idle_pe_cycle=0.0 if cfg.energy.idle_pe_gated else table.idle_pe_pj_per_cycle,
        array_hop_busy_slot=hop,
        array_hop_idle_slot=0.0 if cfg.energy.idle_pe_gated else hop,
        weight_dram_byte=table.dram_pj_per_byte(cfg.weight_memory.technology),
        weight_fifo_byte=table.sram_pj_per_byte(fifo, "write") + table.sram_pj_per_byte(fifo, "read"),
        weight_shift_byte=table.register_pj_per_byte,
        ub_read_byte=table.sram_pj_per_byte(ub, "read"),
        ub_write_byte=table.sram_pj_per_byte(ub, "write"),
        acc_read_byte=table.sram_pj_per_byte(acc, "read"),
        acc_write_byte=table.sram_pj_per_byte(acc, "write"),
        requant_op=table.requant_pj,
        activation_op=table.nonlinearity_pj,
        pool_op=table.pool_pj,
        host_link_byte=table.host_link_pj_per_byte,
    )


def priced_layer_energy(counts: LayerCounts, prices: ActionPrices) -> LayerEnergy:
    if counts.mac_slots < counts.macs:
        raise ValueError(f"counts have {counts.macs} MACs in only {counts.mac_slots} MAC slots")
    p = prices
    return LayerEnergy(
        mac=counts.macs * p.mac,
        idle_pe=(counts.mac_slots - counts.macs) * p.idle_pe_cycle,
        array_transport=counts.macs * p.array_hop_busy_slot + (counts.mac_slots - counts.macs) * p.array_hop_idle_slot,
        weight_dram=counts.weight_dram_bytes * p.weight_dram_byte,
        weight_fifo=counts.weight_fifo_bytes * p.weight_fifo_byte,
        weight_shift=counts.weight_shift_bytes * p.weight_shift_byte,
        unified_buffer=counts.ub_read_bytes * p.ub_read_byte + counts.ub_write_bytes * p.ub_write_byte,
        accumulators=counts.acc_read_bytes * p.acc_read_byte + counts.acc_write_bytes * p.acc_write_byte,
        activation_unit=(
            counts.requant_ops * p.requant_op + counts.activation_ops * p.activation_op + counts.pool_ops * p.pool_op
        ),
        requant_scales=counts.requant_scale_bytes * p.ub_read_byte,
        host=(
            counts.host_in_bytes * (p.host_link_byte + p.ub_write_byte)
            + counts.host_out_bytes * (p.host_link_byte + p.ub_read_byte)
            + counts.host_weight_bytes * p.host_link_byte
        ),
        spill=counts.spill_bytes * (p.host_link_byte + (p.ub_read_byte + p.ub_write_byte) / 2),
    )


def layer_energy(counts: LayerCounts, cfg: HardwareConfig, table: EnergyTable) -> LayerEnergy:
    return priced_layer_energy(counts, action_prices(cfg, table))


@dataclass(frozen=True)
class RunEnergy:
    """Energy of one run (one batch of inferences): per-layer dynamic energy, totals, efficiency."""

    layers: tuple[tuple[str, LayerEnergy], ...]
    dynamic: LayerEnergy  # per-component sums over the layers
    latency_s: float
    total_macs: int
    batch: int
    static_power_w: float

    @property
    def dynamic_pj(self) -> float:
        return self.dynamic.total

    @property
    def static_pj(self) -> float:
        return self.static_power_w * self.latency_s * PJ_PER_J

    @property
    def total_pj(self) -> float:
        return self.dynamic_pj + self.static_pj

    @property
    def dynamic_power_w(self) -> float:
        return self.dynamic_pj / PJ_PER_J / self.latency_s

    @property
    def total_power_w(self) -> float:
        return self.total_pj / PJ_PER_J / self.latency_s

    @property
    def dynamic_tops_per_w(self) -> float:
        return _per_joule(OPS_PER_MAC * self.total_macs / 1e12, self.dynamic_pj)

    @property
    def total_tops_per_w(self) -> float:
        return _per_joule(OPS_PER_MAC * self.total_macs / 1e12, self.total_pj)

    @property
    def dynamic_inferences_per_j(self) -> float:
        return _per_joule(self.batch, self.dynamic_pj)

    @property
    def total_inferences_per_j(self) -> float:
        return _per_joule(self.batch, self.total_pj)

    def summary(self) -> dict[str, float]:
        """Run totals and efficiency figures, dynamic-only and with static power."""
        names = (
            "latency_s", "total_macs", "batch", "static_power_w", "dynamic_pj", "static_pj", "total_pj",
            "dynamic_power_w", "total_power_w", "dynamic_tops_per_w", "total_tops_per_w",
            "dynamic_inferences_per_j", "total_inferences_per_j",
        )
        return {name: getattr(self, name) for name in names}


def _per_joule(quantity: float, energy_pj: float) -> float:
    """quantity / J; a run that spends no energy has unbounded efficiency."""
    return quantity / (energy_pj / PJ_PER_J) if energy_pj > 0 else math.inf


def run_energy(
    layer_counts: Sequence[tuple[str, LayerCounts]],
    latency_s: float,
    total_macs: int,
    batch: int,
    cfg: HardwareConfig,
    table: EnergyTable,
) -> RunEnergy:
    if not (latency_s > 0 and math.isfinite(latency_s)):
        raise ValueError(f"latency_s must be a positive finite number, got {latency_s!r}")
    if batch < 1 or total_macs < 0:
        raise ValueError(f"need batch >= 1 and total_macs >= 0, got batch={batch}, total_macs={total_macs}")
    prices = action_prices(cfg, table)
    layers = tuple((name, priced_layer_energy(counts, prices)) for name, counts in layer_counts)
    dynamic = sum((energy for _, energy in layers), LayerEnergy())
    return RunEnergy(
        layers=layers,
        dynamic=dynamic,
        latency_s=latency_s,
        total_macs=total_macs,
        batch=batch,
        static_power_w=cfg.energy.static_power_w,
    )
