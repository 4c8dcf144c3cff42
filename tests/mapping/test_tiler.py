"""Tiler: tile shapes, loop order, accumulator chunking, unified-buffer allocation and spilling."""
import dataclasses
import functools
from pathlib import Path

import numpy as np
import pytest

from tpusim import cli
from tpusim.config import RecordedResults, load_config
from tpusim.errors import ConfigError, TpusimError
from tpusim.ir import Graph, Layer
from tpusim.mapping import Activate, MatrixMultiply, ReadHostMemory, ReadWeights, WriteHostMemory, compile_program
from tpusim.mapping.tiler import UbAllocator, column_tiles, rebatched, spill_bytes

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "tpu_v1.yaml"
BASE = load_config(CONFIG)
SPILLING = BASE.replace(**{"mapping.sub_batching": False})  # whole batch at once, spilling what does not fit


def gemm_graph(m, k, n):
    layer = Layer("fc", "gemm", ("x",), "fc", ((m, k),), (m, n), weight=np.broadcast_to(np.int8(0), (n, k)))
    return Graph("g", "x", (m, k), ("fc",), (layer,))


def of_type(program, kind):
    return [ins for ins in program.instructions if isinstance(ins, kind)]


def test_column_tiles_fold_k_over_rows_and_n_over_columns():
    tiles, per_tile = column_tiles(600, 300, 1, 256, 256, 1, pack_groups=True)
    assert per_tile == 1
    assert [t.n_cols for t in tiles] == [256, 44]
    assert [f.k_rows for f in tiles[0].folds] == [256, 256, 88]
    assert sum(f.nbytes for t in tiles for f in t.folds) == 600 * 300


def test_column_tiles_pack_groups_block_diagonally():
    tiles, per_tile = column_tiles(9, 1, 64, 256, 256, 1, pack_groups=True)
    assert per_tile == 28
    assert [(f.k_rows, f.n_cols, f.macs_per_row) for t in tiles for f in t.folds] == [
        (252, 28, 252), (252, 28, 252), (72, 8, 72)]
    tiles, per_tile = column_tiles(9, 1, 64, 256, 256, 1, pack_groups=False)
    assert per_tile == 1 and len(tiles) == 64
    # groups too big to pack fall back to one group per tile
    tiles, per_tile = column_tiles(300, 8, 2, 256, 256, 1, pack_groups=True)
    assert per_tile == 1 and [len(t.folds) for t in tiles] == [2, 2]


def test_m_chunks_bounded_by_half_the_accumulators_and_k_folds_refetched_per_chunk():
    # chunks of 2048, 2048 and 904 rows: the third does not fit behind the first two and wraps to row 0
    program = compile_program(gemm_graph(5000, 512, 256), BASE)
    mmuls = of_type(program, MatrixMultiply)
    assert [i.m_rows for i in mmuls] == [2048, 2048, 2048, 2048, 904, 904]
    assert [i.acc_addr for i in mmuls] == [0, 0, 2048, 2048, 0, 0]
    assert [i.accumulate for i in mmuls] == [False, True] * 3
    assert sum(i.nbytes for i in of_type(program, ReadWeights)) == 3 * 2 * 256 * 256
    assert program.mappings[0].m_chunks == 3 and program.mappings[0].weight_tiles == 6


def test_single_k_fold_keeps_weights_across_chunks():
    program = compile_program(gemm_graph(5000, 256, 512), BASE)
    mmuls = of_type(program, MatrixMultiply)
    assert [i.load_weights for i in mmuls] == [True, False, False] * 2
    assert len(of_type(program, ReadWeights)) == 2


def test_column_tiles_take_accumulator_rows_side_by_side_in_a_ring():
    program = compile_program(gemm_graph(100, 256, 768), BASE)
    assert [i.acc_addr for i in of_type(program, MatrixMultiply)] == [0, 100, 200]
    assert [a.acc_addr for a in of_type(program, Activate)] == [0, 100, 200]
    # 40 tiles of 100 rows fill rows 0-3999 of 4096; the 41st does not fit the last 96 and wraps to 0
    program = compile_program(gemm_graph(100, 256, 41 * 256), BASE)
    assert [i.acc_addr for i in of_type(program, MatrixMultiply)] == [100 * t for t in range(40)] + [0]


