"""`tpusim compare`: the grid of weight granularities x calibration methods (and an FP32 baseline), every
cell a measurement of this run: output agreement with FP32, perf/W, latency, rescale overhead.

`tpusim --help` imports this module to build its parser: the simulator itself is imported where it runs.
"""
from __future__ import annotations

import argparse
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from tpusim.arguments import positive_int
from tpusim.errors import ConfigError, TpusimError, TpusimWarning
from tpusim.progress import Progress
from tpusim.report.tables import format_agreement, format_table

if TYPE_CHECKING:
    from tpusim import api

WEIGHTS = ("per-tensor", "per-channel")
CALIBRATIONS = ("minmax", "percentile", "entropy", "mse")

COLUMNS = (
    "weights", "calibration", "top1_agreement", "top5_agreement", "output_sqnr_db", "cosine", "latency_s",
    "latency_vs_per_tensor_pct", "tops", "total_tops_per_w", "dynamic_tops_per_w", "perf_per_w_gain_vs_fp32",
    "dynamic_perf_per_w_gain_vs_fp32", "latency_gain_vs_fp32", "energy_per_inference_uj",
    "requant_pct_of_dynamic_energy", "per_channel_overhead_pct_of_latency",
    "per_channel_overhead_pct_of_dynamic_energy", "calibration_data", "batch",
    # What the row is (the baseline or a quantized grid point) and what its agreement was counted over.
    "row", "datatype", "config", "eval_samples", "agreement_rows", "top1_agreeing_rows", "top5_agreeing_rows",
    "evaluated_on",
    "synthetic_calibration",
)


@dataclass(frozen=True)
class CompareRequest:
    config: Path
    model: str
    weights: tuple[str, ...] = WEIGHTS
    calibrations: tuple[str, ...] = ("percentile", "mse")
    baseline: str | None = "fp32"  # "fp32": this config with FP32 MACs; a path to a baseline config; None or "none"
    batch: int | None = None  # None: the model's own batch (or --input-shape's N), else 1
    overrides: tuple[tuple[str, Any], ...] = ()
    calib_data: str | None = None
    # 16: top-1 agreement moves in 6.25 % steps (4 gave 25 % steps); `tpusim run` uses the same number
    # (RunOptions.eval_samples).
    eval_samples: int = 16
    progress: bool = True


def _int8_row(result: api.Result) -> dict[str, Any]:
    s = result.summary
    f, e, r = s["fidelity"], s["energy"], s["rescale"]
    return {
        "row": "quantized", "datatype": result.config.array.datatype, "config": result.config.name,
        "eval_samples": f["samples"], "agreement_rows": f["agreement_rows"],
        "top1_agreeing_rows": f["top1_agreeing_rows"], "top5_agreeing_rows": f["top5_agreeing_rows"],
        "evaluated_on": f["evaluated_on"],
        "synthetic_calibration": s["calibration"]["synthetic"],
        "weights": s["calibration"]["weights"], "calibration": s["calibration"]["method"],
        "top1_agreement": f["top1_agreement"], "top5_agreement": f["top5_agreement"],
        "output_sqnr_db": round(f["output_sqnr_db"], 3), "cosine": round(f["cosine"], 6),
        "latency_s": s["latency_s"], "tops": s["tops"],
        "total_tops_per_w": e["total_tops_per_w"], "dynamic_tops_per_w": e["dynamic_tops_per_w"],
        "energy_per_inference_uj": e["total_pj"] / 1e6 / s["batch"],
        "requant_pct_of_dynamic_energy": round(r["requant_pct_of_dynamic_energy"], 4),
        "per_channel_overhead_pct_of_latency": round(r["per_channel_overhead_pct_of_latency"], 4),
        "per_channel_overhead_pct_of_dynamic_energy": round(r["per_channel_overhead_pct_of_dynamic_energy"], 4),
        "calibration_data": s["calibration"]["source"], "batch": s["batch"],
    }


def check_baseline(request: CompareRequest) -> None:
    """Refuse a baseline that is neither ``fp32``, ``none`` (None) nor a loadable config file, before any run."""
    from tpusim.config import load_config

    if request.baseline == "fp32" or not _has_baseline(request):
        return
    path = Path(request.baseline)
    if not path.is_file():
        raise ConfigError(f"--baseline {request.baseline}: expected fp32, none or a config file "
                          f"({'a folder' if path.is_dir() else 'no such file'})")
    load_config(path, dict(request.overrides))


def _has_baseline(request: CompareRequest) -> bool:
    return request.baseline not in (None, "none")


def _baseline(request: CompareRequest) -> api.Result | None:
    from tpusim import api

    if not _has_baseline(request):
        return None
    overrides = dict(request.overrides)
    if request.baseline == "fp32":
        return api.simulate(request.config, request.model, batch=request.batch, quantize=False,
                            overrides={**overrides, "array.datatype": "fp32"})
    return api.simulate(Path(request.baseline), request.model, batch=request.batch, quantize=False, overrides=overrides)


