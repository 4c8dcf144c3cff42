"""Rescale overhead is measured against a per-tensor twin run, never assumed."""
from __future__ import annotations

from pathlib import Path

import pytest

from tpusim import pipeline
from tpusim.config import load_config
from tpusim.frontend import lower_model
from tpusim.rescale import per_tensor_twin

TPU_V1 = Path(__file__).resolve().parents[1] / "configs" / "tpu_v1.yaml"


@pytest.fixture(scope="module")
def graph(generated_workload):
    return lower_model(generated_workload("mobilenet_v2").model, "mobilenet_v2", batch=2)


def _rescale(graph, **overrides):
    config = load_config(TPU_V1, overrides)
    program, sim, energy = pipeline.time_and_energy(graph, config)
    return sim, energy, pipeline.measure_rescale(graph, config, program, sim, energy)


def test_per_tensor_run_is_its_own_baseline(graph):
    sim, _, rows = _rescale(graph, **{"quant.weights": "per-tensor"})
    assert all(r.overhead_cycles == 0 and r.overhead_pj == 0.0 for r in rows)
    # One 4-byte multiplier and a 1-byte shift per layer that rescales anything.
    assert sum(r.scale_bytes for r in rows) == 5 * sum(1 for r in rows if r.requant_ops)


def test_native_per_lane_multipliers_cost_scale_fetches_only(graph):
    sim, energy, rows = _rescale(graph)
    assert sum(r.overhead_cycles for r in rows) == 157
    assert sum(r.overhead_pj for r in rows) > 0
    for r, t in zip(rows, sim.layers):
        assert r.requant_ops == t.counts.requant_ops and r.layer_cycles == t.cycles


def test_extra_pass_overhead_is_the_difference_of_two_simulations(graph):
    config = load_config(TPU_V1, {"activation_unit.per_channel_requant": "extra_pass"})
    sim, energy, rows = _rescale(graph, **{"activation_unit.per_channel_requant": "extra_pass"})
    twin = per_tensor_twin(config)
    _, base_sim, base_energy = pipeline.time_and_energy(graph, twin)
    assert sum(r.overhead_cycles for r in rows) == sim.total_cycles - base_sim.total_cycles > 0
    assert sum(r.overhead_pj for r in rows) == pytest.approx(energy.dynamic_pj - base_energy.dynamic_pj)
    assert sum(r.overhead_pj for r in rows) > 0
    conv = next(r for r in rows if r.requant_unit_cycles)
    assert conv.overhead_cycles_pct == pytest.approx(100 * conv.overhead_cycles / conv.layer_cycles)


def test_fp32_chip_has_no_requantization(graph):
    assert per_tensor_twin(load_config(TPU_V1, {"array.datatype": "fp32"})) is None
    _, _, rows = _rescale(graph, **{"array.datatype": "fp32"})
    assert sum(r.requant_ops for r in rows) == 0 and sum(r.requant_pj for r in rows) == 0.0