def test_single_buffered_accumulators_use_all_entries():
    program = compile_program(gemm_graph(5000, 256, 256), BASE.replace(**{"accumulators.double_buffered": False}))
    assert [i.m_rows for i in of_type(program, MatrixMultiply)] == [4096, 904]
    assert {i.acc_addr for i in of_type(program, MatrixMultiply)} == {0}


def test_activation_follows_each_chunk_and_writes_the_output_rows():
    program = compile_program(gemm_graph(3000, 256, 256), BASE)
    acts = of_type(program, Activate)
    assert [(a.acc_rows, a.out_bytes) for a in acts] == [(2048, 2048 * 256), (952, 952 * 256)]
    assert acts[1].dst.addr == acts[0].dst.addr + 2048 * 256


def test_spilled_tensor_goes_through_staging_in_chunks():
    first = Layer("fc1", "gemm", ("x",), "fc1", ((512, 64),), (512, 256),
                  weight=np.broadcast_to(np.int8(0), (256, 64)))
    second = Layer("fc2", "gemm", ("fc1",), "fc2", ((512, 256),), (512, 64),
                   weight=np.broadcast_to(np.int8(0), (64, 256)))
    graph = Graph("chain", "x", (512, 64), ("fc2",), (first, second))
    program = compile_program(graph, SPILLING.replace(**{"unified_buffer.capacity_bytes": 96 * 1024}))
    spills = [i for i in of_type(program, WriteHostMemory) if i.spill]
    refills = [i for i in of_type(program, ReadHostMemory) if i.spill]
    assert sum(i.src.nbytes for i in spills) == sum(i.dst.nbytes for i in refills) == 512 * 256
    assert len(spills) > 1 and len(refills) > 1
    assert all(m.spilled for m in program.mappings)
    assert all(i.src.addr + i.src.nbytes <= 96 * 1024 for i in of_type(program, MatrixMultiply))


def test_unified_buffer_too_small_to_stage_is_a_user_error():
    with pytest.raises(TpusimError, match="fc"):
        compile_program(gemm_graph(64, 256, 256), BASE.replace(**{"unified_buffer.capacity_bytes": 256}))


def test_reshape_is_an_alias_without_instructions():
    gap = Layer("gap", "global_avgpool", ("x",), "gap", ((1, 64, 4, 4),), (1, 64, 1, 1))
    flat = Layer("flat", "reshape", ("gap",), "flat", ((1, 64, 1, 1),), (1, 64))
    fc = Layer("fc", "gemm", ("flat",), "fc", ((1, 64),), (1, 10), weight=np.broadcast_to(np.int8(0), (10, 64)))
    program = compile_program(Graph("h", "x", (1, 64, 4, 4), ("fc",), (gap, flat, fc)), BASE)
    assert not [i for i in program.instructions if i.layer == 1]
    act = of_type(program, Activate)[0]
    assert of_type(program, MatrixMultiply)[0].src == act.dst
    assert act.pool_ops == 64 * 16 and act.vector_passes == 4


def test_allocator_first_fit_aligned_and_merges_free_blocks():
    ub = UbAllocator(1024, 256)
    a, b, c = ub.alloc(10), ub.alloc(300), ub.alloc(256)
    assert (a, b, c) == (0, 256, 768)
    assert ub.alloc(1) is None
    ub.free(a, 10)
    ub.free(b, 300)
    assert ub.largest_free() == 768
    assert ub.alloc(700) == 0


def chain_graph(batch):
    """Two GEMMs whose 256-byte-per-input intermediate is what a small unified buffer cannot hold."""
    first = Layer("fc1", "gemm", ("x",), "fc1", ((batch, 64),), (batch, 256),
                  weight=np.broadcast_to(np.int8(0), (256, 64)))
    second = Layer("fc2", "gemm", ("fc1",), "fc2", ((batch, 256),), (batch, 64),
                   weight=np.broadcast_to(np.int8(0), (64, 256)))
    return Graph("chain", "x", (batch, 64), ("fc2",), (first, second))


