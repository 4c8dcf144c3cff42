"""The built-in ``lstm`` workload: LSTM0's shape class (Jouppi et al. 2017, Table 1: 52 M weights, batch
64), PyTorch's export of it, and its timing: weight-bandwidth bound at batch 64, TOPS rising with batch."""
from __future__ import annotations

import numpy as np
import pytest
from onnx import numpy_helper

from tpusim.config import load_config
from tpusim.frontend import lower_model
from tpusim.mapping.tiler import rebatched
from tpusim.sim import simulate
from tpusim.workloads import WORKLOADS
from tpusim.workloads import lstm as lstm_workload

CONFIG = load_config("configs/tpu_v1.yaml")


@pytest.fixture(scope="module")
def generated(generated_workload):
    return generated_workload("lstm")


@pytest.fixture(scope="module")
def graph(generated):
    return lower_model(generated.model, "lstm.onnx", batch=1)


def test_topology_is_lstm0_class(generated):
    model = generated.model
    nodes = [n.op_type for n in model.graph.node]
    assert nodes == ["Transpose"] + ["LSTM", "Squeeze"] * 6 + ["Transpose", "Slice", "Flatten", "Gemm"]
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    matrices = sum(v.size for name, v in inits.items() if name.endswith((".W", ".R")) or name == "fc.weight")
    assert matrices == 6 * 4 * 1024 * (1024 + 1024) + 1024 * 1600 == 51_970_048   # LSTM0: 52 M weights
    # nn.LSTM's count (W, R, bias_ih, bias_hh) and the Gemm's, as workloads/README.md lists them
    assert sum(v.size for v in inits.values() if v.dtype == np.float32) == 52_020_800
    assert WORKLOADS["lstm"].input_shape == (1, lstm_workload.STEPS, lstm_workload.FEATURES) == (1, 32, 1024)
    # trained-like gates: pre-activations near unit std, forget gate biased open
    for layer in range(6):
        b = inits[f"lstm.{layer}.B"][0]
        assert np.all(b[2048:3072] == 1.0)
        w = inits[f"lstm.{layer}.W"][0]
        row_scale = np.abs(w).max(axis=1)
        assert row_scale.max() / row_scale.min() > 2        # per-channel quantization has work to do


def test_lowers_to_batch_first_lstm_layers(graph):
    lstms = [layer for layer in graph.layers if layer.op == "lstm"]
    assert len(lstms) == 6 and all(layer.attr("layout") == 1 for layer in lstms)
    assert all(layer.weight.shape == (1, 4096, 2048) and layer.output_shape == (1, 32, 1, 1024) for layer in lstms)
    timed = [t for t in simulate(graph, CONFIG).layers if t.op == "lstm"]
    assert all((t.gemm.m, t.gemm.k, t.gemm.n, t.gemm.groups) == (32, 2048, 4096, 1) for t in timed)
    # The model's MACs (every step's x W^T and h R^T, and the Gemm), as workloads/README.md lists them; the
    # chip skips step 0's h R^T (h_0 = 0), so the timeline counts 6 x 1024 x 4096 fewer.
    model_macs = sum(t.gemm.macs for t in timed) + 1024 * 1600
    assert model_macs == 1_612_251_136
    assert simulate(graph, CONFIG).macs == model_macs - 6 * 1024 * 4096


def test_weight_bandwidth_bound_at_batch_64_and_tops_rise_with_batch(graph):
    runs = {b: simulate(rebatched(graph, b), CONFIG) for b in (1, 8, 64, 256)}
    tops = [runs[b].tops for b in sorted(runs)]
    assert all(a < b for a, b in zip(tops, tops[1:]))
    # Until a step's multiply outlasts its weight fetch (batch ~1350), a step costs the same whatever the
    # batch: TOPS grow almost linearly with it.
    assert runs[64].tops / runs[1].tops > 50
    recurrent = [t for t in runs[64].layers if t.op == "lstm"]
    # Weight-bandwidth bound in the paper's categories (Table 3): waiting for R (weight stall) and shifting it
    # in (weight shift) take 0.85-0.87 of each layer's cycles, the stall alone 0.68-0.70. Most of the rest is
    # each step's activation chain (gate drains, cell, hidden), which the next step's multiply waits for (RAW
    # stall, and lstm.0 waits for its input from the host too): the chain's operands come through TPU v1's one
    # unified-buffer read port (256 B/cycle), 1 MiB a step; with ports that never wait the stall alone is 0.73.
    assert all(t.breakdown.weight_stall + t.breakdown.weight_shift > 0.8 * t.cycles for t in recurrent)
    assert all(t.breakdown.weight_stall > 0.6 * t.cycles for t in recurrent)
    assert all(t.breakdown.raw_stall > 0 for t in recurrent)
    # Each step fetches R (4 MiB) from the weight memory: 31 steps x 6 layers, plus W once per layer and fc.
    assert runs[64].counts.weight_dram_bytes == 6 * (31 * 4096 * 1024 + 4096 * 1024) + 1600 * 1024


def test_hoisting_the_input_gemm_halves_an_lstm_step_here(graph):
    at_64 = rebatched(graph, 64)
    hoisted = simulate(at_64, CONFIG)
    per_step = simulate(at_64, CONFIG.replace(**{"mapping.recurrent_input": "per_step"}))
    assert 1.8 < per_step.total_cycles / hoisted.total_cycles < 2.1