def compare(request: CompareRequest) -> list[dict[str, Any]]:
    """Run every (weights, calibration) point and the baseline; one row per point plus the baseline row.

    What a run would warn about (synthetic calibration data, wrapped accumulators) is a
    :class:`~tpusim.errors.TpusimWarning`, once for the whole grid when every point has it.
    """
    from tpusim import api

    if isinstance(request.eval_samples, bool) or not isinstance(request.eval_samples, int) or request.eval_samples < 1:
        raise TpusimError(f"eval_samples: expected a positive integer, got {request.eval_samples!r}")
    check_baseline(request)
    points = [(w, c) for w in request.weights for c in request.calibrations]
    rows = []
    notes: dict[str, list[str]] = {}  # what a run warned about -> the grid points that warned it
    # The runs' own stages report to an inner silent Progress: this one counts runs.
    with Progress(request.progress) as progress, Progress(enabled=False):
        progress.phase("comparing", len(points) + _has_baseline(request), "runs")
        base = _baseline(request)
        progress.update(1 if base is not None else 0)
        for weights, calibration in points:
            overrides = {**dict(request.overrides), "quant.weights": weights, "quant.calibration": calibration}
            result = api.simulate(request.config, request.model, batch=request.batch, overrides=overrides,
                                  calib_data=request.calib_data, eval_samples=request.eval_samples)
            rows.append(_int8_row(result))
            for note in result.evaluation.warnings:
                notes.setdefault(note, []).append(f"{weights} weights, {calibration} calibration")
            progress.update(len(rows) + (base is not None))
    for note, where in notes.items():
        warnings.warn(note if len(where) == len(points) else f"{'; '.join(where)}: {note}", TpusimWarning,
                      stacklevel=2)
    per_tensor_latency = {r["calibration"]: r["latency_s"] for r in rows if r["weights"] == "per-tensor"}
    for row in rows:
        reference = per_tensor_latency.get(row["calibration"])
        row["latency_vs_per_tensor_pct"] = "" if reference is None else round(
            100.0 * (row["latency_s"] - reference) / reference, 4)
        if base is not None:
            be = base.summary["energy"]
            row["perf_per_w_gain_vs_fp32"] = round(row["total_tops_per_w"] / be["total_tops_per_w"], 4)
            row["dynamic_perf_per_w_gain_vs_fp32"] = round(row["dynamic_tops_per_w"] / be["dynamic_tops_per_w"], 4)
            row["latency_gain_vs_fp32"] = round(base.summary["latency_s"] / row["latency_s"], 4)
    if base is not None:
        s, e = base.summary, base.summary["energy"]
        n = request.eval_samples
        agreement_rows = rows[0]["agreement_rows"] if rows else n
        rows.insert(0, {
            # The reference itself: it agrees with itself on every row the grid points were measured on.
            "row": "baseline", "datatype": base.config.array.datatype, "config": base.config.name,
            "eval_samples": n, "agreement_rows": agreement_rows, "top1_agreeing_rows": agreement_rows,
            "top5_agreeing_rows": agreement_rows, "evaluated_on": "",
            "synthetic_calibration": False,
            "weights": "", "calibration": "",
            "top1_agreement": 1.0, "top5_agreement": 1.0, "output_sqnr_db": "", "cosine": 1.0,
            "latency_s": s["latency_s"], "tops": s["tops"], "total_tops_per_w": e["total_tops_per_w"],
            "dynamic_tops_per_w": e["dynamic_tops_per_w"], "perf_per_w_gain_vs_fp32": 1.0,
            "dynamic_perf_per_w_gain_vs_fp32": 1.0, "latency_gain_vs_fp32": 1.0,
            "energy_per_inference_uj": e["total_pj"] / 1e6 / s["batch"], "latency_vs_per_tensor_pct": "",
            "requant_pct_of_dynamic_energy": "", "per_channel_overhead_pct_of_latency": "",
            "per_channel_overhead_pct_of_dynamic_energy": "", "calibration_data": "", "batch": s["batch"],
        })
    return rows


def _pct(value: Any, digits: int = 2) -> str:
    return "" if value == "" else f"{value:+.{digits}f} %"