def test_rebatched_rescales_every_leading_dimension():
    graph = rebatched(chain_graph(512), 3)
    assert graph.input_shape == (3, 64) and graph.batch == 3
    assert [(l.input_shapes, l.output_shape) for l in graph.layers] == [(((3, 64),), (3, 256)),
                                                                        (((3, 256),), (3, 64))]
    assert [l.gemm.m for l in graph.layers] == [3, 3]
    gap = Layer("gap", "global_avgpool", ("x",), "gap", ((2, 64, 4, 4),), (2, 64, 1, 1))
    folded = Layer("flat", "reshape", ("gap",), "flat", ((2, 64, 1, 1),), (1, 128))
    assert rebatched(Graph("h", "x", (2, 64, 4, 4), ("flat",), (gap, folded)), 1) is None


def test_sub_batching_runs_passes_of_the_largest_batch_that_fits():
    small_ub = {"unified_buffer.capacity_bytes": 96 * 1024}
    graph = chain_graph(512)
    program = compile_program(graph, BASE.replace(**small_ub))
    fitting = [b for b in range(1, 513)
               if spill_bytes(compile_program(rebatched(graph, b), SPILLING.replace(**small_ub))) == 0]
    best = max(fitting)
    assert fitting == list(range(1, best + 1)) and best < 512  # spilling grows with the batch
    assert program.sub_batch == best and spill_bytes(program) == 0
    assert program.pass_batches == (best,) * (512 // best) + ((512 % best,) if 512 % best else ())
    assert program.layer_names == ("fc1", "fc2") * program.passes
    assert [program.graph_layer(i) for i in range(4)] == [0, 1, 0, 1]
    # layer indices are offset per pass, one Sync at the end, and each pass re-fetches every weight
    assert {i.layer for i in program.instructions} == set(range(2 * program.passes))
    assert [type(i).__name__ for i in program.instructions].count("Sync") == 1
    assert sum(i.nbytes for i in of_type(program, ReadWeights)) == program.passes * (64 * 256 + 256 * 64)
    assert sum(i.m_rows for i in of_type(program, MatrixMultiply)) == 2 * 512
    host_reads = sorted((i.host_addr, i.dst.nbytes) for i in of_type(program, ReadHostMemory))
    assert all(a + n <= b for (a, n), (b, _) in zip(host_reads, host_reads[1:]))  # passes use their own inputs
    assert "(pass 2/" in program.listing()


def test_sub_batching_falls_back_to_single_inputs_that_still_spill():
    # 16 rows per input: one input's 4 KiB intermediate cannot share a 4 KiB buffer with its 1 KiB input
    first = Layer("fc1", "gemm", ("x",), "fc1", ((3, 16, 64),), (3, 16, 256),
                  weight=np.broadcast_to(np.int8(0), (256, 64)))
    second = Layer("fc2", "gemm", ("fc1",), "fc2", ((3, 16, 256),), (3, 16, 64),
                   weight=np.broadcast_to(np.int8(0), (64, 256)))
    graph = Graph("chain", "x", (3, 16, 64), ("fc2",), (first, second))
    tiny_ub = {"unified_buffer.capacity_bytes": 4096}
    single = spill_bytes(compile_program(rebatched(graph, 1), SPILLING.replace(**tiny_ub)))
    assert single == 2 * 16 * 256
    program = compile_program(graph, BASE.replace(**tiny_ub))
    assert program.pass_batches == (1, 1, 1) and spill_bytes(program) == 3 * single


def test_sub_batching_leaves_a_batch_that_fits_alone():
    graph = chain_graph(512)
    on, off = compile_program(graph, BASE), compile_program(graph, SPILLING)
    assert on.pass_batches == off.pass_batches == (512,)
    assert on.instructions == off.instructions


def test_weights_that_do_not_fit_the_weight_memory_are_a_config_error():
    graph = gemm_graph(4, 300, 10)  # 3,000 int8 weights
    assert sum(ins.nbytes for ins in of_type(compile_program(graph, BASE.replace(
        **{"weight_memory.capacity_bytes": 3000})), ReadWeights)) == 3000  # exactly full fits
    with pytest.raises(ConfigError) as error:
        compile_program(graph, BASE.replace(**{"weight_memory.capacity_bytes": 2999}))
    assert str(error.value) == ("tpu_v1: weight_memory.capacity_bytes: 2,999 bytes cannot hold model 'g', "
                                "whose weights take 3,000 bytes")


def test_cli_refuses_a_model_bigger_than_the_weight_memory_in_one_line_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    code = cli.main(["run", str(CONFIG), "--model", "tiny_cnn", "--no-quantize", "--no-progress",
                     "--set", "weight_memory.capacity_bytes=1000", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2
    assert err == ("tpusim: error: tpu_v1 (--set weight_memory.capacity_bytes): weight_memory.capacity_bytes: "
                   "1,000 bytes cannot hold model 'tiny_cnn', whose weights take 6,784 bytes\n")
    assert not out.exists()


def test_a_model_bigger_than_the_weight_memory_fails_before_calibration(tmp_path, capsys, monkeypatch):
    from tpusim import pipeline

    def calibration_ran(*args, **kwargs):
        raise AssertionError("calibration ran for a model the weight memory cannot hold")

    monkeypatch.setattr(pipeline, "quantize", calibration_ran)
    code = cli.main(["run", str(CONFIG), "--model", "tiny_cnn", "--no-progress",
                     "--set", "weight_memory.capacity_bytes=1000", "--out", str(tmp_path / "run")])
    assert code == 2 and "cannot hold model 'tiny_cnn'" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ the program cache

TIMING_AND_ENERGY = [{"weight_memory.bandwidth_gb_s": 300.0}, {"weight_memory.latency_cycles": 7},
                     {"host.bandwidth_gb_s": 2.0}, {"array.clock_mhz": 940.0}, {"energy.static_power_w": 0.0},
                     {"weight_memory.requests_in_flight": 1}]
COMPILER_READS = [{"array.rows": 128}, {"array.cols": 64}, {"unified_buffer.capacity_bytes": 96 * 1024},
                  {"accumulators.entries": 256}, {"accumulators.double_buffered": False},
                  {"quant.weights": "per-tensor"}, {"mapping.pack_groups": False}, {"mapping.sub_batching": False},
                  {"activation_unit.lanes": 64}, {"activation_unit.per_channel_requant": "extra_pass"},
                  {"weight_memory.capacity_bytes": 8 * 2**20}]


def _same(a, b) -> bool:
    """Programs compare by identity; these are equal field by field (every instruction and mapping)."""
    return all(getattr(a, f.name) == getattr(b, f.name) for f in dataclasses.fields(a))


def _cached(cache: RecordedResults, graph, config):
    """compile_program through the cache, as a sweep worker calls it."""
    return cache.get(graph, config, functools.partial(compile_program, graph))


def test_a_program_is_reused_for_settings_the_compiler_does_not_read():
    graph = chain_graph(512)
    cache = RecordedResults(4)
    first = _cached(cache, graph, BASE)
    assert _same(first, compile_program(graph, BASE))
    for change in TIMING_AND_ENERGY:
        config = BASE.replace(**change)
        assert _same(compile_program(graph, config), first), change  # the compiler does not read it, so:
        assert _cached(cache, graph, config) is first, change


def test_the_compiler_reads_the_settings_it_depends_on_through_the_config():
    graph = chain_graph(512)
    cache = RecordedResults(len(COMPILER_READS) + 1)
    first = _cached(cache, graph, BASE)
    for change in COMPILER_READS:
        config = BASE.replace(**change)
        program = _cached(cache, graph, config)
        # compiled again (whether or not the setting changes this graph's program) and kept
        assert program is not first and _same(program, compile_program(graph, config)), change
        assert _cached(cache, graph, config) is program
    assert not _same(_cached(cache, graph, BASE.replace(**{"array.rows": 128})), first)
    assert _cached(cache, graph, BASE) is first  # still held: the cache holds size programs
    assert _cached(cache, chain_graph(512), BASE) is not first  # another graph object, equal or not
