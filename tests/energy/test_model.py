"""Counts x table on a hand-made table whose prices are dyadic, so every expected value is exact."""
import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import yaml

from tpusim.config import load_config
from tpusim.energy.model import (
    LayerEnergy,
    accumulator_bytes,
    action_prices,
    layer_energy,
    run_energy,
    weight_fifo_bytes,
)
from tpusim.energy.table import load_energy_table
from tpusim.errors import ConfigError
from tpusim.ir import Activation, ConvAttrs, Graph, Layer, LayerCounts
from tpusim.sim import simulate

REPO = Path(__file__).resolve().parents[2]


def cited(unit, value):
    return {unit: value, "source": "test value"}


HAND_TABLE = {
    "name": "hand",
    "process": "none",
    "arithmetic": {
        "int8_add": cited("pj", 0.0625),
        "int32_add": cited("pj", 0.125),
        "int8_mul": cited("pj", 0.25),
        "int32_mul": cited("pj", 2.0),
        "fp16_add": cited("pj", 0.5),
        "fp16_mul": cited("pj", 1.0),
        "fp32_add": cited("pj", 1.0),
        "fp32_mul": cited("pj", 4.0),
        "int32_shift": cited("pj", 0.5),
        "int8_compare": cited("pj", 0.0625),
        "int32_compare": cited("pj", 0.25),
    },
    "sram": {  # 1 / 2 / 4 pJ per byte read at 1 KiB / 4 KiB / 16 KiB
        "anchors": [
            {"capacity_bytes": 1024, "pj_per_64bit_read": 8, "source": "test"},
            {"capacity_bytes": 4096, "pj_per_64bit_read": 16, "source": "test"},
            {"capacity_bytes": 16384, "pj_per_64bit_read": 32, "source": "test"},
        ],
        "extrapolation_exponent": cited("value", 0.5),
        "write_to_read_ratio": cited("value", 2.0),
    },
    "dram": {"DDR3": cited("pj_per_bit", 2.0), "HBM2": cited("pj_per_bit", 0.5)},
    "register": cited("pj_per_bit", 0.5),
    "host_link": cited("pj_per_bit", 1.0),
    "idle_pe": cited("pj_per_cycle", 0.75),
}

# Prices the hand table gives on HAND_CONFIG, pJ per event.
MAC_INT8, MAC_FP32 = 0.25 + 0.125, 4.0 + 1.0
IDLE_PE = 0.75
DRAM_DDR3, DRAM_HBM2 = 16.0, 4.0
FIFO_WRITE_PLUS_READ = 2.0 + 1.0  # 1 KiB FIFO
SHIFT = 4.0
HOP = SHIFT * (1 + 4)  # an int8 activation and a 32-bit partial sum move one register per PE-cycle
UB_READ, UB_WRITE = 4.0, 8.0  # 16 KiB unified buffer
ACC_READ, ACC_WRITE = 2.0, 4.0  # 4 KiB accumulators
REQUANT = 2.0 + 0.125 + 0.5 + 2 * 0.25
NONLINEARITY, POOL = 0.0625, 0.125
LINK = 8.0

COUNTS = LayerCounts(
    macs=1000, mac_slots=1536, weight_dram_bytes=300, weight_fifo_bytes=256, weight_shift_bytes=4096,
    ub_read_bytes=700, ub_write_bytes=90, spill_bytes=64, acc_read_bytes=33, acc_write_bytes=41,
    requant_ops=90, requant_scale_bytes=80, activation_ops=90, pool_ops=36, host_in_bytes=12,
    host_out_bytes=10,
)  # fmt: skip


@pytest.fixture(scope="module")
def hand_table(tmp_path_factory):
    path = tmp_path_factory.mktemp("energy") / "hand.yaml"
    path.write_text(yaml.safe_dump(HAND_TABLE, sort_keys=False))
    return load_energy_table(path)


@pytest.fixture(scope="module")
def hand_config():
    """16x16 int8 array: 256-byte tiles, FIFO 4 tiles = 1 KiB, accumulators 64 x 16 x 32 bit = 4 KiB."""
    cfg = load_config(REPO / "configs" / "tpu_v1.yaml")
    return cfg.replace(
        **{
            "array.rows": 16,
            "array.cols": 16,
            "unified_buffer.capacity_bytes": 16384,
            "accumulators.entries": 64,
            "energy.idle_pe_gated": False,
        }
    )


def test_memory_capacities(hand_config):
    assert weight_fifo_bytes(hand_config) == 1024
    assert accumulator_bytes(hand_config) == 4096


