"""tpusim compare: the grid, the FP32 baseline row, and the Markdown table."""
from __future__ import annotations

import csv
from pathlib import Path

import pytest

from tpusim.api import simulate
from tpusim.cli import main
from tpusim.compare import COLUMNS, CompareRequest, compare, markdown

TPU_V1 = Path(__file__).resolve().parents[1] / "configs" / "tpu_v1.yaml"


@pytest.fixture(scope="module")
def rows():
    return compare(CompareRequest(config=TPU_V1, model="tiny_cnn", calibrations=("percentile", "mse"),
                                  eval_samples=2, progress=False))


def test_grid_and_baseline(rows):
    assert [(r["weights"], r["calibration"]) for r in rows[1:]] == [
        ("per-tensor", "percentile"), ("per-tensor", "mse"), ("per-channel", "percentile"), ("per-channel", "mse")]
    assert rows[0]["weights"].startswith("fp32 baseline") and rows[0]["perf_per_w_gain_vs_fp32"] == 1.0
    for r in rows[1:]:
        assert r["perf_per_w_gain_vs_fp32"] == pytest.approx(r["total_tops_per_w"] / rows[0]["total_tops_per_w"], 1e-3)
        assert r["latency_gain_vs_fp32"] >= 1.0  # int8 moves a quarter of the bytes
    assert all(r["latency_vs_per_tensor_pct"] == 0 for r in rows[1:3])


def test_each_cell_is_what_a_run_with_those_settings_reports(rows):
    by = {(r["weights"], r["calibration"]): r for r in rows[1:]}
    direct = simulate(TPU_V1, "tiny_cnn", eval_samples=2,
                      overrides={"quant.weights": "per-tensor", "quant.calibration": "mse"}).summary
    cell = by[("per-tensor", "mse")]
    assert cell["top1_agreement"] == direct["fidelity"]["top1_agreement"]
    assert cell["output_sqnr_db"] == round(direct["fidelity"]["output_sqnr_db"], 3)  # compare.csv keeps 3 decimals
    assert cell["total_tops_per_w"] == direct["energy"]["total_tops_per_w"]


def test_per_channel_is_more_faithful_on_this_model(rows):
    by = {(r["weights"], r["calibration"]): r for r in rows[1:]}
    assert by[("per-channel", "mse")]["output_sqnr_db"] > by[("per-tensor", "mse")]["output_sqnr_db"]


def test_markdown_has_a_row_per_point(rows):
    text = markdown(rows, "t")
    assert text.count("| int8 ") == 4 and "reference" in text and "synthetic" in text


def test_cli_writes_csv_and_markdown(tmp_path, capsys):
    code = main(["compare", str(TPU_V1), "--model", "tiny_cnn", "--weights", "per-channel", "--calibration", "minmax",
                 "--baseline", "none", "--eval-samples", "1", "--no-progress", "--out", str(tmp_path)])
    assert code == 0
    written = list(csv.DictReader((tmp_path / "compare.csv").open()))
    assert len(written) == 1 and list(written[0]) == list(COLUMNS)
    assert (tmp_path / "compare.md").read_text().startswith("### tiny_cnn")
    with pytest.raises(SystemExit) as info:
        main(["compare", str(TPU_V1), "--model", "tiny_cnn", "--calibration", "kl"])
    assert info.value.code == 2


def test_the_title_names_the_batch_that_ran(tmp_path, capsys):
    assert main(["compare", str(TPU_V1), "--model", "tiny_cnn", "--weights", "per-channel", "--calibration",
                 "percentile", "--baseline", "none", "--eval-samples", "1", "--out", str(tmp_path)]) == 0
    assert "tiny_cnn on tpu_v1, batch 1" in (tmp_path / "compare.md").read_text()
    assert [r["batch"] for r in csv.DictReader((tmp_path / "compare.csv").open())] == ["1"]
