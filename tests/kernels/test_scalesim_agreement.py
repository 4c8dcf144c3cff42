"""tpusim without weight double buffering against SCALE-Sim 3.0's recorded per-layer cycles.

``tests/data/scalesim/MODEL.json`` holds SCALE-Sim's weight-stationary compute cycles of every matrix
layer of the built-in model, written by ``python3 benchmarks/compare_scalesim.py --model MODEL --record``
(the file names the SCALE-Sim version and carries its config). SCALE-Sim was given layers whose folds
are tpusim's own tiles; it counts the index of the last cycle, so each of its layers is one cycle short
of tpusim's count. Nothing here needs SCALE-Sim installed.
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from tpusim.config import load_config
from tpusim.frontend import load_onnx
from tpusim.kernels.systolic import pe_array_run, tile_sequence_cycles
from tpusim.mapping import MatrixMultiply, compile_program
from tpusim.pipeline import resolve_model
from tpusim.sim import simulate_program

REPO = Path(__file__).resolve().parents[2]
RECORDS = REPO / "tests" / "data" / "scalesim"
# no double buffering, and memories that never stall: what SCALE-Sim's CALC bandwidth mode assumes
SCALESIM_MODE = {
    "array.weight_double_buffering": False,
    "weight_memory.bandwidth_gb_s": 1e12, "weight_memory.latency_cycles": 0,
    "host.bandwidth_gb_s": 1e12, "host.latency_cycles": 0,
}
# layers stepped on the PE-level array (a few seconds each at most): many tiles, small M, and packing
PE_ARRAY_LAYERS = {
    "resnet50": ["layer1.0.conv2", "layer4.0.conv2", "fc"],
    "mobilenet_v2": ["features.15.conv.1.0", "fc"],
}


@pytest.fixture(scope="module", params=sorted(PE_ARRAY_LAYERS))
def case(request):
    model = request.param
    record = json.loads((RECORDS / f"{model}.json").read_text())
    cfg = load_config(REPO / record["tpusim_config"], SCALESIM_MODE)
    graph = load_onnx(resolve_model(model))
    program = compile_program(graph, cfg)
    sim = simulate_program(program, cfg, graph.batch)
    matrix = [(i, layer) for i, layer in enumerate(graph.layers) if layer.is_matrix]
    return model, record, cfg, program, sim, matrix


def tiles_of(program, layer_index):
    """(M, K, N) of each weight tile the layer loads; multiplies that keep the weights extend its M."""
    tiles = []
    for ins in program.instructions:
        if isinstance(ins, MatrixMultiply) and ins.layer == layer_index:
            if ins.load_weights:
                tiles.append([ins.m_rows, ins.k_rows, ins.n_cols])
            else:
                tiles[-1][0] += ins.m_rows
    return [tuple(t) for t in tiles]


def scalesim_folds(scalesim_layers, rows, cols):
    """SCALE-Sim's WS folds: ceil(K/R) x ceil(N/C) per layer, each streaming the layer's T rows."""
    folds = Counter()
    for s in scalesim_layers:
        for k0 in range(0, s["K"], rows):
            for n0 in range(0, s["N"], cols):
                folds[(s["T"], min(rows, s["K"] - k0), min(cols, s["N"] - n0))] += 1
    return folds


def scalesim_plus_one(entry):
    return sum(s["total_cycles"] + 1 for s in entry["scalesim_layers"])


def test_record_covers_every_matrix_layer(case):
    model, record, cfg, _, _, matrix = case
    assert record["scalesim_version"] == "3.0.0"
    assert record["array"] == {"rows": cfg.array.rows, "cols": cfg.array.cols}
    assert [e["layer"] for e in record["layers"]] == [layer.name for _, layer in matrix]
    assert all(s["stall_cycles"] == 0 for e in record["layers"] for s in e["scalesim_layers"])


def test_scalesim_was_given_tpusims_tiles(case):
    _, record, cfg, program, _, matrix = case
    for (index, layer), entry in zip(matrix, record["layers"]):
        folds = scalesim_folds(entry["scalesim_layers"], cfg.array.rows, cfg.array.cols)
        assert folds == Counter(tiles_of(program, index)), layer.name


def test_scalesim_runs_each_fold_alone(case):
    # its WS model: R rows of weight load, T streamed, C - 1 drain, skewed by R - 1; the last index reported
    _, record, cfg, _, _, _ = case
    r, c = cfg.array.rows, cfg.array.cols
    for entry in record["layers"]:
        for s in entry["scalesim_layers"]:
            folds = -(-s["K"] // r) * -(-s["N"] // c)
            assert s["total_cycles"] == folds * (2 * r + c + s["T"] - 2) - 1, entry["layer"]


def test_closed_form_on_tpusims_tiles_equals_scalesim_plus_one_per_layer(case):
    _, record, cfg, program, _, matrix = case
    r, c = cfg.array.rows, cfg.array.cols
    for (index, layer), entry in zip(matrix, record["layers"]):
        tiles = tiles_of(program, index)
        ours = sum(tile_sequence_cycles(m, 1, r, c, weight_double_buffering=False) for m, _, _ in tiles)
        assert ours == scalesim_plus_one(entry), layer.name


def test_timeline_mxu_span_equals_scalesim_plus_one_per_layer(case):
    # from the layer's first shift, the R cycles before its first stream, to its last output leaving the
    # array: a layer fed by a pool or an add shifts while it waits for that input, a wait SCALE-Sim lacks
    _, record, cfg, _, sim, matrix = case
    trace = sim.trace
    for (index, layer), entry in zip(matrix, record["layers"]):
        mine = trace.mxu_layer == index
        span = int(trace.last_output[mine].max() - trace.stream_start[mine].min()) + cfg.array.rows
        assert span == scalesim_plus_one(entry), layer.name


def test_pe_array_equals_scalesim_plus_one(case):
    model, record, cfg, program, _, matrix = case
    rng = np.random.default_rng(0)
    entries = {e["layer"]: e for e in record["layers"]}
    indices = {layer.name: i for i, layer in matrix}
    for name in PE_ARRAY_LAYERS[model]:
        tiles = tiles_of(program, indices[name])
        x_tiles = [rng.integers(0, 256, (m, k), dtype=np.uint8) for m, k, _ in tiles]
        w_tiles = [rng.integers(-128, 128, (k, n), dtype=np.int8) for _, k, n in tiles]
        run = pe_array_run(x_tiles, w_tiles, cfg.array.rows, cfg.array.cols, weight_double_buffering=False)
        assert run.cycles == scalesim_plus_one(entries[name]), name
