"""Checks every op module's test runs through every stage on a small ONNX graph containing the op.

``check_all_stages(model)``:
1. lowering + FP32 reference against ONNX Runtime on the original (unfolded) graph, to 1e-4 of the
   output range;
2. calibration, quantization (each activation scheme x weight granularity), integer execution, and
   the integers against ONNX Runtime running our QDQ export of the same quantized graph, layer by
   layer on ORT's own integer inputs (so a 1-LSB rounding difference does not cascade): at most
   ``max_lsb`` apart anywhere, and no more than ``max_off_fraction`` of the elements off at all;
3. the dequantized integer output against our FP32 reference: SQNR at least ``min_sqnr_db``;
4. the timeline and the energy model: the program compiles, simulates, and every layer of the ops
   under test costs cycles and energy.
Returns the lowered graph so a test can assert more.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import onnxruntime as ort

from tpusim import ops
from tpusim.config import load_config
from tpusim.frontend import lower_model, run_reference
from tpusim.pipeline import time_and_energy
from tpusim.quant.calibrate import collect_statistics, synthetic_inputs
from tpusim.quant.execute import run_integer, run_layer
from tpusim.quant.export import export_qdq, quantized_name, with_outputs
from tpusim.quant.quantize import quantize_graph

from onnx_graphs import onnxruntime_integers_exact, run_onnxruntime

CONFIG = load_config("configs/tpu_v1.yaml")
SCHEMES = [(a, w) for a in ("asymmetric-uint8", "symmetric-int8") for w in ("per-tensor", "per-channel")]


def sqnr_db(reference: np.ndarray, approx: np.ndarray) -> float:
    noise = float(np.sum((reference.astype(np.float64) - approx) ** 2))
    signal = float(np.sum(reference.astype(np.float64) ** 2))
    return float("inf") if noise == 0 else 10 * np.log10(signal / noise)


def _session(model):
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def check_reference(model, x: np.ndarray, where: str = "test"):
    graph = lower_model(model, where, batch=x.shape[0])
    ours = run_reference(graph, x)
    theirs = run_onnxruntime(model, x)
    for name, expected in zip(graph.outputs, theirs):
        span = float(np.ptp(expected)) or 1.0
        np.testing.assert_allclose(ours[name], expected, atol=1e-4 * span, rtol=0)
    return graph


def check_all_stages(model, input_shape, ops_under_test, *, min_sqnr_db: float = 25.0, max_lsb: int = 1,
                     max_off_fraction: float = 0.01, samples: int = 8, seed: int = 0, x=None):
    data = synthetic_inputs(tuple(input_shape[1:]), samples, seed)
    x = data.inputs[:1] if x is None else x
    graph = check_reference(model, x)
    present = {layer.op for layer in graph.layers}
    assert set(ops_under_test) <= present, f"lowered ops {sorted(present)} miss {set(ops_under_test) - present}"
    stats = collect_statistics(model, graph, data, 2048)
    reference = run_reference(graph, x)[graph.outputs[0]]
    for activations, weights in SCHEMES:
        quant = dataclasses.replace(CONFIG.quant, activations=activations, weights=weights)
        qgraph = quantize_graph(graph, stats, quant)
        run = run_integer(qgraph, x)
        sqnr = sqnr_db(reference, run.dequantized[graph.outputs[0]])
        assert sqnr >= min_sqnr_db, f"{activations}/{weights}: output SQNR {sqnr:.1f} dB < {min_sqnr_db}"
        _check_against_ort(qgraph, x, max_lsb, max_off_fraction, f"{activations}/{weights}")
    _check_costs(graph, ops_under_test)
    return graph


def _check_against_ort(qgraph, x, max_lsb, max_off_fraction, label):
    graph = qgraph.graph
    tensors = [graph.input_name] + [layer.output for layer in graph.layers]
    exported = export_qdq(qgraph, graph)
    exposed = with_outputs(exported, [quantized_name(t) for t in tensors])
    names = [o.name for o in exposed.graph.output]
    results = dict(zip(names, _session(exposed).run(None, {graph.input_name: x})))
    ort_tensors = {t: results[quantized_name(t)] for t in tensors}
    ours_all = run_integer(qgraph, x, keep_all=True).tensors
    np.testing.assert_array_equal(ours_all[graph.input_name], ort_tensors[graph.input_name])
    for ql in qgraph.layers:
        if not onnxruntime_integers_exact(ql.layer.op):
            continue  # no reference here; its kernels' integers are checked against numpy oracles (tests/kernels)
        ours, _ = run_layer(ql, [ort_tensors[name] for name in ql.layer.inputs])
        theirs = ort_tensors[ql.layer.output]
        assert ours.dtype == theirs.dtype, (label, ql.name, ours.dtype, theirs.dtype)
        diff = np.abs(ours.astype(np.int64) - theirs.astype(np.int64))
        # Symmetric int8 grids stop at -127 on the chip; ORT's QuantizeLinear saturates at -128.
        diff[(ours.astype(np.int64) == -127) & (theirs.astype(np.int64) == -128)] = 0
        assert diff.max(initial=0) <= max_lsb, (label, ql.name, int(diff.max()))
        assert np.mean(diff > 0) <= max_off_fraction, (label, ql.name, float(np.mean(diff > 0)))


def _check_costs(graph, ops_under_test):
    program, sim, energy = time_and_energy(graph, CONFIG)
    by_name = {t.name: t for t in sim.layers}
    energies = dict(energy.layers)
    for layer in graph.layers:
        if layer.op in ops_under_test and not ops.op(layer.op).alias:
            assert by_name[layer.name].cycles > 0, layer.name
            assert energies[layer.name].total > 0, layer.name


def ort_qdq_integers(path, x: np.ndarray) -> dict[str, np.ndarray]:
    """ONNX Runtime's integers for every tensor of a QDQ file, keyed by the float tensor name each
    QuantizeLinear quantizes (both the name it reads and the names its DequantizeLinears write, since
    a graph output keeps its float name on the DQ side)."""
    import onnx

    model = onnx.load(str(path))
    names: dict[str, list[str]] = {}
    for node in model.graph.node:
        if node.op_type == "QuantizeLinear":
            names.setdefault(node.output[0], []).append(node.input[0])
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in names:
            names[node.input[0]].append(node.output[0])
    present = {o.name for o in model.graph.output}
    for q in names:
        if q not in present:
            model.graph.output.append(onnx.helper.make_empty_tensor_value_info(q))
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    results = dict(zip([o.name for o in session.get_outputs()], session.run(None, {session.get_inputs()[0].name: x})))
    return {tensor: results[q] for q, tensors in names.items() for tensor in tensors}


def assert_layers_match(qgraph, ort_tensors: dict[str, np.ndarray], max_off_fraction: float = 1e-3) -> int:
    """Each layer run on ONNX Runtime's integer inputs gives ORT's integers to one LSB; returns how
    many elements were compared. ORT requantizes in float32 rounding half to even, the chip with
    31-bit dyadic multipliers rounding half away: values within float32 precision of a rounding
    boundary may differ by one. Average pooling's sum / count is often an exact tie (see
    tests/quant/test_export.py), so its elements count toward the one-LSB bound only."""
    compared = off = 0
    for ql in qgraph.layers:
        if ql.layer.output not in ort_tensors or not all(n in ort_tensors for n in ql.layer.inputs):
            continue
        ours, _ = run_layer(ql, [ort_tensors[n] for n in ql.layer.inputs])
        diff = np.abs(ours.astype(np.int64) - ort_tensors[ql.layer.output].astype(np.int64))
        assert diff.max(initial=0) <= 1, (ql.name, int(diff.max()))
        if ql.layer.op != "avgpool":
            compared += diff.size
            off += int(np.count_nonzero(diff))
    assert compared > 0 and off / compared <= max_off_fraction, (off, compared)
    return compared
