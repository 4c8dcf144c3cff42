"""The quantization stage as the pipeline runs it: calibrate, (equalize), quantize, execute in integers,
measure fidelity. Input: a batch-1 lowered graph, its ONNX file and the config; output: a
:class:`QuantOutcome`. Values do not depend on the timing batch, so this stage always runs batch 1."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnx

from tpusim import ops
from tpusim.config import HardwareConfig
from tpusim.ir import Graph
from tpusim.kernels.systolic import pe_gemm
from tpusim.frontend.lowering import index_rows
from tpusim.frontend.reference import run_layer
from tpusim.quant.arithmetic import QParams
from tpusim.quant.calibrate import (CalibrationSet, FloatModel, ModelFile, Samples, collect_statistics,
                                    load_calibration_set, model_for_onnxruntime, synthetic_ids, synthetic_inputs)
from tpusim.quant.equalization import equalize
from tpusim.quant.execute import GemmEngine
from tpusim.quant.export import export_fp32
from tpusim.quant.fidelity import FidelityReport, Reference, fidelity
from tpusim.quant.qlayer import QuantizedGraph
from tpusim.quant.quantize import quantize_from_model, quantize_graph, unquantized_tensors
from tpusim.walk import walk

Progress = Callable[[str, int, int], None]  # (phase, done, total)


@dataclass(frozen=True, eq=False)
class QuantOutcome:
    graph: Graph                      # the batch-1 graph that was quantized (equalized when configured)
    calibration: CalibrationSet
    evaluation_source: str
    qgraph: QuantizedGraph
    fidelity: FidelityReport
    pe_array_cycles: dict[str, int] | None  # per matrix layer, when the PE-level array computed the values
    held_out: bool = True             # fidelity was measured on inputs that did not calibrate


class _PeArrayUnit:
    """The PE-level cycle-stepped array as the integer executor's matrix unit, counting its cycles."""

    def __init__(self, rows: int, cols: int, weight_double_buffering: bool):
        self.rows, self.cols, self.weight_double_buffering = rows, cols, weight_double_buffering
        self.cycles_since_layer = 0

    def __call__(self, x: np.ndarray, w: np.ndarray, bias: np.ndarray, acc_bits: int) -> tuple[np.ndarray, int]:
        result = pe_gemm(x, w, self.rows, self.cols, acc_bits, bias,
                         weight_double_buffering=self.weight_double_buffering)
        self.cycles_since_layer += result.cycles
        return result.result, result.wrapped_count


def evaluation_inputs(calibration: CalibrationSet, graph: Graph, samples: int, seed: int) -> tuple[Samples | np.ndarray, str]:
    """Inputs for fidelity, disjoint from the calibration samples whenever the data allow it."""
    if calibration.synthetic:
        rows = index_rows(graph)
        if rows is not None:
            held_out = synthetic_ids(graph.input_shape[1:], samples, seed + 1, rows)
            return held_out.inputs, f"{held_out.source} (held out)"
        held_out = synthetic_inputs(graph.input_shape[1:], samples, seed + 1)
        return held_out.inputs, f"synthetic N(0,1), seed {seed + 1}, {samples} samples (held out)"
    return calibration.part(0, samples).inputs, f"the first {min(samples, len(calibration.inputs))} calibration samples"


def _ids_keep_their_integers(qgraph: QuantizedGraph, rows: int | None) -> QuantizedGraph:
    """A graph input of token ids (``rows``: the tables' row count) is not quantized: it gets the identity
    grid (scale 1, zero point 0, integers 0 .. rows - 1), in the graph and in every layer reading it."""
    if rows is None:
        return qgraph
    name = qgraph.graph.input_name
    grid = QParams(np.array(1.0), np.array(0), 0, max(rows - 1, 1))
    layers = tuple(ql if name not in ql.layer.inputs else dataclasses.replace(
        ql, input_qparams=tuple(grid if n == name else qp for n, qp in zip(ql.layer.inputs, ql.input_qparams)))
        for ql in qgraph.layers)
    return dataclasses.replace(qgraph, tensor_qparams={**qgraph.tensor_qparams, name: grid}, layers=layers)


