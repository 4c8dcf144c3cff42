"""The per-layer table (`layers.csv`) and run summary (`summary.json`) of `tpusim run`.

Column and key names are a contract that users' scripts rely on: add, never rename.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from tpusim import ops
from tpusim.config import HardwareConfig
from tpusim.energy.model import LayerEnergy, RunEnergy
from tpusim.ir import CycleBreakdown, Graph
from tpusim.quant.stage import QuantOutcome
from tpusim.rescale import LayerRescale
from tpusim.sim import SimResult

TIMING_COLUMNS = (
    "layer", "op", "M", "K", "N", "groups", "macs", "cycles", "utilization", "dram_bytes", "ub_bytes", "acc_bytes",
    "active_cycles", "weight_stall_cycles", "weight_shift_cycles", "non_matrix_cycles",
    "useful_mac_cycles", "unused_mac_cycles", "raw_stall_cycles", "input_stall_cycles",
    "spill_bytes", "requant_ops", "requant_scale_bytes", "steps",
)
ENERGY_COLUMNS = ("energy_pj",)
ENERGY_COMPONENTS = tuple(f.name for f in dataclasses.fields(LayerEnergy))
ENERGY_CSV_COLUMNS = ("layer",) + tuple(f"{c}_pj" for c in ENERGY_COMPONENTS) + ("total_pj",)
RESCALE_COLUMNS = (
    "layer", "requant_ops", "scale_bytes", "requant_unit_cycles", "requant_pj", "requant_pct_of_layer_energy",
    "layer_cycles", "layer_pj", "overhead_cycles", "overhead_pct_of_layer_cycles", "overhead_pj",
    "overhead_pct_of_layer_energy",
)
QUANT_COLUMNS = ("sqnr_db", "wrapped_accumulations")
PE_COLUMNS = ("pe_array_cycles",)


def breakdown_dict(b: CycleBreakdown) -> dict[str, int]:
    return {
        "active_cycles": b.active, "weight_stall_cycles": b.weight_stall, "weight_shift_cycles": b.weight_shift,
        "non_matrix_cycles": b.non_matrix, "useful_mac_cycles": b.useful_mac, "unused_mac_cycles": b.unused_mac,
        "raw_stall_cycles": b.raw_stall, "input_stall_cycles": b.input_stall,
    }


def _steps(timing, batch: int) -> int | str:
    """Time steps of a recurrent layer (its GEMM's M is steps x batch, all steps folded into its row); "" else."""
    if timing.gemm is None or not getattr(ops.op(timing.op), "recurrent", False):
        return ""
    return timing.gemm.m // max(1, batch)


def layer_rows(sim: SimResult, energy: RunEnergy | None = None, quant: QuantOutcome | None = None) -> list[dict[str, Any]]:
    rows = []
    energies = dict(energy.layers) if energy is not None else {}
    for timing in sim.layers:
        c = timing.counts
        gemm = timing.gemm
        row = {
            "layer": timing.name, "op": timing.op,
            "M": gemm.m if gemm else "", "K": gemm.k if gemm else "", "N": gemm.n if gemm else "",
            "groups": gemm.groups if gemm else "",
            "macs": timing.macs, "cycles": timing.cycles, "utilization": round(timing.utilization, 6),
            "dram_bytes": c.weight_dram_bytes, "ub_bytes": c.ub_read_bytes + c.ub_write_bytes,
            "acc_bytes": c.acc_read_bytes + c.acc_write_bytes,
            **breakdown_dict(timing.breakdown),
            "spill_bytes": c.spill_bytes, "requant_ops": c.requant_ops, "requant_scale_bytes": c.requant_scale_bytes,
            "steps": _steps(timing, sim.batch),
        }
        if timing.name in energies:
            row["energy_pj"] = round(energies[timing.name].total, 3)
        if quant is not None:
            sqnr = quant.fidelity.layer_sqnr_db.get(timing.name)
            row["sqnr_db"] = "" if sqnr is None else round(sqnr, 3)
            row["wrapped_accumulations"] = quant.fidelity.wrapped.get(timing.name, "")
            if quant.pe_array_cycles is not None:
                row["pe_array_cycles"] = quant.pe_array_cycles.get(timing.name, "")
        rows.append(row)
    return rows


def energy_rows(energy: RunEnergy) -> list[dict[str, Any]]:
    rows = []
    for name, layer in energy.layers:
        row: dict[str, Any] = {"layer": name}
        row.update({f"{c}_pj": round(getattr(layer, c), 3) for c in ENERGY_COMPONENTS})
        row["total_pj"] = round(layer.total, 3)
        rows.append(row)
    return rows


def rescale_rows(rescale: list[LayerRescale]) -> list[dict[str, Any]]:
    return [{
        "layer": r.layer, "requant_ops": r.requant_ops, "scale_bytes": r.scale_bytes,
        "requant_unit_cycles": r.requant_unit_cycles, "requant_pj": round(r.requant_pj, 3),
        "requant_pct_of_layer_energy": round(r.requant_pj_pct, 4), "layer_cycles": r.layer_cycles,
        "layer_pj": round(r.layer_pj, 3), "overhead_cycles": r.overhead_cycles,
        "overhead_pct_of_layer_cycles": round(r.overhead_cycles_pct, 4), "overhead_pj": round(r.overhead_pj, 3),
        "overhead_pct_of_layer_energy": round(r.overhead_pj_pct, 4),
    } for r in rescale]


def rescale_summary(rescale: list[LayerRescale], sim: SimResult, energy: RunEnergy) -> dict[str, Any]:
    requant_pj = sum(r.requant_pj for r in rescale)
    overhead_cycles = sum(r.overhead_cycles for r in rescale)
    overhead_pj = sum(r.overhead_pj for r in rescale)
    return {
        "requant_ops": sum(r.requant_ops for r in rescale),
        "scale_bytes": sum(r.scale_bytes for r in rescale),
        "requant_unit_cycles": sum(r.requant_unit_cycles for r in rescale),
        "requant_pj": requant_pj,
        "requant_pct_of_dynamic_energy": 100.0 * requant_pj / energy.dynamic_pj if energy.dynamic_pj else 0.0,
        "per_channel_overhead_cycles": overhead_cycles,
        "per_channel_overhead_pct_of_latency": 100.0 * overhead_cycles / sim.total_cycles if sim.total_cycles else 0.0,
        "per_channel_overhead_pj": overhead_pj,
        "per_channel_overhead_pct_of_dynamic_energy": 100.0 * overhead_pj / energy.dynamic_pj if energy.dynamic_pj else 0.0,
    }


def columns(quant: QuantOutcome | None) -> tuple[str, ...]:
    extra = () if quant is None else QUANT_COLUMNS + (PE_COLUMNS if quant.pe_array_cycles is not None else ())
    return TIMING_COLUMNS + ENERGY_COLUMNS + extra


def quant_summary(quant: QuantOutcome, cfg: HardwareConfig) -> dict[str, Any]:
    f = quant.fidelity
    finite = [v for v in f.layer_sqnr_db.values() if v != float("inf")]
    from_model = quant.qgraph.graph.model_grids is not None
    weights = cfg.quant.weights
    if from_model:
        per_channel = any(ql.weight_qparams is not None and ql.weight_qparams.axis is not None for ql in quant.qgraph.layers)
        weights = "per-channel" if per_channel else "per-tensor"
    return {
        "calibration": {
            "method": "from the model" if from_model else cfg.quant.calibration, "weights": weights,
            "activations": "from the model" if from_model else cfg.quant.activations,
            "quantization_source": "model" if from_model else "calibration",
            "source": quant.calibration.source, "synthetic": quant.calibration.synthetic,
            "samples": len(quant.calibration.inputs), "cross_layer_equalization": cfg.quant.cross_layer_equalization,
            "bias_correction": cfg.quant.bias_correction,
            "warnings": list(quant.calibration.warnings),
        },
        "fidelity": {
            "evaluated_on": quant.evaluation_source, "samples": f.samples, "held_out": quant.held_out,
            "top1_agreement": f.top1_agreement, "top5_agreement": f.top5_agreement,
            "cosine": f.cosine_similarity, "max_abs_error": f.max_abs_error,
            "output_sqnr_db": f.layer_sqnr_db[quant.graph.layers[-1].name],
            "min_layer_sqnr_db": min(finite) if finite else float("inf"),
            "wrapped_accumulations": sum(f.wrapped.values()),
        },
    }


def summary(graph: Graph, sim: SimResult, cfg: HardwareConfig, energy: RunEnergy | None = None,
            quant: QuantOutcome | None = None, rescale: list[LayerRescale] | None = None) -> dict[str, Any]:
    result: dict[str, Any] = {
        "model": graph.name,
        "config": sim.config_name,
        "batch": sim.batch,
        "sub_batch": sim.sub_batch,
        "macs": sim.macs,
        "total_cycles": sim.total_cycles,
        "latency_s": sim.latency_s,
        "tops": sim.tops,
        "inferences_per_s": sim.inferences_per_s,
        "utilization": sim.macs / (sim.total_cycles * cfg.array.rows * cfg.array.cols) if sim.total_cycles else 0.0,
        "breakdown": {"total_cycles": sim.breakdown.total, **breakdown_dict(sim.breakdown)},
    }
    if energy is not None:
        result["energy"] = energy.summary()
    if rescale is not None and energy is not None:
        result["rescale"] = rescale_summary(rescale, sim, energy)
    if quant is not None:
        result.update(quant_summary(quant, cfg))
    return result