def test_each_component_is_count_times_table_value(hand_config, hand_table):
    e = layer_energy(COUNTS, hand_config, hand_table)
    assert e == LayerEnergy(
        mac=1000 * MAC_INT8,
        idle_pe=536 * IDLE_PE,
        array_transport=1536 * HOP,
        weight_dram=300 * DRAM_DDR3,
        weight_fifo=256 * FIFO_WRITE_PLUS_READ,
        weight_shift=4096 * SHIFT,
        unified_buffer=700 * UB_READ + 90 * UB_WRITE,
        accumulators=33 * ACC_READ + 41 * ACC_WRITE,
        activation_unit=90 * REQUANT + 90 * NONLINEARITY + 36 * POOL,
        requant_scales=80 * UB_READ,
        host=12 * (LINK + UB_WRITE) + 10 * (LINK + UB_READ),
        spill=64 * (LINK + (UB_READ + UB_WRITE) / 2),
    )
    assert e.mac == 375.0 and e.weight_shift == 16384.0 and e.activation_unit == 291.375
    assert e.total == 28298.375 + 30720.0
    assert e.total == sum(dataclasses.astuple(e))
    assert e.as_dict()["total"] == e.total


def test_each_count_drives_only_its_component(hand_config, hand_table):
    zero = layer_energy(LayerCounts(), hand_config, hand_table)
    assert zero.total == 0.0
    assert layer_energy(LayerCounts(pool_ops=8), hand_config, hand_table) == LayerEnergy(activation_unit=8 * POOL)
    assert layer_energy(LayerCounts(host_in_bytes=2), hand_config, hand_table) == LayerEnergy(host=2 * 16.0)


def test_idle_pe_gating(hand_config, hand_table):
    """Gated idle PEs cost neither their clock nor their register hops; ungated they cost both."""
    ungated = layer_energy(COUNTS, hand_config, hand_table)
    gated = layer_energy(COUNTS, hand_config.replace(**{"energy.idle_pe_gated": True}), hand_table)
    assert ungated.idle_pe == (1536 - 1000) * IDLE_PE
    assert ungated.array_transport == 1536 * HOP
    assert gated.idle_pe == 0.0
    assert gated.array_transport == 1000 * HOP
    assert dataclasses.replace(ungated, idle_pe=0.0, array_transport=1000 * HOP) == gated
    full = dataclasses.replace(COUNTS, mac_slots=COUNTS.macs)
    assert layer_energy(full, hand_config, hand_table).idle_pe == 0.0
    assert layer_energy(full, hand_config, hand_table) == layer_energy(
        full, hand_config.replace(**{"energy.idle_pe_gated": True}), hand_table)


def _simulated_counts(layer, cfg):
    graph = Graph("g", layer.inputs[0], layer.input_shapes[0], (layer.name,), (layer,))
    return simulate(graph, cfg).layers[0].counts


@pytest.mark.parametrize("gated", [False, True])
def test_array_movement_of_a_simulated_gemm(hand_config, hand_table, gated):
    """10 x 20 @ 20 x 20 on the 16x16 array: 2 K folds x 2 column tiles, each streaming the 10 rows over
    all 256 PEs, so 4 x 10 x 256 = 10,240 PE-cycles of which 10 x 20 x 20 = 4,000 do a MAC."""
    cfg = hand_config.replace(**{"energy.idle_pe_gated": gated})
    gemm = Layer("fc", "gemm", ("x",), "fc", ((10, 20),), (10, 20), Activation(),
                 weight=np.zeros((20, 20), np.int8))
    counts = _simulated_counts(gemm, cfg)
    assert (counts.macs, counts.mac_slots) == (4000, 10240)
    e = layer_energy(counts, cfg, hand_table)
    assert e.mac == 4000 * MAC_INT8
    assert e.array_transport == (4000 if gated else 10240) * HOP
    assert e.idle_pe == (0 if gated else 6240 * IDLE_PE)