@dataclass(frozen=True, eq=False)
class Quantized:
    graph: Graph                   # the graph that was quantized (equalized when configured)
    data: CalibrationSet           # everything the calibration source holds
    calibration: CalibrationSet    # the part of it that calibrated
    qgraph: QuantizedGraph
    float_model: FloatModel | None = None  # the FP32 model in ONNX Runtime that calibrated, every tensor exposed


def calibrate_and_quantize(graph: Graph, model: onnx.ModelProto | ModelFile, config: HardwareConfig, calib_data,
                           progress: Progress | None = None) -> Quantized:
    quant = config.quant
    rows = index_rows(graph)
    data = load_calibration_set(calib_data, graph.input_shape[1:], quant.calibration_samples, quant.seed,
                                config.input_preprocessing, hold_out=graph.model_grids is None, index_rows=rows)
    calibration = data.part(0, quant.calibration_samples)
    if graph.model_grids is not None:
        # A QDQ model brings its own scales, zero points, integer weights and biases; only tensors it
        # left in float are calibrated (on the model itself, as ONNX Runtime runs it).
        missing = unquantized_tensors(graph)
        if not missing:
            unused = CalibrationSet(data.part(0, 0).inputs, "none: the quantization came from the model",
                                    synthetic=False, warnings=data.warnings)
            return Quantized(graph=graph, data=data, calibration=unused, qgraph=quantize_from_model(graph, quant))
        stats = collect_statistics(model, graph, calibration, quant.histogram_bins, tensors=[graph.input_name] + missing,
                                   progress=None if progress is None else lambda d, t: progress("calibrate", d, t))
        partial = dataclasses.replace(calibration, source=f"{calibration.source}, for the {len(missing)} tensors the "
                                      f"model left in float ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})")
        return Quantized(graph=graph, data=data, calibration=partial, qgraph=quantize_from_model(graph, quant, stats))
    if quant.cross_layer_equalization:
        graph = equalize(graph)
        model = export_fp32(graph)
    float_model = FloatModel(model, graph)
    del model  # ONNX Runtime has its own copy: the model (ResNet-50: 100 MB) need not stay while calibration runs
    stats = collect_statistics(None, graph, calibration, quant.histogram_bins, float_model=float_model,
                               progress=None if progress is None else lambda d, t: progress("calibrate", d, t))
    qgraph = _ids_keep_their_integers(quantize_graph(graph, stats, quant), rows)
    return Quantized(graph=graph, data=data, calibration=calibration, qgraph=qgraph, float_model=float_model)


def fp32_reference(quantized: Quantized, first_batch: np.ndarray) -> Reference | None:
    """ONNX Runtime's run of the FP32 model that calibrated, as the reference of fidelity, where it computes
    the same tensors as tpusim's own evaluator of the graph (:func:`tpusim.frontend.reference.run_reference`):
    every graph tensor, at the graph's batch, of the same shape and, on ``first_batch``, within 1e-3 of the
    tensor's largest magnitude (a layer may keep an ONNX tensor's name in another layout: an LSTM's Y, batch
    first). Else None: the evaluator is the reference, as for a model that brings its own quantization (its
    FP32 form is the graph with dequantized weights, not the model ONNX Runtime runs)."""
    float_model, graph = quantized.float_model, quantized.graph
    if float_model is None or not float_model.covers_graph or float_model.fixed_batch not in (None, graph.batch):
        return None
    theirs = float_model.reference(first_batch)
    agree = True

    def compared(_: int, layer, inputs: list[np.ndarray]) -> np.ndarray:
        nonlocal agree
        ours, other = run_layer(layer, inputs), theirs[layer.output]
        agree = agree and ours.shape == other.shape and bool(
            np.max(np.abs(ours - other), initial=0.0) <= 1e-3 * np.max(np.abs(ours), initial=1e-30))
        return ours

    # layer by layer, each of our tensors freed after its last reader: one set of the run's tensors is held
    walk(graph, {graph.input_name: np.asarray(first_batch, np.float32)}, compared)
    return _CheckedReference(float_model, first_batch, theirs) if agree else None


