"""What `tpusim run` prints and writes: the 100-column table, the summary lines, typed CSV cells, the
per-inference energy and the agreement counts in summary.json."""
from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tpusim.report.run_report import TERMINAL_LEGEND, TERMINAL_WIDTH, terminal_summary, terminal_table

REPO = Path(__file__).resolve().parents[2]
TPU_V1 = REPO / "configs" / "tpu_v1.yaml"
# layers.csv's columns that hold a float; every other column but the two names holds an integer.
FLOAT_COLUMNS = {"utilization", "energy_pj", "sqnr_db"}
TEXT_COLUMNS = {"layer", "op"}


def _row(layer, op, m, k, n, cycles, utilization, active, stall, shift, non_matrix):
    return {"layer": layer, "op": op, "M": m, "K": k, "N": n, "cycles": cycles, "utilization": utilization,
            "active_cycles": active, "weight_stall_cycles": stall, "weight_shift_cycles": shift,
            "non_matrix_cycles": non_matrix}


def test_the_table_shows_chosen_columns_with_separators_and_percentages():
    rows = [_row("conv1", "conv", 12544, 147, 64, 19935, 0.090326, 12544, 0, 0, 7391),
            _row("maxpool_1", "maxpool", 0, 0, 0, 7599, 0.0, 0, 0, 0, 7599),
            _row("fc", "gemm", 1, 2048, 1000, 2813, 0.002758, 8, 2549, 248, 8)]
    assert terminal_table(rows).splitlines() == [
        "layer      op            M      K      N  cycles  util %  active  weights  other",
        "---------  -------  ------  -----  -----  ------  ------  ------  -------  -----",
        "conv1      conv     12,544    147     64  19,935     9.0  12,544        0  7,391",
        "maxpool_1  maxpool                         7,599     0.0       0        0  7,599",
        "fc         gemm          1  2,048  1,000   2,813     0.3       8    2,797      8",
        TERMINAL_LEGEND,
    ]


def test_the_table_fits_100_columns_with_long_names_and_counts_in_the_tens_of_millions():
    rows = [_row("encoder.layer.11.attention.self.query.matmul_" + "x" * 40, "global_avgpool", 802_816, 4608, 3072,
                 12_345_678, 1.0, 10_000_000, 1_000_000, 1_000_000, 345_678)] * 3
    lines = terminal_table(rows).splitlines()
    assert max(len(line) for line in lines) <= TERMINAL_WIDTH
    assert lines[2].startswith("enc...xxx  global_avgpool  802,816")


def test_more_than_40_layers_are_cut_with_a_count():
    rows = [_row(f"l{i}", "add", 0, 0, 0, 1, 0.0, 0, 0, 0, 1) for i in range(45)]
    lines = terminal_table(rows).splitlines()
    assert len(lines) == 2 + 39 + 2 and lines[-2] == "... 6 more rows"


SUMMARY = {
    "macs": 4_089_184_256, "batch": 1, "total_cycles": 667_838, "latency_s": 9.540542857142857e-4,
    "tops": 8.5722, "inferences_per_s": 1048.16, "utilization": 0.09338,
    "energy": {"total_power_w": 45.31, "total_tops_per_w": 0.18919, "dynamic_tops_per_w": 0.49512},
    "energy_per_inference_uj": {"total": 43_234.1, "dynamic": 16_520.4, "static": 26_713.7},
    "calibration": {"quantization_source": "calibration", "weights": "per-channel", "method": "percentile"},
    "fidelity": {"top1_agreement": 0.9375, "top5_agreement": 1.0, "samples": 16, "agreement_rows": 16, "cosine": 0.99876,
                 "output_sqnr_db": 25.98, "evaluated_on": "synthetic N(0,1), seed 1, 16 samples (held out)"},
}


def test_the_summary_lines_give_units_by_magnitude_and_the_agreement_basis():
    assert terminal_summary("resnet50", 73, SUMMARY) == [
        "resnet50: 73 layers, 4,089,184,256 MACs, batch 1",
        "667,838 cycles = 954.1 us; 8.572 TOPS; 1,048 inferences/s; utilization 9.3 %",
        "energy 43.23 mJ per inference (16.52 mJ dynamic); 45.3 W; 0.189 TOPS/W (0.495 dynamic only)",
        "int8 (per-channel weights, percentile calibration) vs FP32:",
        "  top-1 agreement 15/16 (94 %), top-5 16/16 (100 %), cosine 0.9988, output SQNR 26.0 dB",
        "  on synthetic N(0,1), seed 1, 16 samples (held out)",
    ]


