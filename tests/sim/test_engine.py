"""Timeline engine: exact cycle counts derived by hand from the config, and counting invariants."""
import dataclasses
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tpusim.config import load_config
from tpusim.ir import Activation, ConvAttrs, GemmShape, Graph, Layer, PoolAttrs
from tpusim.kernels.systolic import pe_array_reference, pe_array_run
from tpusim.mapping.isa import (Activate, LayerMapping, MatrixMultiply, Program, ReadHostMemory, ReadWeights, Sync,
                                UbRegion)
from tpusim.mapping.tiler import _Compiler, rebatched
from tpusim.report.run_report import summary
from tpusim.sim import compile_program, simulate, simulate_program, transfer_cycles
from tpusim.sim.engine import UbPorts

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "tpu_v1.yaml"
BASE = load_config(CONFIG)
R, C = BASE.array.rows, BASE.array.cols
LATENCY = BASE.activation_unit.pipeline_latency_cycles
RELU = Activation("relu", 0.0)
# every unified-buffer transfer takes 1 cycle and finds a free port (3 readers, 2 writers at most at once)
UNLIMITED_UB = {"unified_buffer.read_ports": 3, "unified_buffer.write_ports": 2,
                "unified_buffer.port_bytes_per_cycle": 2.0 ** 40}
FAST_HOST = {"host.bandwidth_gb_s": 1e6, "host.latency_cycles": 0, **UNLIMITED_UB}  # every host transfer: 1 cycle
FAST_WEIGHTS = {"weight_memory.bandwidth_gb_s": 1e6, "weight_memory.latency_cycles": 0}
SPILL = {"mapping.sub_batching": False}  # run the whole batch at once, spilling what does not fit


def cfg(**overrides):
    return BASE.replace(**overrides)


SPILL_CFG = cfg(**SPILL)


def zeros(*shape):
    return np.broadcast_to(np.int8(0), shape)


def gemm_layer(name, x, m, k, n, activation=Activation()):
    return Layer(name, "gemm", (x,), name, ((m, k),), (m, n), activation, weight=zeros(n, k))


def gemm_graph(m, k, n):
    return Graph("g", "x", (m, k), ("fc",), (gemm_layer("fc", "x", m, k, n),))


