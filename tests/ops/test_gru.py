"""GRU: PyTorch-style exports (linear_before_reset=1) and the ONNX default (linear_before_reset=0) through
every stage, sequence_lens and an initial state, and the second dependent GEMM linear_before_reset=0
puts into every step."""
from __future__ import annotations

import numpy as np
import pytest
from op_checks import CONFIG, check_all_stages
from ops.test_lstm import FAST, MIN_SQNR_DB, pytorch_lstm  # tests/ is on the path: ops/ is a namespace package

from tpusim.frontend import lower_model
from tpusim.mapping.isa import Activate, MatrixMultiply, ReadWeights
from tpusim.quant.calibrate import synthetic_inputs
from tpusim.sim import compile_program, simulate

# Against ONNX Runtime the GRU's integers are at most 1 LSB off, measured on 12-17 % of the elements
# (the hidden update mixes h_{t-1} on its 8-bit grid back in every step); against FP32, 37-38 dB.
GRU_OFF_FRACTION = 0.25


def pytorch_gru(**kwargs):
    return pytorch_lstm(kind="GRU", **kwargs)


@pytest.mark.parametrize("lbr,direction", [(1, "forward"), (1, "bidirectional"), (0, "forward"), (0, "reverse")])
def test_gru_through_every_stage(lbr, direction):
    graph = check_all_stages(pytorch_gru(direction=direction, linear_before_reset=lbr), (1, 12, 16), {"gru"},
                             min_sqnr_db=MIN_SQNR_DB, max_off_fraction=GRU_OFF_FRACTION)
    assert [layer.op for layer in graph.layers] == ["gru", "reshape"]
    assert graph.layers[0].attr("linear_before_reset") == lbr and graph.layers[0].attr("layout") == 1


def test_gru_sequence_lens_and_initial_state():
    # Up to 3 LSB here, on 2 of 2304 elements: where the FP32 h_{t-1} lay below Y's calibrated grid
    # (percentile ranges clip the extremes), the chip carries the clipped integer into step t and
    # ONNX Runtime its float h_{t-1}; a GRU adds z h_{t-1} straight into h_t, so the difference shows.
    x = np.asarray(synthetic_inputs((12, 16), 3, 5).inputs)
    check_all_stages(pytorch_gru(batch=3, lens=[4, 12, 7], initial=True, linear_before_reset=1), (3, 12, 16), {"gru"},
                     min_sqnr_db=MIN_SQNR_DB, max_off_fraction=GRU_OFF_FRACTION, max_lsb=3, x=x)


def _gru(lbr, hidden=128, steps=5, batch=2):
    return lower_model(pytorch_gru(steps=steps, hidden=hidden, batch=batch, linear_before_reset=lbr), "gru.onnx",
                       batch=batch)


def test_reset_before_the_linear_map_adds_a_dependent_gemm_to_every_step():
    cfg = CONFIG.replace(**FAST)
    after, before = _gru(1), _gru(0)
    code = {lbr: [ins for ins in compile_program(g, cfg).instructions if ins.layer == 0]
            for lbr, g in ((1, after), (0, before))}
    # lbr=1: R (128 x 384: column tiles of 256 and 128) on h_{t-1}; lbr=0: R_zr (128 x 256) on h_{t-1}, then
    # R_h (128 x 128) on r * h_{t-1}, which the activation unit writes after R_zr's drain.
    steps = [[i for i in code[lbr] if isinstance(i, MatrixMultiply) and i.m_rows == 2] for lbr in (0, 1)]
    assert [i.n_cols for i in steps[1]] == [256, 128] * 4 and [i.n_cols for i in steps[0]] == [256, 128] * 4
    resets = [i for i in code[0] if isinstance(i, Activate) and i.function == "gru_reset"]
    assert len(resets) == 4 and [i.src for i in steps[0][1::2]] == [a.dst for a in resets]
    assert (sum(i.nbytes for i in code[1] if isinstance(i, ReadWeights))
            == sum(i.nbytes for i in code[0] if isinstance(i, ReadWeights)))
    slow, fast = simulate(before, cfg).layers[0].breakdown, simulate(after, cfg).layers[0].breakdown
    assert slow.raw_stall > fast.raw_stall and slow.total > fast.total


def test_gru_macs_are_steps_batch_k_n():
    sim = simulate(_gru(1, hidden=64, steps=6, batch=3), CONFIG)
    layer = sim.layers[0]
    assert (layer.gemm.m, layer.gemm.k, layer.gemm.n) == (18, 16 + 64, 192)
    # every step's input projection, every step but the first (zero h) its recurrent product
    assert layer.macs == 18 * 16 * 192 + 5 * 3 * 64 * 192
    assert np.isclose(layer.macs, layer.gemm.macs - 3 * 64 * 192)


@pytest.mark.parametrize("lbr", [1, 0])
def test_each_pass_reads_only_the_gate_columns_it_uses(lbr):
    """H = 128, B = 2, 5 steps; gates z, r, h in int16 (a gate's 128 columns of 2 rows: 512 bytes), h in int8
    (256 bytes). The gate drains read their own columns of the input projection (W's column tiles of 256 and
    128: 1024 and 512 bytes). lbr=1: the candidate reads r and R_h h_{t-1} (1024) and h's input part (512).
    lbr=0: the reset pass reads r (512) and h_{t-1} (256), R_h's drain h's input part (512). The hidden pass
    reads z (512), the candidate (512) and h_{t-1} (256; none at step 0)."""
    code = [ins for ins in compile_program(_gru(lbr), CONFIG).instructions if ins.layer == 0]
    functions = ("gru_gates", "gru_candidate", "gru_reset", "gru_hidden")
    read = {name: [sum(r.nbytes for r in ins.sources) for ins in code
                   if isinstance(ins, Activate) and ins.function == name] for name in functions}
    hidden = [1024] + [1280] * 4
    if lbr:
        assert read == {"gru_gates": [1024, 512] * 5, "gru_candidate": [1536] * 5, "gru_reset": [], "gru_hidden": hidden}
    else:
        assert read == {"gru_gates": [1024] * 5, "gru_candidate": [512] * 5, "gru_reset": [768] * 4,
                        "gru_hidden": hidden}


def test_a_gate_drain_that_cuts_a_w_tile_reads_its_columns_row_by_row():
    """H = 64, lbr=0: W's one column tile holds z, r, h (192 columns); R_zr's drain reads z and r, the first
    128 columns of each of the 2 rows (256 bytes at row stride 384), R_h's drain the last 64 (128 bytes)."""
    code = [ins for ins in compile_program(_gru(0, hidden=64), CONFIG).instructions if ins.layer == 0]
    base = next(ins.dst.addr for ins in code if isinstance(ins, Activate) and ins.function == "requant")
    block = 5 * 2 * 192 * 2    # the 5 steps' input projection, one W tile: rows of 384 bytes
    assert next(ins.dst.nbytes for ins in code if isinstance(ins, Activate) and ins.function == "requant") == block
    for name, offset, nbytes in (("gru_gates", 0, 256), ("gru_candidate", 256, 128)):
        drains = [ins for ins in code if isinstance(ins, Activate) and ins.function == name]
        for s, ins in enumerate(drains):
            rows = (2 * s, 2 * s + 1)
            assert [(r.addr, r.nbytes) for r in ins.sources] == [(base + row * 384 + offset, nbytes) for row in rows]