def test_a_model_with_an_output_per_token_counts_agreement_over_its_rows():
    tokens = {**SUMMARY["fidelity"], "top1_agreement": 0.900390625, "top5_agreement": 1.0, "agreement_rows": 2048}
    lines = terminal_summary("bert_base", 12, {**SUMMARY, "fidelity": tokens})
    assert lines[-2:] == [
        "  top-1 agreement 1,844/2,048 (90 %), top-5 2,048/2,048 (100 %), cosine 0.9988, output SQNR 26.0 dB",
        "  on synthetic N(0,1), seed 1, 16 samples (held out); 2,048 output rows, 128 per sample",
    ]


def test_without_quantization_there_is_no_fidelity_line():
    s = {k: v for k, v in SUMMARY.items() if k not in ("fidelity", "calibration")}
    assert len(terminal_summary("resnet50", 73, s)) == 3


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """`tpusim run` of the tiny model as a user types it, in a fresh process."""
    cwd = tmp_path_factory.mktemp("run")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-m", "tpusim", "run", str(TPU_V1), "--model", "tiny_cnn", "--out", "out",
                           "--no-progress", "--eval-samples", "3"], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout, cwd / "out"


def test_run_prints_no_line_over_100_columns(tiny_run):
    stdout, _ = tiny_run
    assert max(len(line) for line in stdout.splitlines()) <= 100
    assert re.search(r"^  top-1 agreement \d/3 \(\d+ %\), top-5 \d/3 \(\d+ %\), ", stdout, re.MULTILINE)
    assert "e+" not in stdout  # no number in exponent notation


def test_every_integer_column_of_layers_csv_parses_as_an_integer(tiny_run):
    _, out = tiny_run
    with (out / "layers.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    int_columns = [c for c in rows[0] if c not in FLOAT_COLUMNS | TEXT_COLUMNS]
    assert {"M", "K", "N", "groups", "steps", "wrapped_accumulations"} <= set(int_columns)
    for row in rows:
        for column in int_columns:
            assert re.fullmatch(r"-?\d+", row[column]), (row["layer"], column, row[column])
    maxpool = next(r for r in rows if r["op"] == "maxpool")
    assert (maxpool["M"], maxpool["K"], maxpool["N"], maxpool["groups"], maxpool["steps"]) == ("0",) * 5


def test_summary_has_per_inference_energy_and_agreement_counts(tiny_run):
    _, out = tiny_run
    s = json.loads((out / "summary.json").read_text())
    per, e, f = s["energy_per_inference_uj"], s["energy"], s["fidelity"]
    assert per["total"] == e["total_pj"] / 1e6 / s["batch"]
    assert per["dynamic"] == e["dynamic_pj"] / 1e6 / s["batch"] and per["static"] == e["static_pj"] / 1e6 / s["batch"]
    assert f["samples"] == f["agreement_rows"] == 3  # one output row (of logits) per sample
    assert f["top1_agreeing_rows"] / 3 == f["top1_agreement"] and f["top5_agreeing_rows"] / 3 == f["top5_agreement"]


def test_ub_stall_cycles_come_last_in_layers_csv_and_in_the_summary_breakdown(tiny_run):
    from tpusim.report.run_report import ENERGY_COLUMNS, QUANT_COLUMNS, TIMING_COLUMNS

    _, out = tiny_run
    with (out / "layers.csv").open(newline="") as handle:
        reader = csv.DictReader(handle)
        rows = list(reader)
    # every earlier column keeps its place; the new one is appended
    assert reader.fieldnames == list(TIMING_COLUMNS + ENERGY_COLUMNS + QUANT_COLUMNS) + ["ub_stall_cycles"]
    for row in rows:
        parts = sum(int(row[c]) for c in ("raw_stall_cycles", "input_stall_cycles", "ub_stall_cycles"))
        assert parts <= int(row["non_matrix_cycles"])
    s = json.loads((out / "summary.json").read_text())
    assert s["breakdown"]["ub_stall_cycles"] == sum(int(row["ub_stall_cycles"]) for row in rows)


def test_a_layers_ub_stall_reaches_its_row():
    import numpy as np

    from tpusim.config import load_config
    from tpusim.ir import Graph, Layer
    from tpusim.report.run_report import layer_rows
    from tpusim.sim import simulate

    m, k, n = 100, 512, 256
    fc = Layer("fc", "gemm", ("x",), "fc", ((m, k),), (m, n), weight=np.zeros((n, k), np.int8))
    # 256-byte input rows over a 128-byte port: the MXU waits 100 cycles after each of the two K folds
    narrow = load_config(TPU_V1, {"unified_buffer.port_bytes_per_cycle": 128})
    sim = simulate(Graph("g", "x", (m, k), ("fc",), (fc,)), narrow)
    (row,) = layer_rows(sim)
    assert row["ub_stall_cycles"] == sim.layers[0].breakdown.ub_stall == 200
