"""The one place that composes the stages: config -> front end -> quantize -> map -> simulate ->
energy -> report. Each stage takes and returns typed values; nothing here reaches back."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

from tpusim import workloads
from tpusim.config import HardwareConfig, load_config
from tpusim.energy.model import RunEnergy, action_prices, run_energy
from tpusim.energy.table import EnergyTable, load_energy_table
from tpusim.errors import ModelError
from tpusim.frontend import load_onnx
from tpusim.ir import Graph, Shape
from tpusim.mapping import Program, compile_program
from tpusim.progress import Progress, current
from tpusim.rescale import LayerRescale, per_tensor_twin, rescale_report
from tpusim.report import run_report
from tpusim.report.figure_worker import FigureRenderer
from tpusim.report.plots import FigureJob
from tpusim.report.files import atomic_write_bytes, atomic_write_csv, atomic_write_json, atomic_write_text, file_set
from tpusim.sim import SimResult, simulate_program

if TYPE_CHECKING:  # the quantization stage (ONNX Runtime, Numba kernels) is imported only by a run that quantizes
    from tpusim.quant.stage import QuantOutcome


@dataclass(frozen=True)
class RunOptions:
    config: Path
    model: str
    out_dir: Path | None = None
    batch: int | None = None  # None: the N of input_shape, else the model's own batch, else 1
    overrides: dict[str, Any] = field(default_factory=dict)
    input_shape: Shape | None = None
    calib_data: Path | str | None = None
    quantize: bool = True
    eval_samples: int = 16  # top-1 agreement in 6.25 % steps; compare uses the same (CompareRequest)
    fidelity: str = "kernel"  # "kernel": int8 GEMM kernel computes values; "pe": the PE-level array does
    progress: bool = False


@dataclass(frozen=True, eq=False)
class Evaluation:
    """What the stages after the front end produced for one model on one config."""

    program: Program
    sim: SimResult
    energy: RunEnergy
    quant: QuantOutcome | None
    rescale: list[LayerRescale]
    layer_rows: list[dict[str, Any]]
    summary: dict[str, Any]
    accumulator_bits: int = 32

    @property
    def warnings(self) -> list[str]:
        """Things a user must not miss: synthetic calibration data, accumulator wrap-around."""
        if self.quant is None:
            return []
        notes = []
        if self.quant.calibration.synthetic:
            notes.append(f"calibrated on SYNTHETIC data ({self.quant.calibration.source}); pass --calib-data "
                         "for ranges (and fidelity) that mean something for real inputs")
        for layer, count in self.quant.fidelity.wrapped.items():
            if count:
                notes.append(f"layer {layer!r}: {count} accumulations wrapped around the {self.accumulator_bits}-bit "
                             "accumulator")
        return notes


@dataclass(frozen=True, eq=False)
class RunResult:
    config: HardwareConfig
    graph: Graph
    evaluation: Evaluation
    out_dir: Path
    files: tuple[Path, ...]

    @property
    def layer_rows(self) -> list[dict[str, Any]]:
        return self.evaluation.layer_rows

    @property
    def summary(self) -> dict[str, Any]:
        return self.evaluation.summary


def resolve_model(model: str) -> Path:
    """A path to an ``.onnx`` file, or the name of a built-in workload (generated and cached on first use)."""
    path = Path(model)
    if path.suffix == ".onnx" or path.exists() or "/" in model:
        return path
    if model in workloads.WORKLOADS:
        return workloads.workload_file(model)
    raise ModelError(f"{model}: not a file and not a built-in workload (built-in: {', '.join(workloads.WORKLOADS)})")


def model_label(model: str) -> str:
    return Path(model).stem if model.endswith(".onnx") or "/" in model else model


def default_out_dir(model: str, config: HardwareConfig) -> Path:
    return Path("results") / f"{model_label(model)}-{config.name}"


def prepare(options: RunOptions) -> tuple[HardwareConfig, Graph, Path]:
    """Load and validate the config, resolve the model and lower it."""
    config = load_config(options.config, options.overrides)
    model_path = resolve_model(options.model)
    graph = load_onnx(model_path, batch=options.batch, input_shape=options.input_shape)
    return config, graph, model_path


def time_and_energy(graph: Graph, config: HardwareConfig, table: EnergyTable | None = None,
                    program: Program | None = None) -> tuple[Program, SimResult, RunEnergy]:
    """Compile (unless given the program), simulate and price; a caller running many points passes the table."""
    program = compile_program(graph, config) if program is None else program
    sim = simulate_program(program, config, graph.batch)
    table = load_energy_table(config.energy.table) if table is None else table
    energy = run_energy([(t.name, t.counts) for t in sim.layers], sim.latency_s, sim.macs, sim.batch, config, table)
    return program, sim, energy


def measure_rescale(graph: Graph, config: HardwareConfig, program: Program, sim: SimResult,
                    energy: RunEnergy) -> list[LayerRescale]:
    """Requantization cost per layer, and the per-channel overhead against a per-tensor twin run."""
    twin = per_tensor_twin(config)
    baseline = time_and_energy(graph, twin)[1:] if twin is not None else None
    prices = action_prices(config, load_energy_table(config.energy.table))
    return rescale_report(program, sim, energy, prices, baseline)


def quantize(config: HardwareConfig, graph: Graph, model_path: Path, options: RunOptions) -> QuantOutcome:
    """Quantize and run in integers; values do not depend on the batch, so this uses a batch-1 lowering."""
    current().phase("quantizing")  # (importing the quantizer, ONNX Runtime and Numba, is part of it)
    from tpusim.quant.stage import quantize_and_measure

    single = graph if graph.batch == 1 else load_onnx(model_path, batch=1, input_shape=options.input_shape)
    names = {"calibrate": ("quantizing", "calibration samples"), "execute": ("integer execution", "layer runs")}

    def progress(phase: str, done: int, total: int) -> None:
        name, unit = names[phase]
        current().phase(name, total, unit)
        current().update(done)

    return quantize_and_measure(single, model_path, config, options.calib_data,
                                options.eval_samples, options.fidelity,
                                progress=progress if current().enabled else None)


def quantizes(options: RunOptions, config: HardwareConfig) -> bool:
    """Whether a run quantizes the model: unless told not to, when the array computes in int8."""
    return options.quantize and config.array.datatype == "int8"


def evaluate(config: HardwareConfig, graph: Graph, model_path: Path, options: RunOptions,
             timed: Callable[[SimResult, RunEnergy], None] | None = None,
             quantize_with: Callable[[HardwareConfig, Graph, Path, RunOptions], QuantOutcome] | None = None
             ) -> Evaluation:
    """Timing and energy, then quantization: the timing does not depend on the values, so it comes first
    and ``timed`` gets it at once (a run hands it to the figures, drawn while quantization runs).
    ``quantize_with`` stands in for :func:`quantize` (a sweep's, which reuses an earlier point's outcome)."""
    program = compile_program(graph, config)  # first: a model the chip cannot hold fails before calibration runs
    current().phase("timing and energy")
    program, sim, energy = time_and_energy(graph, config, program=program)
    rescale = measure_rescale(graph, config, program, sim, energy)
    if timed is not None:
        timed(sim, energy)
    quant = (quantize_with or quantize)(config, graph, model_path, options) if quantizes(options, config) else None
    rows = run_report.layer_rows(sim, energy, quant)
    summary = run_report.summary(graph, sim, config, energy, quant, rescale)
    return Evaluation(program=program, sim=sim, energy=energy, quant=quant, rescale=rescale, layer_rows=rows,
                      accumulator_bits=config.accumulators.bits,
                      summary=summary)


def run_figures(config: HardwareConfig, sim: SimResult, energy: RunEnergy) -> dict[str, FigureJob]:
    """The run's figures by file name: they draw timing and energy only."""
    title = f"{sim.graph_name} on {config.name}, batch {sim.batch}"
    rows = run_report.layer_rows(sim, energy)
    return {
        "latency_breakdown.png": FigureJob("latency_breakdown", (rows,), {"title": f"cycles per layer: {title}"}),
        "energy_breakdown.png": FigureJob("energy_breakdown", ({name: e.as_dict() for name, e in energy.layers},),
                                          {"title": f"dynamic energy per layer: {title}"}),
        "roofline.png": FigureJob("roofline", ([(f"roofline: {title}", config, rows)],)),
    }


