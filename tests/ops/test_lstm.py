"""LSTM: lowering of PyTorch-style exports (batch-first rewrite), FP32 against ONNX Runtime, integer
execution against our FP32 reference (SQNR) and against ONNX Runtime's QDQ execution, the fixed-point
nonlinearities, and the per-step timeline (weights per step, hoisting, RAW stall, PE-level array)."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from onnx_graphs import GraphBuilder
from op_checks import CONFIG, check_all_stages, check_reference

from tpusim.errors import ModelError
from tpusim.frontend import lower_model
from tpusim.mapping.isa import Activate, MatrixMultiply, ReadWeights, ReadWeightsFromUb
from tpusim.ops import _recurrent as rec
from tpusim.quant.calibrate import collect_statistics, synthetic_inputs
from tpusim.quant.execute import run_integer
from tpusim.quant.quantize import quantize_graph
from tpusim.sim import compile_program, simulate, simulate_program

# Integer LSTM layers against the FP32 reference: measured 37-38 dB per layer (every scheme, 12 steps);
# the bound leaves room for other seeds. Against ONNX Runtime running the same int8 weights and grids
# (float LSTM between Q/DQ): at most 1 LSB anywhere, measured 5-6 % of the elements 1 LSB off.
MIN_SQNR_DB = 32.0
MAX_OFF_FRACTION = 0.15
FAST = {"weight_memory.bandwidth_gb_s": 1e6, "weight_memory.latency_cycles": 0,
        "host.bandwidth_gb_s": 1e6, "host.latency_cycles": 0}
# Unified-buffer ports that never make an access wait: what remains between steps is the RAW dependence.
UNLIMITED_PORTS = {"unified_buffer.read_ports": 64, "unified_buffer.write_ports": 64,
                   "unified_buffer.port_bytes_per_cycle": 1e9}


def pytorch_lstm(steps=12, features=16, hidden=32, direction="forward", batch=None, seed=0, lens=None,
                 initial=False, kind="LSTM", **attrs):
    """What torch.onnx.export writes for a batch_first nn.LSTM: Transpose -> LSTM -> (Squeeze | Transpose +
    Reshape) -> Transpose, weights U(-1/sqrt(H), 1/sqrt(H)) as torch initialises them."""
    g = GraphBuilder((batch or 1, steps, features), seed=seed)
    d = 2 if direction == "bidirectional" else 1
    gates = 4 if kind == "LSTM" else 3
    bound = 1 / np.sqrt(hidden)
    u = lambda *shape: g.const(g.rng.uniform(-bound, bound, shape).astype(np.float32), "w")  # noqa: E731
    inputs = [g.node("Transpose", [g.input_name], perm=[1, 0, 2]), u(d, gates * hidden, features),
              u(d, gates * hidden, hidden), u(d, 2 * gates * hidden)]
    if lens is not None or initial:
        inputs.append(g.const(np.asarray(lens, np.int32), "lens") if lens is not None else "")
    if initial:
        # A previous sequence's last state: h within the range the outputs take, c any size.
        b = batch or 1
        inputs.append(g.const(g.rng.uniform(-0.3, 0.3, (d, b, hidden)).astype(np.float32), "h0"))
        if kind == "LSTM":
            inputs.append(g.const((g.rng.standard_normal((d, b, hidden)) * 0.5).astype(np.float32), "c0"))
    y = g.node(kind, inputs, hidden_size=hidden, direction=direction, **attrs)
    if d == 1:
        y = g.node("Squeeze", [y, g.const(np.array([1], np.int64))])
    else:
        y = g.node("Reshape", [g.node("Transpose", [y], perm=[0, 2, 1, 3]), g.const(np.array([0, 0, -1], np.int64))])
    return g.model(g.node("Transpose", [y], perm=[1, 0, 2]), batch_dim=batch or "batch")


@pytest.mark.parametrize("direction", ["forward", "reverse", "bidirectional"])
def test_pytorch_style_lstm_through_every_stage(direction):
    graph = check_all_stages(pytorch_lstm(direction=direction), (1, 12, 16), {"lstm"}, min_sqnr_db=MIN_SQNR_DB,
                             max_off_fraction=MAX_OFF_FRACTION)
    # The time-major detour is gone: one batch-first LSTM (layout 1) and a free reshape of its output.
    assert [layer.op for layer in graph.layers] == ["lstm", "reshape"]
    layer = graph.layers[0]
    d = 2 if direction == "bidirectional" else 1
    assert layer.attr("layout") == 1 and layer.input_shapes[0] == (1, 12, 16) and layer.output_shape == (1, 12, d, 32)
    assert graph.layers[1].output_shape == (1, 12, d * 32)


def test_sequence_lens_and_initial_states_through_every_stage():
    model = pytorch_lstm(direction="bidirectional", batch=3, lens=[12, 5, 9], initial=True)
    x = np.asarray(synthetic_inputs((12, 16), 3, 7).inputs)
    graph = check_all_stages(model, (3, 12, 16), {"lstm"}, min_sqnr_db=MIN_SQNR_DB, max_off_fraction=MAX_OFF_FRACTION,
                             x=x)
    layer = graph.layers[0]
    assert layer.attr("sequence_lens") == (12, 5, 9)
    assert layer.attr("initial_h").shape == (2, 3, 32) and layer.attr("initial_c").shape == (2, 3, 32)
    stats = collect_statistics(model, graph, synthetic_inputs((12, 16), 6, 0), 2048)
    qgraph = quantize_graph(graph, stats, CONFIG.quant)
    y = run_integer(qgraph, x, keep_all=True).tensors[layer.output]      # (B, T, D, H) on Y's grid
    zero = int(qgraph.tensor_qparams[layer.output].zero_point)
    assert np.all(y[1, 5:] == zero) and np.all(y[2, 9:] == zero) and np.any(y[1, :5] != zero)


def test_fixed_point_sigmoid_and_tanh():
    x = np.linspace(-12, 12, 100_001)
    q = np.rint(x * (1 << rec.GATE_FRAC)).astype(np.int64)
    real = q / (1 << rec.GATE_FRAC)
    sig = rec.lookup(q, rec.GATE_FRAC, rec.SIGMOID_TABLE) / rec.ONE
    tanh = rec.lookup(q, rec.GATE_FRAC, rec.TANH_TABLE) / rec.ONE
    inside = np.abs(real) <= 8
    sig_err = np.abs(sig - 1 / (1 + np.exp(-real)))
    assert np.max(sig_err[inside]) < 7e-5            # interpolation 4.7e-5 + rounding
    assert np.max(sig_err) < 3.4e-4                  # beyond +-8 the input saturates: 1 - sigmoid(8) = 3.35e-4
    assert np.max(np.abs(tanh - np.tanh(real))) < 4.5e-4   # interpolation 3.8e-4 + rounding
    assert np.all(np.diff(sig) >= 0) and np.all(np.diff(tanh) >= 0)   # monotone, as the functions
    # The cell state's int16 format: |c| < steps + max|c_0| never saturates.
    assert rec.cell_frac_bits(16, 0.0) == 11 and rec.cell_frac_bits(100, 0.0) == 8 and rec.cell_frac_bits(16, 1.0) == 10
    assert rec.lookup(np.array([1 << 30]), 8, rec.TANH_TABLE)[0] == rec.TANH_TABLE[-1]


def _lstm_graph(hidden=128, steps=6, batch=3, direction="forward", features=16):
    return lower_model(pytorch_lstm(steps=steps, features=features, hidden=hidden, direction=direction, batch=batch),
                       "lstm.onnx", batch=batch)


def _instructions(program, layer_index=0):
    return [ins for ins in program.instructions if ins.layer == layer_index]


def test_each_gate_drain_reads_its_own_columns_of_the_input_projection():
    """H = 128, B = 3, 6 steps: 4H = 512 gate columns in two 256-wide tiles; the hoisted input GEMM's two
    drains write tile n's 6 x 3 rows of 256 int16 (9216 bytes) contiguously. Step s's drain of tile n reads
    its 3 rows there, 3 x 256 x 2 = 1536 bytes at offset 1536 s: a step's two drains read its 3 x 512 x 2
    = 3072 bytes of input projection once."""
    steps, batch, tile_bytes = 6, 3, 3 * 256 * 2
    code = _instructions(compile_program(_lstm_graph(hidden=128, steps=steps, batch=batch), CONFIG))
    written = [ins.dst for ins in code if isinstance(ins, Activate) and ins.function == "requant"]
    assert [r.nbytes for r in written] == [steps * tile_bytes] * 2
    gate_drains = [ins for ins in code if isinstance(ins, Activate) and ins.function == "lstm_gates"]
    assert len(gate_drains) == steps * 2
    for s in range(steps):
        for n in range(2):
            sources = gate_drains[2 * s + n].sources
            assert [(r.addr, r.nbytes) for r in sources] == [(written[n].addr + s * tile_bytes, tile_bytes)]


def test_cell_and_hidden_passes_read_only_the_gates_they_use():
    """H = 128, B = 3, gates i, o, f, c in int16: the cell pass reads i, f, c (3 x 384 x 2 = 2304 bytes) and
    the cell state (3 x 128 x 2 = 768, none at step 0), the hidden pass o (768) and the cell state (768)."""
    code = _instructions(compile_program(_lstm_graph(hidden=128, steps=6, batch=3), CONFIG))
    read = {name: [sum(r.nbytes for r in ins.sources) for ins in code
                   if isinstance(ins, Activate) and ins.function == name] for name in ("lstm_cell", "lstm_hidden")}
    assert read == {"lstm_cell": [2304] + [2304 + 768] * 5, "lstm_hidden": [768 + 768] * 6}


@pytest.mark.parametrize("hoisted", [True, False])
def test_weights_are_fetched_every_step(hoisted):
    graph = _lstm_graph()
    cfg = CONFIG.replace(**{"mapping.recurrent_input": "hoisted" if hoisted else "per_step"})
    program = compile_program(graph, cfg)
    fetches = [ins for ins in _instructions(program) if isinstance(ins, ReadWeights)]
    w_bytes, r_bytes = 4 * 128 * 16, 4 * 128 * 128           # W (4H x I) and R (4H x H), int8
    steps = 6
    # R = 128 x 512: two column tiles, so each of steps 1..5 fetches both (step 0's h is zero: no multiply);
    # W once for all steps when hoisted, else every step.
    assert sum(f.nbytes for f in fetches) == (1 if hoisted else steps) * w_bytes + (steps - 1) * r_bytes
    sim = simulate_program(program, cfg, graph.batch)
    assert sim.layers[0].counts.weight_dram_bytes == sum(f.nbytes for f in fetches)
    multiplies = [ins for ins in _instructions(program) if isinstance(ins, MatrixMultiply)]
    assert {ins.m_rows for ins in multiplies} == ({steps * 3} | {3} if hoisted else {3})
    assert sim.layers[0].macs == steps * 3 * 16 * 512 + (steps - 1) * 3 * 128 * 512


def test_hoisting_is_faster_and_computes_the_same_integers():
    graph = _lstm_graph(hidden=256, steps=8)
    per_step = simulate(graph, CONFIG.replace(**{"mapping.recurrent_input": "per_step"}))
    hoisted = simulate(graph, CONFIG)
    assert hoisted.total_cycles < per_step.total_cycles
    assert hoisted.macs == per_step.macs
    assert per_step.counts.weight_dram_bytes - hoisted.counts.weight_dram_bytes == 7 * 4 * 256 * 16


def test_single_tile_recurrent_weights_stay_in_the_array_unless_displaced():
    one = compile_program(_lstm_graph(hidden=64), CONFIG)                      # R = 64 x 256: one tile
    fetched = [ins.nbytes for ins in _instructions(one) if isinstance(ins, ReadWeights)]
    assert fetched == [4 * 64 * 16, 4 * 64 * 64]                              # W once, R once
    both = compile_program(_lstm_graph(hidden=64, direction="bidirectional"), CONFIG)
    r_fetches = [ins for ins in _instructions(both) if isinstance(ins, ReadWeights) and ins.rows == 64]
    assert len(r_fetches) == 2 * 5                                            # the directions alternate


def test_a_direct_path_keeps_the_recurrent_weights_on_chip():
    # R = 256 x 1024: four 64 KiB tiles a step, 4 x 1420 cycles from DDR3; from the unified buffer 4 x 256.
    graph = _lstm_graph(hidden=256, steps=12)
    direct = CONFIG.replace(**{"computed_weights.path": "direct"})
    program = compile_program(graph, direct)
    code = _instructions(program)
    r_bytes = 4 * 256 * 256
    assert sum(ins.nbytes for ins in code if isinstance(ins, ReadWeights)) == 4 * 256 * 16      # W only
    assert sum(ins.nbytes for ins in code if isinstance(ins, ReadWeightsFromUb)) == 11 * r_bytes
    on_chip, off_chip = simulate_program(program, direct, 3), simulate(graph, CONFIG)
    assert on_chip.counts.host_in_bytes - off_chip.counts.host_in_bytes == r_bytes   # brought on chip once
    assert on_chip.total_cycles < off_chip.total_cycles / 2
    # weight stall is waiting for a tile: each step's four tiles now take 256 cycles each on the direct path
    # instead of 1,420 from DDR3 (a ratio of 0.18), plus the one load over PCIe before the first step
    assert on_chip.layers[0].breakdown.weight_stall < off_chip.layers[0].breakdown.weight_stall / 3


def test_recurrent_step_equals_the_pe_level_array_on_the_same_tiles():
    """One step's recurrent GEMM (M = batch 3, K = H = 128, N = 4H = 512: two tiles) as the timeline streams
    it, against the cycle-stepped array given the same tiles: same cycle count, same accumulators."""
    systolic = pytest.importorskip("tpusim.kernels.systolic")
    graph = _lstm_graph(hidden=128, steps=4, batch=3)
    cfg = CONFIG.replace(**FAST)
    sim = simulate(graph, cfg)
    rows = cfg.array.rows
    trace = sim.trace
    mine = np.flatnonzero(trace.mxu_layer == 0)
    # Hoisted input GEMM (one fold x two column tiles), then steps 1..3 with two R tiles each.
    assert len(mine) == 2 + 3 * 2
    x = np.asarray(synthetic_inputs((4, 16), 1, 3).inputs)
    data = synthetic_inputs((4, 16), 8, 0)
    model = pytorch_lstm(steps=4, features=16, hidden=128, batch=3)
    stats = collect_statistics(model, graph, data, 2048)
    qgraph = quantize_graph(graph, stats, CONFIG.quant)
    x = np.repeat(x, 3, axis=0)
    ql = qgraph.layers[0]
    y = run_integer(qgraph, x, keep_all=True).tensors[ql.layer.output]        # (B, T, 1, H)
    direction = ql.layer.attr("integers").directions[0]
    r_t = direction.r_q.T.astype(np.int8)                                      # (K = H, N = 4H)
    for step in (1, 2, 3):
        h_prev = y[:, step - 1, 0]
        run = systolic.pe_array_run([h_prev, h_prev], [r_t[:, :256], r_t[:, 256:]], rows, cfg.array.cols)
        first, last = mine[2 + 2 * (step - 1)], mine[2 + 2 * (step - 1) + 1]
        assert trace.last_output[last] - trace.stream_start[first] == run.cycles - rows
        assert trace.stream_start[last] - trace.stream_start[first] == run.stream_starts[1] - run.stream_starts[0]
        exact = h_prev.astype(np.int64) @ r_t.astype(np.int64) + direction.bias_h
        np.testing.assert_array_equal(np.concatenate(run.outputs, axis=1) + direction.bias_h, exact)


def test_step_dependence_is_a_raw_stall_worked_out_by_hand():
    """Fast weights: step t+1's first recurrent multiply waits for step t's h. From the config: the last
    tile's first accumulator row is final R + C - 1 cycles after it starts; its drain takes B passes, then
    the cell and hidden passes ceil(B H / lanes) each, each result written 16 cycles (the activation
    pipeline) before the next pass may read it. Ports never wait, so that no port contention adds to it."""
    cfg = CONFIG.replace(**FAST, **UNLIMITED_PORTS)
    hidden, batch = 128, 3
    sim = simulate(_lstm_graph(hidden=hidden, batch=batch), cfg)
    rows, cols, lanes = cfg.array.rows, cfg.array.cols, cfg.activation_unit.lanes
    latency = cfg.activation_unit.pipeline_latency_cycles
    starts = sim.trace.stream_start[np.flatnonzero(sim.trace.mxu_layer == 0)][2:]    # R tiles of steps 1..5
    gap = rows + (rows + cols - 1) + batch + 2 * -(-batch * hidden // lanes) + 3 * latency
    assert np.all(np.diff(starts[::2]) == gap)
    b = sim.layers[0].breakdown
    assert b.raw_stall >= 4 * (gap - rows - batch) and b.weight_stall <= 1   # the first fetch: 1 cycle


def test_layers_csv_gets_a_steps_column(tmp_path):
    from tpusim import pipeline

    import onnx

    path = tmp_path / "lstm.onnx"
    onnx.save(pytorch_lstm(steps=12), str(path))
    result = pipeline.run(pipeline.RunOptions(config="configs/tpu_v1.yaml", model=str(path), out_dir=tmp_path / "out",
                                              batch=5, quantize=False))
    row = next(r for r in result.layer_rows if r["op"] == "lstm")
    assert (row["steps"], row["M"], row["K"], row["N"], row["groups"]) == (12, 60, 48, 128, 1)
    assert row["cycles"] > 0 and row["raw_stall_cycles"] > 0
    assert all(r["steps"] == 0 for r in result.layer_rows if r["op"] != "lstm")
    header = (tmp_path / "out" / "layers.csv").read_text().splitlines()[0].split(",")
    assert "steps" in header


def test_bad_recurrent_nodes_are_one_line_model_errors():
    g = GraphBuilder((1, 5, 4))
    w, r = g.weight((1, 16, 4)), g.weight((1, 16, 4))
    x = g.node("Transpose", [g.input_name], perm=[1, 0, 2])
    outs = [g.name("y"), g.name("yh"), g.name("yc")]
    g.nodes.append(__import__("onnx").helper.make_node("LSTM", [x, w, r], outs, name="lstm_node", hidden_size=4))
    model = g.model(outs[1])
    with pytest.raises(ModelError, match=r"m\.onnx: node 'lstm_node' \(LSTM\): output .* Y_h .* is read"):
        lower_model(model, "m.onnx")
    g = GraphBuilder((5, 1, 4))
    y = g.node("LSTM", [g.input_name, g.weight((1, 16, 4)), g.weight((1, 16, 4))], hidden_size=4)
    with pytest.raises(ModelError, match="time|sequence, batch, features"):
        lower_model(g.model(y), "m.onnx")
    with pytest.raises(ModelError, match="peephole"):
        lower_model(_with_peepholes(), "m.onnx")
    with pytest.raises(ModelError, match="clip"):
        lower_model(pytorch_lstm(steps=3, features=4, hidden=4, clip=3.0), "m.onnx")


def _with_peepholes():
    model = pytorch_lstm(steps=3, features=4, hidden=4)
    node = next(n for n in model.graph.node if n.op_type == "LSTM")
    from onnx import numpy_helper

    model.graph.initializer.append(numpy_helper.from_array(np.ones((1, 12), np.float32), "peep"))
    while len(node.input) < 7:
        node.input.append("")
    node.input.append("peep")
    return model


def test_cli_refuses_a_time_major_input_in_one_line(tmp_path, capsys):
    import onnx

    from tpusim.cli import main

    g = GraphBuilder((5, 1, 4))
    y = g.node("LSTM", [g.input_name, g.weight((1, 16, 4)), g.weight((1, 16, 4))], hidden_size=4)
    path = tmp_path / "tm.onnx"
    onnx.save(g.model(y), str(path))
    args = ["run", "configs/tpu_v1.yaml", "--model", str(path), "--out", str(tmp_path / "o"), "--no-progress"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "tm.onnx" in err[0] and "LSTM" in err[0] and "batch_first" in err[0]


def test_reference_matches_onnxruntime_at_another_batch():
    model = pytorch_lstm(direction="bidirectional")
    x = np.asarray(synthetic_inputs((12, 16), 4, 11).inputs)
    graph = check_reference(model, x)
    assert graph.batch == 4 and graph.layers[0].input_shapes[0] == (4, 12, 16)


def test_per_tensor_and_per_channel_weights_both_meet_the_bound():
    model = pytorch_lstm(hidden=48)
    data = synthetic_inputs((12, 16), 8, 0)
    graph = lower_model(model, "m.onnx", batch=2)
    stats = collect_statistics(model, graph, data, 2048)
    from op_checks import sqnr_db
    from tpusim.frontend import run_reference

    x = data.inputs[:2]
    ref = run_reference(graph, x)[graph.outputs[0]]
    for weights in ("per-tensor", "per-channel"):
        qgraph = quantize_graph(graph, stats, dataclasses.replace(CONFIG.quant, weights=weights))
        assert sqnr_db(ref, run_integer(qgraph, x).dequantized[graph.outputs[0]]) > MIN_SQNR_DB
