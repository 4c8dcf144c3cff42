"""The per-layer table (`layers.csv`) and run summary (`summary.json`) of `tpusim run`.

Column and key names are a contract that users' scripts rely on: add, never rename.
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from tpusim import ops
from tpusim.energy.model import LayerEnergy, RunEnergy
from tpusim.ir import CycleBreakdown, Graph
from tpusim.report.tables import (format_agreement, format_duration, format_energy, format_percent, format_rate,
                                  format_table)

if TYPE_CHECKING:  # named in annotations only: a run without quantization never imports the quantizer
    from tpusim.config import HardwareConfig
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
UB_COLUMNS = ("ub_stall_cycles",)  # added after every earlier column, so that none moves

# An integer column's value for a layer it does not apply to (M, K, N and groups of a layer with no GEMM,
# steps of a layer that is not recurrent, wrapped_accumulations and pe_array_cycles of a layer the
# accumulators or the PE array never saw). Zero rather than a blank cell: a blank turns the whole column
# into floats in pandas, and zero is true of such a layer (its macs are 0 too, nothing wrapped, no PE
# cycle was stepped). sqnr_db stays blank where there is none: it is a float column either way.
NOT_APPLICABLE = 0


def breakdown_dict(b: CycleBreakdown) -> dict[str, int]:
    return {
        "active_cycles": b.active, "weight_stall_cycles": b.weight_stall, "weight_shift_cycles": b.weight_shift,
        "non_matrix_cycles": b.non_matrix, "useful_mac_cycles": b.useful_mac, "unused_mac_cycles": b.unused_mac,
        "raw_stall_cycles": b.raw_stall, "input_stall_cycles": b.input_stall, "ub_stall_cycles": b.ub_stall,
    }


def _steps(timing, batch: int) -> int:
    """Time steps of a recurrent layer (its GEMM's M is steps x batch, all steps folded into its row); 0 else."""
    if timing.gemm is None or not getattr(ops.op(timing.op), "recurrent", False):
        return NOT_APPLICABLE
    return timing.gemm.m // max(1, batch)


def layer_rows(sim: SimResult, energy: RunEnergy | None = None, quant: QuantOutcome | None = None) -> list[dict[str, Any]]:
    rows = []
    energies = dict(energy.layers) if energy is not None else {}
    for timing in sim.layers:
        c = timing.counts
        gemm = timing.gemm
        row = {
            "layer": timing.name, "op": timing.op,
            "M": gemm.m if gemm else NOT_APPLICABLE, "K": gemm.k if gemm else NOT_APPLICABLE,
            "N": gemm.n if gemm else NOT_APPLICABLE, "groups": gemm.groups if gemm else NOT_APPLICABLE,
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
            row["wrapped_accumulations"] = quant.fidelity.wrapped.get(timing.name, NOT_APPLICABLE)
            if quant.pe_array_cycles is not None:
                row["pe_array_cycles"] = quant.pe_array_cycles.get(timing.name, NOT_APPLICABLE)
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
    return TIMING_COLUMNS + ENERGY_COLUMNS + extra + UB_COLUMNS


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
            "agreement_rows": f.agreement_rows,
            "top1_agreeing_rows": round(f.top1_agreement * f.agreement_rows),
            "top5_agreeing_rows": round(f.top5_agreement * f.agreement_rows),
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
        result["energy_per_inference_uj"] = {
            "total": energy.total_pj / 1e6 / sim.batch, "dynamic": energy.dynamic_pj / 1e6 / sim.batch,
            "static": energy.static_pj / 1e6 / sim.batch,
        }
    if rescale is not None and energy is not None:
        result["rescale"] = rescale_summary(rescale, sim, energy)
    if quant is not None:
        result.update(quant_summary(quant, cfg))
    return result


# ------------------------------------------------------------------------------------------ terminal

TERMINAL_WIDTH = 100
TERMINAL_COLUMNS = ("layer", "op", "M", "K", "N", "cycles", "utilization", "active_cycles", "weight_cycles",
                    "non_matrix_cycles")
TERMINAL_HEADERS = {"utilization": "util %", "active_cycles": "active", "weight_cycles": "weights",
                    "non_matrix_cycles": "other"}
TERMINAL_LEGEND = "cycles = active + weights (weight stall and shift) + other (non-matrix); all columns: layers.csv"


def terminal_table(rows: list[dict[str, Any]], max_rows: int | None = 40) -> str:
    """The run's per-layer table in at most 100 columns: a chosen few of layers.csv's columns, the weight
    stall and shift cycles added up, long layer names cut in the middle."""
    shown = [{
        "layer": r["layer"], "op": r["op"],
        **{c: r[c] if r["M"] != NOT_APPLICABLE else "" for c in ("M", "K", "N")},  # a blank: no GEMM here
        "cycles": r["cycles"], "utilization": f"{100.0 * r['utilization']:.1f}", "active_cycles": r["active_cycles"],
        "weight_cycles": r["weight_stall_cycles"] + r["weight_shift_cycles"], "non_matrix_cycles": r["non_matrix_cycles"],
    } for r in rows]
    table = format_table(TERMINAL_COLUMNS, shown, max_rows=max_rows, left=("layer", "op"), headers=TERMINAL_HEADERS,
                         width=TERMINAL_WIDTH, shrink="layer")
    return f"{table}\n{TERMINAL_LEGEND}"


def terminal_summary(model: str, layers: int, s: dict[str, Any]) -> list[str]:
    """The lines under the run's table: size, speed, energy and (when quantized) int8 fidelity, with the
    number of samples agreement was counted over."""
    lines = [
        f"{model}: {layers:,} layers, {s['macs']:,} MACs, batch {s['batch']:,}",
        f"{s['total_cycles']:,} cycles = {format_duration(s['latency_s'])}; {s['tops']:.4g} TOPS; "
        f"{format_rate(s['inferences_per_s'])} inferences/s; utilization {format_percent(s['utilization'])}",
    ]
    if "energy" in s:
        e, per = s["energy"], s["energy_per_inference_uj"]
        lines.append(f"energy {format_energy(per['total'] * 1e6)} per inference ({format_energy(per['dynamic'] * 1e6)} "
                     f"dynamic); {e['total_power_w']:.3g} W; {e['total_tops_per_w']:.3g} TOPS/W "
                     f"({e['dynamic_tops_per_w']:.3g} dynamic only)")
    if "fidelity" in s:
        f, c = s["fidelity"], s["calibration"]
        scheme = ("quantization from the model" if c["quantization_source"] == "model"
                  else f"{c['weights']} weights, {c['method']} calibration")
        rows = f["agreement_rows"]
        # a model with an output per position (token) agrees or not per position, not per sample
        basis = "" if rows == f["samples"] else f"; {rows:,} output rows, {rows // f['samples']:,} per sample"
        lines += [
            f"int8 ({scheme}) vs FP32:",
            f"  top-1 agreement {format_agreement(f['top1_agreement'], rows)}, "
            f"top-5 {format_agreement(f['top5_agreement'], rows)}, cosine {f['cosine']:.4f}, "
            f"output SQNR {f['output_sqnr_db']:.1f} dB",
            f"  on {f['evaluated_on']}{basis}",
        ]
    return lines