def markdown(rows: Sequence[dict[str, Any]], title: str) -> str:
    """The seed explainer's summary table, every cell measured in this run."""
    lines = [
        f"### {title}", "",
        "| method | calibration | output agreement vs FP32 (top-1 / top-5, output SQNR) | perf/W gain vs FP32 "
        "(with static / dynamic only) | end-to-end latency vs per-tensor | rescale overhead (latency / dynamic "
        "energy; requant share of energy) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["row"] == "baseline":
            lines.append(f"| {_label(r)} | -- | reference | 1.00x | -- | -- |")
            continue
        gain = ("" if "perf_per_w_gain_vs_fp32" not in r else
                f"{r['perf_per_w_gain_vs_fp32']:.2f}x / {r['dynamic_perf_per_w_gain_vs_fp32']:.2f}x")
        lines.append(
            f"| {_label(r)} | {r['calibration']} | {format_agreement(r['top1_agreement'], r['agreement_rows'])} / "
            f"{format_agreement(r['top5_agreement'], r['agreement_rows'])}, "
            f"{r['output_sqnr_db']:.1f} dB | {gain} | {_pct(r['latency_vs_per_tensor_pct'])} | "
            f"{_pct(r['per_channel_overhead_pct_of_latency'])} / {_pct(r['per_channel_overhead_pct_of_dynamic_energy'])}; "
            f"{r['requant_pct_of_dynamic_energy']:.2f} % |")
    measured = [r for r in rows if r["row"] != "baseline"]
    sources = sorted({r["calibration_data"] for r in measured})
    evaluated = sorted({r["evaluated_on"] for r in measured})
    lines += ["", f"Calibration data: {'; '.join(sources)}. Agreement with FP32 counted on {'; '.join(evaluated)}."]
    return "\n".join(lines) + "\n"


def _label(row: dict[str, Any]) -> str:
    """What a row is, in words: ``fp32 baseline (tpu_v1)``, ``int8 per-channel``."""
    if row["row"] == "baseline":
        return f"{row['datatype']} baseline ({row['config']})"
    return f"{row['datatype']} {row['weights']}"


TERMINAL_COLUMNS = ("method", "calibration", "top1", "sqnr", "gain", "latency")
TERMINAL_HEADERS = {"top1": "top-1 agreement", "sqnr": "SQNR dB", "gain": "perf/W vs FP32",
                    "latency": "latency vs per-tensor"}


def terminal_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, str]]:
    """compare.csv's rows as the terminal shows them: agreement with its basis, gains and shares as x and %."""
    return [{
        "method": _label(r), "calibration": r["calibration"] or "--",
        "top1": "reference" if r["row"] == "baseline" else format_agreement(r["top1_agreement"], r["agreement_rows"]),
        "sqnr": "" if r["output_sqnr_db"] == "" else f"{r['output_sqnr_db']:.1f}",
        "gain": "" if "perf_per_w_gain_vs_fp32" not in r else f"{r['perf_per_w_gain_vs_fp32']:.2f}x",
        "latency": _pct(r["latency_vs_per_tensor_pct"]),
    } for r in rows]


def _list(text: str, allowed: Sequence[str], flag: str) -> tuple[str, ...]:
    values = tuple(v.strip() for v in text.split(",") if v.strip())
    bad = [v for v in values if v not in allowed]
    if bad or not values:
        raise argparse.ArgumentTypeError(f"{flag}: expected a comma list of {', '.join(allowed)}, got {text!r}")
    return values


def add_compare_command(commands: argparse._SubParsersAction, add_model_arguments) -> None:
    parser = commands.add_parser(
        "compare", help="per-tensor vs per-channel x calibration methods (and FP32): accuracy, perf/W, latency",
        description="Run the grid of weight granularities and calibration methods, plus an FP32 baseline, and "
                    "write compare.csv and compare.md (every cell measured in this run).")
    add_model_arguments(parser)
    parser.add_argument("--weights", type=lambda t: _list(t, WEIGHTS, "--weights"), default=WEIGHTS,
                        metavar="LIST", help=f"comma list of {','.join(WEIGHTS)}")
    parser.add_argument("--calibration", type=lambda t: _list(t, CALIBRATIONS, "--calibration"),
                        default=CompareRequest.calibrations, metavar="LIST",
                        help=f"comma list of {','.join(CALIBRATIONS)}")
    parser.add_argument("--baseline", default="fp32",
                        help="'fp32' (this config with FP32 MACs), a baseline config file, or 'none'")
    parser.add_argument("--calib-data", metavar="PATH", help="calibration inputs (.npy/.npz or image folder; "
                                                             "default: a seeded synthetic set, reported as such)")
    parser.add_argument("--eval-samples", type=positive_int, default=CompareRequest.eval_samples, metavar="N",
                        help="inputs on which fidelity is measured; agreement is counted over them")
    parser.add_argument("--out", type=Path, help="output folder (default: results/<model>-<config>/)")
    parser.add_argument("--no-progress", dest="progress", action="store_false",
                        help="no progress bar or phase lines on stderr")
    parser.set_defaults(handler=_cmd_compare)


def _cmd_compare(args: argparse.Namespace) -> int:
    from tpusim.config import load_config, parse_override
    from tpusim.pipeline import default_out_dir
    from tpusim.report.files import atomic_write_csv, atomic_write_text, check_output_dir

    request = CompareRequest(
        config=args.config, model=args.model, weights=args.weights, calibrations=args.calibration,
        baseline=args.baseline, batch=args.batch,
        overrides=tuple(parse_override(item) for item in args.overrides), calib_data=args.calib_data,
        eval_samples=args.eval_samples, progress=args.progress)
    out = args.out or default_out_dir(args.model, load_config(args.config, dict(request.overrides)))
    check_output_dir(out)
    rows = compare(request)
    csv_path = atomic_write_csv(out / "compare.csv", COLUMNS, rows)
    md_path = atomic_write_text(out / "compare.md", markdown(rows, f"{args.model} on {args.config.stem}, batch {rows[-1]['batch']}"))
    print(format_table(TERMINAL_COLUMNS, terminal_rows(rows), left=("method", "calibration"), headers=TERMINAL_HEADERS))
    print(f"wrote {csv_path}\nwrote {md_path}")
    return 0