@pytest.mark.parametrize("gated", [False, True])
def test_array_movement_of_a_simulated_depthwise_conv(hand_config, hand_table, gated):
    """3x3 depthwise conv, 32 channels of 4x4, batch 1: each group is a 16 x 9 @ 9 x 1 GEMM and only
    16 // 9 = 1 fits a tile's rows, so 32 tiles stream 16 rows each over all 256 PEs: 131,072 PE-cycles,
    of which 32 x 16 x 9 = 4,608 do a MAC."""
    cfg = hand_config.replace(**{"energy.idle_pe_gated": gated})
    attrs = ConvAttrs((3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 32)
    dw = Layer("dw", "conv", ("x",), "dw", ((1, 32, 4, 4),), (1, 32, 4, 4), Activation(),
               weight=np.zeros((32, 1, 3, 3), np.int8), conv=attrs)
    counts = _simulated_counts(dw, cfg)
    assert (counts.macs, counts.mac_slots) == (4608, 131072)
    e = layer_energy(counts, cfg, hand_table)
    assert e.array_transport == (4608 if gated else 131072) * HOP
    assert e.idle_pe == (0 if gated else (131072 - 4608) * IDLE_PE)


def test_int8_vs_fp32_mac(hand_config, hand_table):
    fp32 = layer_energy(COUNTS, hand_config.replace(**{"array.datatype": "fp32"}), hand_table)
    assert fp32.mac == 1000 * MAC_FP32
    cfg = load_config(REPO / "configs" / "tpu_v1.yaml")
    shipped = load_energy_table(cfg.energy.table)
    int8_mac = action_prices(cfg, shipped).mac
    fp32_mac = action_prices(cfg.replace(**{"array.datatype": "fp32"}), shipped).mac
    assert fp32_mac / int8_mac == pytest.approx((3.7 + 0.9) / (0.2 + 0.1), rel=1e-12)


def test_memory_technology_selects_dram_energy(hand_config, hand_table):
    hbm = layer_energy(COUNTS, hand_config.replace(**{"weight_memory.technology": "HBM2"}), hand_table)
    assert hbm.weight_dram == 300 * DRAM_HBM2
    with pytest.raises(ConfigError, match=r"hand\.yaml: dram\.GDDR5: missing"):
        layer_energy(COUNTS, hand_config.replace(**{"weight_memory.technology": "GDDR5"}), hand_table)


def test_sram_prices_follow_capacity(hand_config, hand_table):
    bigger = hand_config.replace(**{"unified_buffer.capacity_bytes": 65536})  # 4x beyond the last anchor
    prices = action_prices(bigger, hand_table)
    assert (prices.ub_read_byte, prices.ub_write_byte) == (8.0, 16.0)  # 4 pJ x sqrt(4)


def test_more_macs_than_slots_is_a_bug(hand_config, hand_table):
    with pytest.raises(ValueError, match="MAC slots"):
        layer_energy(LayerCounts(macs=10, mac_slots=9), hand_config, hand_table)


def test_run_energy_totals_and_efficiency(hand_config, hand_table):
    second = LayerCounts(macs=24, mac_slots=32, ub_read_bytes=10)
    run = run_energy([("conv1", COUNTS), ("fc", second)], 0.5, 2_000_000, 4, hand_config, hand_table)
    first_e = layer_energy(COUNTS, hand_config, hand_table)
    second_e = layer_energy(second, hand_config, hand_table)
    assert run.layers == (("conv1", first_e), ("fc", second_e))
    assert run.dynamic == first_e + second_e
    assert run.dynamic_pj == first_e.total + second_e.total
    assert run.static_pj == 28 * 0.5 * 1e12  # tpu_v1's 28 W idle power over the latency
    assert run.total_pj == run.dynamic_pj + run.static_pj
    joules = run.total_pj / 1e12
    assert run.total_power_w == pytest.approx(joules / 0.5, rel=1e-12)
    assert run.total_power_w == pytest.approx(28 + run.dynamic_power_w, rel=1e-12)
    assert run.total_tops_per_w == pytest.approx(4e6 / 1e12 / joules, rel=1e-12)
    assert run.total_inferences_per_j == pytest.approx(4 / joules, rel=1e-12)
    dynamic_joules = run.dynamic_pj / 1e12
    assert run.dynamic_tops_per_w == pytest.approx(4e6 / 1e12 / dynamic_joules, rel=1e-12)
    assert run.dynamic_inferences_per_j == pytest.approx(4 / dynamic_joules, rel=1e-12)
    assert run.summary()["total_inferences_per_j"] == run.total_inferences_per_j


def test_run_without_energy_and_bad_arguments(hand_config, hand_table):
    idle = run_energy([], 1e-3, 0, 1, hand_config.replace(**{"energy.static_power_w": 0}), hand_table)
    assert idle.total_pj == 0.0 and idle.total_inferences_per_j == math.inf
    with pytest.raises(ValueError, match="latency_s"):
        run_energy([], 0.0, 0, 1, hand_config, hand_table)
    with pytest.raises(ValueError, match="batch"):
        run_energy([], 1.0, 0, 0, hand_config, hand_table)


def test_tpu_v1_peak_mac_power():
    """Sanity figure: all 65,536 MACs busy at 700 MHz with the shipped table is 13.76 W of MAC energy,
    plus 16.5 W moving each PE's int8 activation and 32-bit partial sum one register on."""
    cfg = load_config(REPO / "configs" / "tpu_v1.yaml")
    table = load_energy_table(cfg.energy.table)
    cycles = 700_000_000
    macs = 256 * 256 * cycles
    run = run_energy([("peak", LayerCounts(macs=macs, mac_slots=macs))], 1.0, macs, 1, cfg, table)
    assert run.dynamic.mac / 1e12 == pytest.approx(65536 * 0.3 * 700e6 / 1e12, rel=1e-12)
    transport_w = 65536 * 700e6 * 40 * 0.009 / 1e12
    assert run.dynamic.array_transport / 1e12 == pytest.approx(transport_w, rel=1e-12)
    assert run.dynamic_power_w == pytest.approx(13.76256 + transport_w, rel=1e-9)
    assert run.total_tops_per_w == pytest.approx(91.75 / (13.76256 + transport_w + 28), rel=1e-3)