def conv_layer(name, x, in_shape, c_out, k, stride=1, groups=1, activation=RELU):
    n, c, h, w = in_shape
    p = k // 2
    out = (n, c_out, (h + 2 * p - k) // stride + 1, (w + 2 * p - k) // stride + 1)
    attrs = ConvAttrs((k, k), (stride, stride), (p, p, p, p), (1, 1), groups)
    return Layer(name, "conv", (x,), name, (in_shape,), out, activation, weight=zeros(c_out, c // groups, k, k),
                 conv=attrs)


def small_cnn():
    conv1 = conv_layer("conv1", "x", (2, 3, 32, 32), 64, 3)
    pool = Layer("pool", "maxpool", ("conv1",), "pool", (conv1.output_shape,), (2, 64, 16, 16),
                 pool=PoolAttrs((2, 2), (2, 2), (0, 0, 0, 0), False, False))
    conv2 = conv_layer("conv2", "pool", pool.output_shape, 64, 3)
    dw = conv_layer("dw", "conv2", conv2.output_shape, 64, 3, groups=64)
    add = Layer("add", "add", ("dw", "pool"), "add", (dw.output_shape, pool.output_shape), dw.output_shape, RELU)
    gap = Layer("gap", "global_avgpool", ("add",), "gap", (add.output_shape,), (2, 64, 1, 1))
    flat = Layer("flat", "reshape", ("gap",), "flat", ((2, 64, 1, 1),), (2, 64))
    fc = gemm_layer("fc", "flat", 2, 64, 10)
    soft = Layer("soft", "softmax", ("fc",), "soft", ((2, 10),), (2, 10))
    return Graph("cnn", "x", (2, 3, 32, 32), ("soft",), (conv1, pool, conv2, dw, add, gap, flat, fc, soft))


@pytest.mark.parametrize("m", [100, 300])
def test_weights_ready_gemm_equals_closed_form(m):
    tiles = 4
    hw = cfg(**FAST_HOST, **FAST_WEIGHTS)
    result = simulate(gemm_graph(m, tiles * R, C), hw)
    closed = R + (tiles - 1) * max(m, R) + m + R + C - 2
    trace = result.trace
    assert trace.last_output[-1] - trace.shift_start[0] == closed
    # fetch 1 + closed form + first accumulator row lag 1 + latency + 1-cycle host write
    assert result.total_cycles == 1 + closed + 1 + LATENCY + 1
    b = result.layers[0].breakdown
    assert b.active == tiles * m
    # the 1-cycle weight fetch overlaps the 1-cycle input transfer: no cycle waits for the weight memory
    assert b.input_stall == 1 and b.weight_stall == 0
    assert b.weight_shift == R + (tiles - 1) * max(0, R - m)
    assert b.total == result.total_cycles


def test_fetch_landing_during_the_previous_stream_is_weight_shift_not_weight_stall():
    m, tiles = 200, 4
    fetch = transfer_cycles(R * C, 200.0, 700.0, 70)
    assert fetch == 230 + 70  # R < fetch < R + M: each tile lands while the one before it streams
    result = simulate(gemm_graph(m, tiles * R, C), cfg(**FAST_HOST, **{"weight_memory.bandwidth_gb_s": 200.0}))
    b = result.layers[0].breakdown
    # Only tile 0 is waited for (cycles 1-299, after the 1-cycle input). Tile i+1 is in the FIFO at
    # 300 (i + 2), before tile i stops streaming at 300 (i + 1) + R + M; its shift, started on arrival,
    # ends fetch - M = 100 cycles after that stream: those idle cycles wait for a shift, not the memory.
    assert (b.input_stall, b.weight_stall, b.active) == (1, fetch - 1, tiles * m)
    assert b.weight_shift == R + (tiles - 1) * (fetch - m) == 556
    assert result.total_cycles == 1 + (fetch - 1) + R + tiles * m + (tiles - 1) * (fetch - m) + (R + C - 1) + LATENCY + 1


def test_without_weight_double_buffering_each_fold_shifts_streams_and_drains_alone():
    m, tiles = 100, 4
    hw = cfg(**FAST_HOST, **FAST_WEIGHTS, **{"array.weight_double_buffering": False})
    result = simulate(gemm_graph(m, tiles * R, C), hw)
    trace = result.trace
    fold = 2 * R + C + m - 2
    assert trace.last_output[-1] - trace.shift_start[0] == tiles * fold == 3464
    assert np.array_equal(np.diff(trace.stream_start), [fold] * (tiles - 1))
    b = result.layers[0].breakdown
    # every later fold waits for the array to drain (R + C - 2 after its last input) and then for its
    # own R-cycle shift, its weights long in the FIFO: all weight shift
    assert (b.weight_stall, b.weight_shift, b.active) == (0, R + (tiles - 1) * (2 * R + C - 2), tiles * m)
    # bound by the weight memory, the drain hides behind the fetch: the same time as with shadow registers
    dram_bound = gemm_graph(64, tiles * R, C)
    assert simulate(dram_bound, cfg(**FAST_HOST, **{"array.weight_double_buffering": False})).layers == \
        simulate(dram_bound, cfg(**FAST_HOST)).layers


def test_weights_ready_matches_systolic_kernel():
    systolic = pytest.importorskip("tpusim.kernels.systolic")
    m, tiles = 77, 3
    result = simulate(gemm_graph(m, tiles * R, C), cfg(**FAST_HOST, **FAST_WEIGHTS))
    span = result.trace.last_output[-1] - result.trace.shift_start[0]
    assert span == systolic.tile_sequence_cycles(m, tiles, R, C)


def array_tiles(program):
    """The program's weight tiles as the PE-level array streams them: (M, k, n) per weight load, a
    multiply that keeps the array's weights adding its rows to the tile before it."""
    tiles = []
    for ins in program.instructions:
        if isinstance(ins, MatrixMultiply):
            if ins.load_weights:
                tiles.append([ins.m_rows, ins.k_rows, ins.n_cols])
            else:
                tiles[-1][0] += ins.m_rows
    return tiles


def engine_and_array(hw, m, k, n):
    """The engine's stream starts and span on a one-GEMM program, and the PE-level array's on its tiles
    (cycle 0 = the first weight shift's first cycle in both)."""
    program = compile_program(gemm_graph(m, k, n), hw)
    trace = simulate_program(program, hw, 1).trace
    origin = int(trace.shift_start[0])
    loads = trace.shift_start >= 0
    engine = ([int(s) - origin for s in trace.stream_start[loads]], int(trace.last_output[-1]) - origin)
    tiles = array_tiles(program)
    run = pe_array_run([np.zeros((mm, kk), np.int8) for mm, kk, _ in tiles],
                       [np.zeros((kk, nn), np.int8) for _, kk, nn in tiles], hw.array.rows, hw.array.cols,
                       weight_double_buffering=hw.array.weight_double_buffering)
    return engine, (list(run.stream_starts), run.cycles), tiles


@settings(derandomize=True, max_examples=150, deadline=None)
@given(rows=st.integers(1, 24), cols=st.integers(1, 24), m=st.integers(1, 300), k=st.integers(1, 80),
       n=st.integers(1, 80), spare_rows=st.integers(0, 200), double_buffering=st.booleans())
def test_engine_with_weights_always_ready_equals_the_pe_array(rows, cols, m, k, n, spare_rows,
                                                                double_buffering):
    # Accumulator halves of more than C rows: the array writes a row again only after its drain has read
    # it (too few rows do stall the array: next test). Per-tensor scales: one scale load per layer, hidden
    # behind the first drain (per-channel loads, one per column tile, are tested on their own).
    half = cols + 1 + spare_rows
    hw = cfg(**FAST_HOST, **FAST_WEIGHTS, **{
        "array.rows": rows, "array.cols": cols, "accumulators.entries": 2 * half,
        "array.weight_double_buffering": double_buffering, "quant.weights": "per-tensor"})
    engine, array, _ = engine_and_array(hw, m, k, n)
    assert engine == array


@pytest.mark.parametrize("double_buffering", [True, False])
@pytest.mark.parametrize("rows, cols, m, k, n, entries", [
    (8, 8, 5, 20, 20, 64),    # 3 K folds (8, 8, 4) x 3 column tiles (8, 8, 4), M < R
    (16, 8, 12, 40, 20, 64),  # 3 K folds (16, 16, 8) x 3 column tiles, M < R
    (8, 8, 20, 16, 24, 64),   # 2 K folds x 3 column tiles, M > R: tiles stream back to back
    (8, 8, 30, 16, 16, 18),   # M in chunks of 9, 9, 9, 3: 2 K folds re-fetched per chunk x 2 column tiles
])
def test_register_level_array_agrees_with_the_kernel_and_the_engine(rows, cols, m, k, n, entries,
                                                                     double_buffering):
    hw = cfg(**FAST_HOST, **FAST_WEIGHTS, **{"array.rows": rows, "array.cols": cols,
                                            "accumulators.entries": entries, "quant.weights": "per-tensor",
                                            "array.weight_double_buffering": double_buffering})
    engine, _, tiles = engine_and_array(hw, m, k, n)
    rng = np.random.default_rng(rows * m + k)
    x_tiles = [rng.integers(-128, 128, (mm, kk)).astype(np.int8) for mm, kk, _ in tiles]
    w_tiles = [rng.integers(-128, 128, (kk, nn)).astype(np.int8) for _, kk, nn in tiles]
    reference = pe_array_reference(x_tiles, w_tiles, rows, cols, weight_double_buffering=double_buffering)
    kernel = pe_array_run(x_tiles, w_tiles, rows, cols, weight_double_buffering=double_buffering)
    assert (list(reference.stream_starts), reference.cycles) == (list(kernel.stream_starts), kernel.cycles) == engine
    for x, w, got, fast in zip(x_tiles, w_tiles, reference.outputs, kernel.outputs):
        assert np.array_equal(got[:, :w.shape[1]], x.astype(np.int64) @ w.astype(np.int64))
        assert np.array_equal(got, fast)


def test_too_few_accumulator_rows_stall_the_array():
    # 1-row chunks in a 2-row ring on a 1x2 array: chunk 2 reuses chunk 0's row, which is drained
    # (read) in cycle s0 + R + C - 1 = s0 + 2; its first write, at s2 + R - 1, must come after that.
    hw = cfg(**FAST_HOST, **FAST_WEIGHTS, **{"array.rows": 1, "array.cols": 2, "accumulators.entries": 2})
    (starts, span), (_, array_span), tiles = engine_and_array(hw, 3, 1, 1)
    assert tiles == [[3, 1, 1]] and array_span == 5
    assert span == 6
    result = simulate(gemm_graph(3, 1, 1), hw)
    assert list(np.diff(result.trace.stream_start)) == [1, 2]


def test_engine_equals_the_pe_array_on_the_issues_multi_column_tile_layers():
    # Three 100-row column tiles fit one accumulator half side by side: none waits for another's drain.
    assert engine_and_array(cfg(**FAST_HOST, **FAST_WEIGHTS), 100, 256, 768)[0][1] == 1378
    assert engine_and_array(cfg(**FAST_HOST, **FAST_WEIGHTS), 49, 160, 960)[0][1] == 1583


def test_dram_bound_gemm_exposes_every_tiles_full_shift_after_its_fetch():
    m, tiles = 64, 4
    fetch = transfer_cycles(R * C, 34.0, 700.0, 70)
    assert fetch == 1350 + 70  # 65536 B at 34 GB/s / 700 MHz = 1349.3 cycles, rounded up, plus latency
    result = simulate(gemm_graph(m, tiles * R, C), cfg(**FAST_HOST))
    b = result.layers[0].breakdown
    # Each tile arrives after the previous one has streamed, then shifts for R cycles with nothing to
    # overlap: the wait for the weight memory is weight stall, the R-cycle shift weight shift. The first
    # cycle is the input's 1-cycle host transfer; the first tile's fetch lands 1,419 cycles later.
    assert b.input_stall == 1
    assert b.weight_stall == (fetch - 1) + (tiles - 1) * (fetch - R - m) == 1419 + 3 * 1100
    assert b.weight_shift == tiles * R
    assert b.active == tiles * m
    assert result.total_cycles == tiles * fetch + R + (R + C - 1) + m + LATENCY + 1
    assert np.array_equal(np.diff(result.trace.stream_start), [fetch] * (tiles - 1))


# A latency-bound weight memory: 448 GB/s is 640 B/cycle at 700 MHz, so a 64 KiB tile streams in
# ceil(102.4) = 103 cycles after a 1,000-cycle latency; a deep FIFO leaves the requests in flight as the
# only limit on how far fetches run ahead.
SLOW_TURNAROUND = {**FAST_HOST, "weight_memory.bandwidth_gb_s": 448.0, "weight_memory.latency_cycles": 1000,
                   "weight_fifo.depth_tiles": 16}
LATENCY_BOUND_X = 103


def latency_bound_run(in_flight, **overrides):
    return simulate(gemm_graph(64, 8 * R, C),
                    cfg(**{**SLOW_TURNAROUND, "weight_memory.requests_in_flight": in_flight, **overrides}))


def test_one_request_in_flight_serialises_latency_and_transfer_as_before():
    assert BASE.weight_memory.requests_in_flight == 1
    result = latency_bound_run(1)
    turnaround = 1000 + LATENCY_BOUND_X
    assert transfer_cycles(R * C, 448.0, 700.0, 1000) == turnaround
    assert np.array_equal(result.trace.fetch_start, [turnaround * i for i in range(8)])
    assert np.array_equal(result.trace.fetch_end, [turnaround * (i + 1) for i in range(8)])
    # each tile arrives long after the previous one has streamed: last arrival, its shift, its stream,
    # the drain to the first accumulator row, the activation unit, the 1-cycle host write
    assert result.total_cycles == 8 * turnaround + R + 64 + (R + C - 1) + LATENCY + 1 == 9672


@pytest.mark.parametrize("in_flight, ends, total", [
    # request i issues when request i - N has finished: N latencies overlap, their data follow each
    # other on the bus 103 cycles apart, and the next group's latency starts as the first of this one ends
    (2, [1103, 1206, 2206, 2309, 3309, 3412, 4412, 4515], 5516),
    (4, [1103, 1206, 1309, 1412, 2206, 2309, 2412, 2515], 3822),
])
def test_requests_in_flight_overlap_latencies_and_share_the_bandwidth(in_flight, ends, total):
    result = latency_bound_run(in_flight)
    assert np.array_equal(result.trace.fetch_end, ends)
    assert np.array_equal(result.trace.fetch_start, [0] * in_flight + ends[:8 - in_flight])
    # within a group the tiles arrive 103 cycles apart, faster than the array's 256-cycle shifts: the
    # last group's first arrival, one shift per tile of the group, the last tile's stream and the drain
    last_group_arrival = ends[8 - in_flight]
    assert result.total_cycles == last_group_arrival + in_flight * R + 64 + (R + C - 1) + LATENCY + 1 == total


def test_bandwidth_not_latency_bounds_a_memory_with_enough_requests_in_flight():
    # 8 requests at once: every latency overlaps and the bus streams the tiles back to back
    assert np.array_equal(latency_bound_run(8).trace.fetch_end, [1000 + LATENCY_BOUND_X * (i + 1) for i in range(8)])


def test_the_fifo_depth_still_bounds_how_far_fetches_run_ahead():
    result = latency_bound_run(4, **{"weight_fifo.depth_tiles": 2})
    trace = result.trace
    shift_end = trace.shift_start + R  # every multiply of this one-row-chunk GEMM loads a tile
    # tiles 0 and 1 issue at once; tile i >= 2 waits for tile i - 2 to leave its FIFO slot for the array
    assert np.array_equal(trace.fetch_start[:2], [0, 0])
    assert np.array_equal(trace.fetch_start[2:], shift_end[:-2])
    assert (trace.fetch_start[2], trace.fetch_end[2]) == (1103 + R, 1103 + R + 1000 + LATENCY_BOUND_X)


def test_faster_weight_memory_hides_the_later_shifts_behind_streaming():
    m, tiles = 64, 4
    graph = gemm_graph(m, tiles * R, C)
    ddr3 = simulate(graph, cfg(**FAST_HOST)).layers[0].breakdown
    fast_cfg = cfg(**FAST_HOST, **{"weight_memory.bandwidth_gb_s": 320.0})
    fetch = transfer_cycles(R * C, 320.0, 700.0, 70)
    assert fetch == 144 + 70  # 65536 B at 457.1 B/cycle, rounded up, plus latency
    fast = simulate(graph, fast_cfg).layers[0].breakdown
    # Only the first fetch is waited for; every later tile is in the FIFO before the previous tile
    # starts streaming, so its shift overlaps that stream and exposes only R - M cycles.
    assert fast.weight_stall == fetch - 1
    assert fast.weight_shift == R + (tiles - 1) * (R - m)
    assert (fast.active, fast.non_matrix) == (ddr3.active, ddr3.non_matrix)
    assert ddr3.total - fast.total == ddr3.weight_stall + ddr3.weight_shift - fast.weight_stall - fast.weight_shift


def test_breakdown_tiles_the_run_exactly():
    graph = small_cnn()
    result = simulate(graph, BASE)
    for layer in result.layers:
        b = layer.breakdown
        assert b.active + b.weight_stall + b.weight_shift + b.non_matrix == b.total
        assert b.useful_mac + b.unused_mac == b.active
        assert b.raw_stall + b.input_stall <= b.non_matrix
        assert layer.counts.mac_slots == b.active * R * C
    assert sum(layer.cycles for layer in result.layers) == result.total_cycles == result.breakdown.total
    assert [layer.macs for layer in result.layers] == [layer.macs for layer in graph.layers]
    assert result.macs == graph.macs
    assert result.layers[graph.layers.index(graph.producer("flat"))].cycles == 0
    assert result.breakdown.input_stall > 0 and result.breakdown.raw_stall > 0
    program = compile_program(graph, BASE)
    weights = sum(ins.nbytes for ins in program.instructions if type(ins).__name__ == "ReadWeights")
    assert result.counts.weight_dram_bytes == weights == sum(layer.weight_count for layer in graph.layers)


def test_batch_raises_macs_per_weight_byte_and_utilization():
    one = simulate(gemm_graph(1, 512, 512), BASE)
    many = simulate(gemm_graph(64, 512, 512), BASE)
    assert one.counts.weight_dram_bytes == many.counts.weight_dram_bytes == 512 * 512
    assert many.macs / many.counts.weight_dram_bytes == 64 * one.macs / one.counts.weight_dram_bytes
    assert many.layers[0].utilization > one.layers[0].utilization
    assert many.inferences_per_s > one.inferences_per_s


def test_depthwise_packing_raises_utilization_and_cuts_cycles():
    layer = conv_layer("dw", "x", (1, 64, 16, 16), 64, 3, groups=64)
    graph = Graph("dw", "x", (1, 64, 16, 16), ("dw",), (layer,))
    packed = simulate(graph, BASE)
    single = simulate(graph, cfg(**{"mapping.pack_groups": False}))
    p_map = compile_program(graph, BASE).mappings[0]
    s_map = compile_program(graph, cfg(**{"mapping.pack_groups": False})).mappings[0]
    assert (p_map.groups_per_tile, p_map.weight_tiles) == (28, 3)  # floor(256 / 9) groups per tile
    assert (s_map.groups_per_tile, s_map.weight_tiles) == (1, 64)
    assert p_map.mapping_utilization == 64 * 9 / (3 * R * C)
    assert s_map.mapping_utilization == 9 / (R * C)
    assert packed.counts.weight_dram_bytes == single.counts.weight_dram_bytes == 64 * 9
    assert packed.macs == single.macs == 256 * 64 * 9
    assert packed.total_cycles < single.total_cycles
    assert packed.layers[0].utilization > single.layers[0].utilization
    assert packed.layers[0].breakdown.active == 3 * 256 and single.layers[0].breakdown.active == 64 * 256


def test_unified_buffer_spill_is_counted():
    first = gemm_layer("fc1", "x", 512, 64, 256)
    second = gemm_layer("fc2", "fc1", 512, 256, 64)
    graph = Graph("chain", "x", (512, 64), ("fc2",), (first, second))
    roomy = simulate(graph, BASE)
    small = simulate(graph, cfg(**SPILL, **{"unified_buffer.capacity_bytes": 96 * 1024}))
    assert roomy.counts.spill_bytes == 0
    # fc1's 128 KiB output cannot live in 96 KiB: written out by fc1, read back by fc2
    assert [layer.counts.spill_bytes for layer in small.layers] == [512 * 256, 512 * 256]
    assert small.counts.host_in_bytes == 512 * 64 + 512 * 256
    assert small.counts.host_out_bytes == 512 * 256 + 512 * 64
    assert small.total_cycles > roomy.total_cycles
    assert small.macs == roomy.macs


@pytest.mark.parametrize("rows", [2048, 100])
def test_per_channel_extra_pass_costs_cycles_native_equals_per_tensor(rows):
    graph = gemm_graph(rows, R, C)
    native = simulate(graph, cfg(**FAST_HOST))
    extra = simulate(graph, cfg(**FAST_HOST, **{"activation_unit.per_channel_requant": "extra_pass"}))
    tensor = simulate(graph, cfg(**FAST_HOST, **{"quant.weights": "per-tensor"}))
    assert native.total_cycles == tensor.total_cycles
    assert extra.total_cycles - native.total_cycles == rows  # one more vector pass per output vector
    assert native.counts.requant_scale_bytes == C * 5 and tensor.counts.requant_scale_bytes == 5
    assert native.counts.requant_ops == rows * C
    # The extra pass writes the scaled accumulators back and reads them again, and multiplies once more.
    assert extra.counts.requant_ops == 2 * rows * C
    assert extra.counts.acc_write_bytes - native.counts.acc_write_bytes == rows * C * 4
    assert extra.counts.acc_read_bytes - native.counts.acc_read_bytes == rows * C * 4


@pytest.mark.parametrize("m, path_bytes, exposed", [
    (300, 256, 5),    # M >= R: drains back to back, tile 1's 5-cycle load (256 x 5 B at 256 B/cycle) between them
    (100, 256, 0),    # M < R: the unit idles R - M = 156 cycles between drains, the load hides there
    (100, 4, 164),    # a 4 B/cycle path: the 320-cycle load hides 156 of its cycles
])
def test_per_channel_scale_loads_hide_behind_the_drain_or_not(m, path_bytes, exposed):
    graph = gemm_graph(m, R, 2 * C)  # two column tiles, each with its own 256 channels' scales
    path = {"activation_unit.scale_path_bytes_per_cycle": path_bytes}
    channel = simulate(graph, cfg(**FAST_HOST, **FAST_WEIGHTS, **path))
    tensor = simulate(graph, cfg(**FAST_HOST, **FAST_WEIGHTS, **path, **{"quant.weights": "per-tensor"}))
    assert channel.counts.requant_scale_bytes == 2 * C * 5 and tensor.counts.requant_scale_bytes == 5
    # tile 0's load, like the per-tensor one, overlaps the array's first R + C - 1 cycles of latency
    assert channel.total_cycles - tensor.total_cycles == exposed
    assert np.array_equal(channel.trace.stream_start, tensor.trace.stream_start)


def test_accumulator_chunks_drain_without_stalls_when_activation_keeps_up():
    result = simulate(gemm_graph(3 * 2048, R, C), cfg(**FAST_HOST, **FAST_WEIGHTS))
    assert np.array_equal(np.diff(result.trace.stream_start), [2048, 2048])
    assert result.counts.acc_read_bytes == 3 * 2048 * C * 4
    assert result.counts.acc_write_bytes == 3 * 2048 * C * 4


def test_counts_follow_the_program():
    result = simulate(gemm_graph(100, 2 * R, 2 * C), BASE)
    c = result.counts
    assert c.weight_dram_bytes == c.weight_fifo_bytes == 4 * R * C
    assert c.ub_read_bytes == 2 * 100 * 2 * R + 100 * 2 * C  # input per column tile + output to host
    assert c.acc_write_bytes == 4 * 100 * C * 4
    assert c.acc_read_bytes == 2 * 100 * C * 4 + 2 * 100 * C * 4  # accumulate-in-place + drain
    assert c.weight_shift_bytes == 4 * C * R * (R + 1) // 2
    assert c.host_in_bytes == 100 * 2 * R and c.host_out_bytes == 100 * 2 * C


def test_resnet_sized_run_is_fast():
    import time

    layers, shape, x = [], (1, 64, 64, 64), "x"
    for i in range(40):
        layer = conv_layer(f"c{i}", x, shape, 64, 3)
        layers.append(layer)
        x, shape = layer.output, layer.output_shape
    graph = Graph("deep", "x", (1, 64, 64, 64), (x,), tuple(layers))
    start = time.perf_counter()
    result = simulate(graph, BASE)
    assert time.perf_counter() - start < 2.0
    assert result.macs == graph.macs


def test_vector_layers_stage_host_resident_operands():
    graph = small_cnn()
    result = simulate(graph, cfg(**SPILL, **{"unified_buffer.capacity_bytes": 24 * 1024}))
    pool = result.layers[1]
    # conv1's 128 KiB output lives in host memory: the pool reads it back and spills its own 32 KiB output
    assert pool.counts.spill_bytes == 2 * 64 * 32 * 32 + 2 * 64 * 16 * 16
    assert sum(layer.cycles for layer in result.layers) == result.total_cycles
    assert result.macs == graph.macs


@pytest.fixture(scope="module")
def resnet50():
    from tpusim.frontend import load_onnx
    from tpusim.pipeline import resolve_model

    path = resolve_model("resnet50")
    return {batch: load_onnx(path, batch=batch) for batch in (1, 8, 16, 32)}


def test_sub_batched_resnet50_batch_32_fits_and_keeps_its_throughput(resnet50):
    graph = resnet50[32]
    program = compile_program(graph, BASE)
    result = simulate_program(program, BASE, graph.batch)
    assert result.counts.spill_bytes == 0
    assert result.sub_batch == program.sub_batch == 9 and program.pass_batches == (9, 9, 9, 5)
    assert summary(graph, result, BASE)["sub_batch"] == result.sub_batch
    # within 0.1 % of batch 8's throughput although the last pass has only 32 - 3 x 9 = 5 inputs
    assert result.tops >= 0.999 * simulate(resnet50[8], BASE).tops
    # one timing per graph layer, in order, each the sum of its passes
    assert [t.name for t in result.layers] == [layer.name for layer in graph.layers]
    assert [t.gemm for t in result.layers] == [layer.gemm if layer.is_matrix else None for layer in graph.layers]
    assert [t.macs for t in result.layers] == [layer.macs for layer in graph.layers]
    single = simulate(resnet50[1], BASE)
    assert result.macs == 32 * single.macs
    for t in result.layers:
        b = t.breakdown
        assert b.active + b.weight_stall + b.weight_shift + b.non_matrix == b.total
        assert b.useful_mac + b.unused_mac == b.active
    assert sum(t.cycles for t in result.layers) == result.breakdown.total == result.total_cycles
    assert set(result.trace.mxu_layer.tolist()) == {i for i, layer in enumerate(graph.layers) if layer.is_matrix}
    # every pass fetches all the weights of its own batch's mapping; each mapping at least batch 1's
    by_pass = [simulate(rebatched(graph, b), SPILL_CFG) for b in program.pass_batches]
    assert result.counts.weight_dram_bytes == sum(p.counts.weight_dram_bytes for p in by_pass)
    # passes back to back are never slower than the passes run one by one
    assert result.total_cycles <= sum(p.total_cycles for p in by_pass)
    assert result.counts.weight_dram_bytes >= program.passes * single.counts.weight_dram_bytes


@pytest.mark.parametrize("batch, cycles, contended, spill", [(16, 6_958_679, 7_274_587, 89_915_392),
                                                         (32, 28_399_032, 28_849_078, 629_407_744)])
def test_without_sub_batching_resnet50_spills_as_before(resnet50, batch, cycles, contended, spill):
    graph = resnet50[batch]
    program = compile_program(graph, SPILL_CFG)
    assert program.instructions == _Compiler(graph, SPILL_CFG).compile().instructions
    # with a free unified-buffer port for every transfer, the cycles of the engine before it had ports
    roomy = simulate_program(program, SPILL_CFG.replace(**UNLIMITED_UB), batch)
    assert (roomy.total_cycles, roomy.counts.spill_bytes, roomy.sub_batch, roomy.breakdown.ub_stall) == \
        (cycles, spill, batch, 0)
    # on TPU v1's one read port the spills' DMA out and the MXU's inputs take turns
    result = simulate_program(program, SPILL_CFG, batch)
    assert (result.total_cycles, result.counts.spill_bytes, result.sub_batch) == (contended, spill, batch)
    assert result.breakdown.ub_stall > 0 and result.counts == roomy.counts


def test_sub_batching_leaves_resnet50_batch_8_unchanged(resnet50):
    on, off = simulate(resnet50[8], BASE), simulate(resnet50[8], SPILL_CFG)
    assert on.total_cycles == off.total_cycles == 1_762_087
    assert on.sub_batch == off.sub_batch == 8 and on.layers == off.layers


# ------------------------------------------------------------------------------ unified-buffer ports

def test_two_users_of_one_port_take_turns_and_a_later_one_fills_a_gap():
    port = UbPorts(1, 256)
    assert port.reserve(0, 100 * 256) == (0, 100)
    assert port.reserve(50, 10 * 256) == (100, 110)    # waits for the first user
    assert port.reserve(200, 10 * 256) == (200, 210)   # leaves [110, 200) free
    assert port.reserve(105, 91 * 256) == (210, 301)   # 91 cycles do not fit the 90-cycle gap
    assert port.reserve(105, 90 * 256 - 1) == (110, 200)  # 90 do: reserved later, served earlier
    assert (port.starts, port.ends) == ([[0]], [[301]])  # touching intervals merge
    assert port.reserve(400, 0) == (400, 400)          # nothing to move holds no port


def test_enough_ports_leave_every_user_its_own_time():
    ports = UbPorts(2, 256)
    assert ports.reserve(0, 100 * 256) == (0, 100)
    assert ports.reserve(50, 10 * 256) == (50, 60)     # port 1
    assert ports.reserve(55, 256) == (60, 61)          # both busy at 55: port 1 frees first
    assert (ports.starts, ports.ends) == ([[0], [50]], [[100], [61]])


def test_port_cycles_are_exact_ceilings_of_fractional_bandwidth():
    pcie_like = UbPorts(1, 22.5)
    assert (pcie_like.cycles(45), pcie_like.cycles(46), UbPorts(1, 256).cycles(1)) == (2, 3, 1)


def hand_program(layers, instructions):
    """A program written by hand: ``layers`` is (name, gemm or None) per layer."""
    mappings = tuple(LayerMapping(name, "gemm" if gemm else "relu", gemm, 1 if gemm else 0, 1 if gemm else 0,
                                  1, 1 if gemm else 0, 1 if gemm else 0, False, 1.0 if gemm else 0.0)
                     for name, gemm in layers)
    return Program("hand", BASE.name, R, C, tuple(n for n, _ in layers), tuple(m.op for m in mappings), mappings,
                   tuple(instructions), (1,))


def contended_read_program(m=64):
    """A 400-pass vector op reading 400 rows of the buffer, then a one-tile GEMM reading other rows."""
    vector_bytes = 400 * 256
    return hand_program([("vec", None), ("fc", GemmShape(m, R, C))], [
        ReadWeights(1, 0, R * C, R, C),
        Activate(0, "relu", "none", "none", 0, 0, 0, (UbRegion(0, vector_bytes),), UbRegion(vector_bytes, vector_bytes),
                 vector_bytes, 400, 400 * 256, 0, 0, 0),
        MatrixMultiply(1, UbRegion(2 * vector_bytes, m * R), 0, m, R, C, R * C, m * R, load_weights=True,
                       accumulate=False),
        Activate(1, "none", "none", "none", 0, m, C, (), UbRegion(3 * vector_bytes, m * C), m * C, m, 0, 0, 0, 0),
        Sync(1),
    ])


def test_the_mxu_waits_for_the_read_port_an_activation_holds():
    program = contended_read_program()
    one_port = cfg(**FAST_WEIGHTS)
    assert (one_port.unified_buffer.read_ports, one_port.unified_buffer.port_bytes_per_cycle) == (1, 256.0)
    shared = simulate_program(program, one_port, 1)
    # The vector op reads [0, 400) first (program order). The tile's 1-cycle fetch and 256-cycle shift end
    # at 257, when the MXU could stream; its 64 x 256 input bytes wait for the port until 400: 143 cycles.
    assert shared.trace.stream_start.tolist() == [400]
    b = shared.breakdown
    assert (b.weight_stall, b.weight_shift, b.ub_stall, b.active) == (1, R, 400 - (1 + R), 64)
    assert b.ub_stall <= b.non_matrix and b.raw_stall == b.input_stall == 0
    # the drain: first accumulator row R + C - 1 after the stream's start, 64 passes, 16-cycle pipeline
    assert shared.total_cycles == 400 + (R + C - 1) + 64 + LATENCY == 991
    two_ports = simulate_program(program, cfg(**FAST_WEIGHTS, **{"unified_buffer.read_ports": 2}), 1)
    assert two_ports.trace.stream_start.tolist() == [1 + R]
    assert (two_ports.breakdown.ub_stall, shared.total_cycles - two_ports.total_cycles) == (0, 143)


@pytest.mark.parametrize("host_first, landed, act_done", [(False, 416 + 100, 416), (True, 100, 400 + LATENCY + 84)])
def test_host_dma_in_and_activation_results_share_the_write_port_in_program_order(host_first, landed, act_done):
    vector_bytes, host_bytes = 400 * 256, 100 * 256
    activate = Activate(0, "relu", "none", "none", 0, 0, 0, (), UbRegion(0, vector_bytes), vector_bytes, 400,
                        400 * 256, 0, 0, 0)
    dma_in = ReadHostMemory(0, 0, UbRegion(vector_bytes, host_bytes), spill=False)
    code = [dma_in, activate] if host_first else [activate, dma_in]
    program = hand_program([("vec", None)], code + [Sync(0)])
    hw = cfg(**{"host.bandwidth_gb_s": 1e6, "host.latency_cycles": 0})  # the PCIe transfer itself: 1 cycle
    result = simulate_program(program, hw, 1)
    # the activation writes its 400 rows in its last 400 cycles, [16, 416) unhindered; the DMA's 100 rows
    # arrive in cycle 1 and take the port's first free 100 cycles: after the activation's, or before them,
    # which then end 84 cycles late (their 400 cycles from 100, not 16)
    assert result.total_cycles == max(landed, act_done)
    roomy = simulate_program(program, hw.replace(**{"unified_buffer.write_ports": 2}), 1)
    assert roomy.total_cycles == 416


def test_a_port_narrower_than_the_stream_makes_the_mxu_wait_for_its_reads():
    # two K folds of a 100-row GEMM; 256-byte input rows over a 128-byte port: each multiply's reads take
    # 200 cycles, 100 more than its stream
    hw = cfg(**{**FAST_HOST, **FAST_WEIGHTS, "unified_buffer.port_bytes_per_cycle": 128})
    result = simulate(gemm_graph(100, 2 * R, C), hw)
    b = result.breakdown
    # input 51,200 B lands at 400 (write port); fold 0 streams [400, 500) and reads until 600; fold 1's
    # shift, begun at 400, ends at 656 (56 cycles weight shift), streams [656, 756), reads until 856
    assert result.trace.stream_start.tolist() == [400, 656]
    assert (b.input_stall, b.active, b.weight_shift, b.ub_stall) == (400, 200, 56, 200)
    # drain from 656 + R + C - 1 = 1167 for 100 passes, 16-cycle pipeline; the host write reads 200 cycles
    assert result.total_cycles == 1167 + 100 + LATENCY + 200 == 1483


@pytest.fixture(scope="module")
def bert_tiny():
    from tpusim.frontend import load_onnx
    from tpusim.pipeline import resolve_model

    path = resolve_model("bert_tiny")
    return {batch: load_onnx(path, batch=batch) for batch in (1, 32)}


def run_breakdown(result):
    return dataclasses.astuple(result.breakdown)


# (total, active, weight stall, weight shift, non-matrix, useful, unused, RAW, input, ub stall) of the engine
# before the buffer had ports
RESNET50_BATCH_1 = (667_873, 128_804, 363_056, 90_636, 85_377, 62_395, 66_409, 76_714, 7_391, 0)
BERT_TINY_BATCH_1 = (28_392, 2_560, 7_968, 2_206, 15_658, 896, 1_664, 13_350, 0, 0)
BERT_TINY_BATCH_32 = (391_923, 81_920, 123_186, 32_768, 154_049, 28_670, 53_250, 119_248, 0, 0)


def test_ports_for_every_user_give_the_cycles_without_a_buffer_limit(resnet50, bert_tiny):
    roomy = cfg(**UNLIMITED_UB)
    for graph, before in ((resnet50[1], RESNET50_BATCH_1), (bert_tiny[1], BERT_TINY_BATCH_1),
                          (bert_tiny[32], BERT_TINY_BATCH_32)):
        assert run_breakdown(simulate(graph, roomy)) == before
    # TPU v1's one read and one write port cost ResNet-50 and BERT-tiny at batch 1 nothing, layer by layer
    for graph in (resnet50[1], bert_tiny[1]):
        assert simulate(graph, BASE).layers == simulate(graph, roomy).layers


def test_tpu_v1s_read_port_is_contended_on_bert_tiny_at_batch_32(bert_tiny):
    result = simulate(bert_tiny[32], BASE)
    b = result.breakdown
    # the MXU waits 10,300 cycles for the read port an activation-unit op holds; the weights computed on
    # the chip (K and V, a round trip through the host) leave later too: 4,026 more weight stall
    assert (b.total, b.ub_stall, b.weight_stall) == (406_249, 10_300, 127_212)
    assert (b.active, b.weight_shift, b.raw_stall, b.input_stall) == BERT_TINY_BATCH_32[1:2] + BERT_TINY_BATCH_32[3:4] \
        + BERT_TINY_BATCH_32[7:9]
    assert b.active + b.weight_stall + b.weight_shift + b.non_matrix == b.total == result.total_cycles