def write_reports(config: HardwareConfig, evaluation: Evaluation, out_dir: Path,
                  figures: Mapping[str, bytes]) -> tuple[Path, ...]:
    """The run's tables, summary and config, and ``figures``: PNGs by file name (:func:`run_figures`)."""
    energy_rows = run_report.energy_rows(evaluation.energy)
    files = [
        atomic_write_csv(out_dir / "layers.csv", run_report.columns(evaluation.quant), evaluation.layer_rows),
        atomic_write_csv(out_dir / "energy.csv", run_report.ENERGY_CSV_COLUMNS, energy_rows),
        atomic_write_csv(out_dir / "rescale.csv", run_report.RESCALE_COLUMNS, run_report.rescale_rows(evaluation.rescale)),
        atomic_write_json(out_dir / "summary.json", evaluation.summary),
        atomic_write_text(out_dir / "config.yaml", config.to_yaml()),
    ]
    files += [atomic_write_bytes(out_dir / name, png) for name, png in figures.items()]
    return tuple(files)


def run(options: RunOptions, figures: FigureRenderer | None = None) -> RunResult:
    """The whole run. ``figures``: where its figures are drawn (default: a :class:`FigureRenderer` of its own,
    whose worker, if it starts one, imports matplotlib while the model is lowered and draws while the run
    quantizes; the command line starts it before it imports the pipeline). It is closed when the run ends."""
    with Progress(options.progress) as progress, figures or FigureRenderer() as figures:  # stages report to progress.current()
        progress.phase("loading and lowering the model")  # (a built-in one is generated on first use)
        config, graph, model_path = prepare(options)
        # a run that does not quantize only waits for its figures: they are drawn on both cores
        evaluation = evaluate(config, graph, model_path, options,
                              timed=lambda sim, energy: figures.submit(run_figures(config, sim, energy),
                                                                       spread=not quantizes(options, config)))
        out_dir = options.out_dir or default_out_dir(options.model, config)
        progress.phase("writing reports and plots")
        pngs = figures.pngs()
        with file_set(out_dir) as staging:
            files = tuple(out_dir / path.name for path in write_reports(config, evaluation, staging, pngs))
    return RunResult(config=config, graph=graph, evaluation=evaluation, out_dir=out_dir, files=files)
