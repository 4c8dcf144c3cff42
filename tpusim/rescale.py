"""The measured cost of requantization per layer, and what per-channel weights add over per-tensor.

Nothing here is an assumed percentage: the requantization cost is the activation unit's own counts
priced by the energy table, and the per-channel overhead is the difference between this run and the
same program compiled and simulated with per-tensor weights.
"""
from __future__ import annotations

from dataclasses import dataclass

from tpusim.config import HardwareConfig
from tpusim.energy.model import ActionPrices, RunEnergy
from tpusim.mapping import Activate, Program
from tpusim.sim import SimResult


@dataclass(frozen=True)
class LayerRescale:
    layer: str
    requant_ops: int           # int32 -> int8 rescales (an extra pass counts its second multiply too)
    scale_bytes: int           # multiplier/shift vectors fetched
    requant_unit_cycles: int   # activation-unit vector passes spent on this layer's requantization
    requant_pj: float          # requant ops + scale-vector fetches, priced by the energy table
    layer_cycles: int
    layer_pj: float
    overhead_cycles: int       # this run minus the same run with per-tensor weights
    overhead_pj: float

    @property
    def overhead_cycles_pct(self) -> float:
        return 100.0 * self.overhead_cycles / self.layer_cycles if self.layer_cycles else 0.0

    @property
    def overhead_pj_pct(self) -> float:
        return 100.0 * self.overhead_pj / self.layer_pj if self.layer_pj else 0.0

    @property
    def requant_pj_pct(self) -> float:
        return 100.0 * self.requant_pj / self.layer_pj if self.layer_pj else 0.0


def _requant_passes(program: Program) -> list[int]:
    passes = [0] * program.layers_per_pass
    for instruction in program.instructions:
        if isinstance(instruction, Activate) and instruction.requant != "none" and instruction.acc_rows:
            passes[program.graph_layer(instruction.layer)] += instruction.vector_passes
    return passes


def per_tensor_twin(config: HardwareConfig) -> HardwareConfig | None:
    """The config whose run is the baseline of the overhead, or None when this run is that baseline."""
    if config.array.datatype != "int8" or config.quant.weights == "per-tensor":
        return None
    return config.replace(**{"quant.weights": "per-tensor"})


def rescale_report(program: Program, sim: SimResult, energy: RunEnergy, prices: ActionPrices,
                   baseline: tuple[SimResult, RunEnergy] | None) -> list[LayerRescale]:
    passes = _requant_passes(program)
    base_sim, base_energy = baseline if baseline is not None else (sim, energy)
    rows = []
    for i, (timing, (name, layer_energy)) in enumerate(zip(sim.layers, energy.layers)):
        counts = timing.counts
        base_timing, (_, base_layer_energy) = base_sim.layers[i], base_energy.layers[i]
        rows.append(LayerRescale(
            layer=name,
            requant_ops=counts.requant_ops,
            scale_bytes=counts.requant_scale_bytes,
            requant_unit_cycles=passes[i],
            requant_pj=counts.requant_ops * prices.requant_op + counts.requant_scale_bytes * prices.ub_read_byte,
            layer_cycles=timing.cycles,
            layer_pj=layer_energy.total,
            overhead_cycles=timing.cycles - base_timing.cycles,
            overhead_pj=layer_energy.total - base_layer_energy.total,
        ))
    return rows