class _CheckedReference:
    """ONNX Runtime's tensors of a batch (:meth:`FloatModel.reference`); those of the batch that
    :func:`fp32_reference` checked are handed to the first call that asks for that batch (fidelity's first)
    instead of being computed again. Either way the first call lets go of them."""

    def __init__(self, float_model: FloatModel, batch: np.ndarray, tensors: dict[str, np.ndarray]):
        self.float_model = float_model
        self._checked: tuple[np.ndarray, dict[str, np.ndarray]] | None = (batch, tensors)

    def __call__(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        checked, self._checked = self._checked, None
        if checked is not None and np.array_equal(batch, checked[0]):
            return checked[1]
        return self.float_model.reference(batch)


def quantize_and_measure(graph: Graph, model_path: Path, config: HardwareConfig, calib_data,
                         eval_samples: int, fidelity_mode: str = "kernel",
                         progress: Progress | None = None) -> QuantOutcome:
    quant = config.quant
    # passed, not kept: calibration drops the model once ONNX Runtime has it
    quantized = calibrate_and_quantize(graph, model_for_onnxruntime(model_path, graph.external_data), config,
                                       calib_data, progress)
    graph, data, calibration, qgraph = quantized.graph, quantized.data, quantized.calibration, quantized.qgraph
    available = len(data.inputs)
    held_out = True
    if graph.model_grids is not None:
        # Nothing calibrated, so every sample of the data (or a held-out synthetic set) may evaluate.
        if data.synthetic:
            eval_x, eval_source = evaluation_inputs(data, graph, eval_samples, quant.seed)
        else:
            eval_x = data.part(0, eval_samples).inputs
            eval_source = f"{len(eval_x)} samples of {data.source}"
    elif not calibration.synthetic and available > quant.calibration_samples:
        eval_x = data.part(quant.calibration_samples, quant.calibration_samples + eval_samples).inputs
        eval_source = f"{len(eval_x)} held-out samples of {data.source}"
    else:
        held_out = calibration.synthetic
        eval_x, eval_source = evaluation_inputs(calibration, graph, eval_samples, quant.seed)
    engine: GemmEngine = "int8-gemm"
    pe_cycles: dict[str, int] | None = None
    layer_progress = None
    # fidelity() runs the layers once per evaluation batch; one count over all batches only moves forward
    batches, finished_batches = len(eval_x) // graph.batch, 0

    def execute_progress(done: int, total: int) -> None:
        nonlocal finished_batches
        progress("execute", finished_batches * total + done, batches * total)
        finished_batches += done == total

    if fidelity_mode == "pe":
        unit = _PeArrayUnit(config.array.rows, config.array.cols, config.array.weight_double_buffering)
        engine, pe_cycles = unit, {}
        matrix_layers = {layer.name for layer in graph.layers if ops.op(layer.op).accumulates}

        def layer_progress(done: int, total: int, name: str) -> None:
            if name in matrix_layers:
                pe_cycles[name] = pe_cycles.get(name, 0) + unit.cycles_since_layer
            unit.cycles_since_layer = 0
            if progress is not None:
                execute_progress(done, total)
    elif progress is not None:
        def layer_progress(done: int, total: int, name: str) -> None:
            execute_progress(done, total)
    report = fidelity(graph, qgraph, eval_x, engine=engine, progress=layer_progress, acc_bits=config.accumulators.bits,
                      reference=fp32_reference(quantized, eval_x[: graph.batch]))
    return QuantOutcome(graph=graph, calibration=calibration, evaluation_source=eval_source, qgraph=qgraph,
                        fidelity=report, pe_array_cycles=pe_cycles, held_out=held_out)
