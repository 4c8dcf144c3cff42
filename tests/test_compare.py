"""tpusim compare: the grid, the FP32 baseline row, and the Markdown table."""
from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from tpusim.api import simulate
from tpusim.cli import build_parser, main
from tpusim.compare import COLUMNS, CompareRequest, compare, markdown, terminal_rows
from tpusim.errors import ConfigError, TpusimWarning
from tpusim.pipeline import RunOptions
from tpusim.report.tables import format_table

REPO = Path(__file__).resolve().parents[1]
TPU_V1 = REPO / "configs" / "tpu_v1.yaml"


@pytest.fixture(scope="module")
def compared():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rows = compare(CompareRequest(config=TPU_V1, model="tiny_cnn", calibrations=("percentile", "mse"),
                                      eval_samples=2, progress=False))
    return rows, [w for w in caught if issubclass(w.category, TpusimWarning)]


@pytest.fixture(scope="module")
def rows(compared):
    return compared[0]


def test_grid_and_baseline(rows):
    assert [(r["weights"], r["calibration"]) for r in rows[1:]] == [
        ("per-tensor", "percentile"), ("per-tensor", "mse"), ("per-channel", "percentile"), ("per-channel", "mse")]
    assert rows[0]["perf_per_w_gain_vs_fp32"] == 1.0
    # What a row is has its own columns: the weights column holds only a weight granularity.
    assert (rows[0]["row"], rows[0]["datatype"], rows[0]["config"], rows[0]["weights"]) == ("baseline", "fp32", "tpu_v1", "")
    assert all((r["row"], r["datatype"]) == ("quantized", "int8") for r in rows[1:])
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
    assert text.count("| int8 ") == 4 and "| fp32 baseline (tpu_v1) | -- | reference |" in text and "synthetic" in text


def test_every_row_says_how_many_samples_its_agreement_counts(rows):
    for r in rows[1:]:
        assert r["eval_samples"] == 2 and r["evaluated_on"] == "synthetic N(0,1), seed 1, 2 samples (held out)"
        assert r["agreement_rows"] == 2  # one row of logits per sample
        assert r["top1_agreeing_rows"] / 2 == r["top1_agreement"] and r["top5_agreeing_rows"] / 2 == r["top5_agreement"]
        assert r["synthetic_calibration"] is True
    assert (rows[0]["eval_samples"], rows[0]["top1_agreeing_rows"], rows[0]["synthetic_calibration"]) == (2, 2, False)


def test_synthetic_calibration_is_warned_once_for_the_whole_grid(compared):
    _, caught = compared
    assert [str(w.message) for w in caught] == [
        "calibrated on SYNTHETIC data (synthetic N(0,1), seed 0, 32 samples); pass --calib-data for ranges (and "
        "fidelity) that mean something for real inputs"]


def _point(weights, calibration, top1, top5, sqnr, gain, latency_pct):
    return {"row": "quantized", "datatype": "int8", "config": "tpu_v1", "weights": weights, "calibration": calibration,
            "top1_agreement": top1, "top5_agreement": top5, "eval_samples": 16, "agreement_rows": 16, "output_sqnr_db": sqnr,
            "perf_per_w_gain_vs_fp32": gain, "dynamic_perf_per_w_gain_vs_fp32": gain + 0.2,
            "latency_vs_per_tensor_pct": latency_pct, "per_channel_overhead_pct_of_latency": latency_pct,
            "per_channel_overhead_pct_of_dynamic_energy": 0.05, "requant_pct_of_dynamic_energy": 0.48,
            "calibration_data": "synthetic N(0,1), seed 0, 32 samples",
            "evaluated_on": "synthetic N(0,1), seed 1, 16 samples (held out)"}


HAND_ROWS = [
    {"row": "baseline", "datatype": "fp32", "config": "tpu_v1", "weights": "", "calibration": "", "output_sqnr_db": "",
     "perf_per_w_gain_vs_fp32": 1.0, "latency_vs_per_tensor_pct": "", "calibration_data": "", "evaluated_on": ""},
    _point("per-tensor", "percentile", 0.8125, 1.0, 17.71, 3.48, 0.0),
    _point("per-channel", "mse", 1.0, 1.0, 26.2, 3.477, 8.125),
]


def test_markdown_states_the_basis_of_every_agreement_figure():
    assert markdown(HAND_ROWS, "t").splitlines()[4:] == [
        "| fp32 baseline (tpu_v1) | -- | reference | 1.00x | -- | -- |",
        "| int8 per-tensor | percentile | 13/16 (81 %) / 16/16 (100 %), 17.7 dB | 3.48x / 3.68x | +0.00 % | "
        "+0.00 % / +0.05 %; 0.48 % |",
        "| int8 per-channel | mse | 16/16 (100 %) / 16/16 (100 %), 26.2 dB | 3.48x / 3.68x | +8.12 % | "
        "+8.12 % / +0.05 %; 0.48 % |",
        "",
        "Calibration data: synthetic N(0,1), seed 0, 32 samples. Agreement with FP32 counted on synthetic N(0,1), "
        "seed 1, 16 samples (held out).",
    ]


def test_the_terminal_table_shows_agreement_as_a_count():
    from tpusim.compare import TERMINAL_COLUMNS, TERMINAL_HEADERS

    text = format_table(TERMINAL_COLUMNS, terminal_rows(HAND_ROWS), left=("method", "calibration"),
                        headers=TERMINAL_HEADERS)
    assert text.splitlines() == [
        "method                  calibration  top-1 agreement  SQNR dB  perf/W vs FP32  latency vs per-tensor",
        "----------------------  -----------  ---------------  -------  --------------  ---------------------",
        "fp32 baseline (tpu_v1)  --                 reference                    1.00x",
        "int8 per-tensor         percentile      13/16 (81 %)     17.7           3.48x                +0.00 %",
        "int8 per-channel        mse            16/16 (100 %)     26.2           3.48x                +8.12 %",
    ]


def test_run_and_compare_measure_fidelity_on_the_same_default_number_of_samples():
    parser = build_parser()
    compare_default = parser.parse_args(["compare", str(TPU_V1), "--model", "m"]).eval_samples
    run_default = parser.parse_args(["run", str(TPU_V1), "--model", "m"]).eval_samples
    assert RunOptions.eval_samples == CompareRequest.eval_samples == compare_default == run_default == 16


def test_cli_warns_on_stderr_and_flags_synthetic_data_in_the_csv(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-m", "tpusim", "compare", str(TPU_V1), "--model", "tiny_cnn", "--weights",
                           "per-channel", "--calibration", "minmax", "--eval-samples", "2", "--no-progress", "--out",
                           "out"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("tpusim: warning: calibrated on SYNTHETIC data") == 1
    assert max(len(line) for line in done.stdout.splitlines()) <= 100
    written = list(csv.DictReader((tmp_path / "out" / "compare.csv").open()))
    assert [(r["row"], r["weights"], r["synthetic_calibration"]) for r in written] == [
        ("baseline", "", "False"), ("quantized", "per-channel", "True")]
    assert "counted on synthetic N(0,1), seed 1, 2 samples (held out)" in (tmp_path / "out" / "compare.md").read_text()


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


def _tpusim_in_process(capsys, monkeypatch, cwd: Path, *argv: str) -> subprocess.CompletedProcess:
    """``tpusim ARGV`` run by ``main`` in this process from ``cwd`` (no 1.5-2.5 s of imports a call; the
    warning test above runs the console script itself), as a finished process."""
    monkeypatch.chdir(cwd)
    try:
        code = main(list(argv))
    except SystemExit as exit_:  # argparse's errors
        code = exit_.code
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(["tpusim", *argv], code, out, err)


@pytest.mark.parametrize("baseline, reason", [("fp16", "no such file"), (".", "a folder")])
def test_a_bad_baseline_is_one_line_listing_the_choices_before_any_run(tmp_path, capsys, monkeypatch, baseline,
                                                                        reason):
    done = _tpusim_in_process(capsys, monkeypatch, tmp_path, "compare", str(TPU_V1), "--model", "tiny_cnn",
                              "--baseline", baseline, "--out", "out")
    # progress is on: no phase line may come before the error
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr == f"tpusim: error: --baseline {baseline}: expected fp32, none or a config file ({reason})\n"
    assert not (tmp_path / "out").exists()


def test_a_baseline_config_is_checked_before_any_run(tmp_path):
    broken = tmp_path / "baseline.yaml"
    broken.write_text(TPU_V1.read_text().replace("rows: 256", "rows: 0", 1))
    with pytest.raises(ConfigError, match=r"baseline.yaml: array.rows: must be >= 1"):
        compare(CompareRequest(config=TPU_V1, model="not_a_workload", baseline=str(broken), progress=False))


def test_progress_is_one_counted_phase_of_runs_in_plain_lines(tmp_path, capsys, monkeypatch):
    done = _tpusim_in_process(capsys, monkeypatch, tmp_path, "compare", str(TPU_V1), "--model", "tiny_cnn",
                              "--weights", "per-tensor,per-channel", "--calibration", "minmax", "--eval-samples", "1",
                              "--out", "out")
    assert done.returncode == 0, done.stderr
    assert "\r" not in done.stderr and "\x1b" not in done.stderr
    lines = [line for line in done.stderr.splitlines() if not line.startswith("tpusim: warning: ")]
    assert len(lines) == 2 and lines[0] == "tpusim: comparing (3 runs) ..."
    assert re.fullmatch(r"tpusim: comparing: 3 runs in \d+\.\d\d s", lines[1]), lines


def test_no_progress_prints_no_phase_lines(tmp_path, capsys, monkeypatch):
    done = _tpusim_in_process(capsys, monkeypatch, tmp_path, "compare", str(TPU_V1), "--model", "tiny_cnn",
                              "--weights", "per-tensor", "--calibration", "minmax", "--baseline", "none",
                              "--eval-samples", "1", "--no-progress", "--out", "out")
    assert done.returncode == 0, done.stderr
    assert [line for line in done.stderr.splitlines() if not line.startswith("tpusim: warning: ")] == []


@pytest.mark.parametrize("baseline", [None, "none"])
def test_no_baseline_is_none_in_the_api_as_on_the_command_line(baseline):
    with pytest.warns(TpusimWarning, match="SYNTHETIC"):
        rows = compare(CompareRequest(config=TPU_V1, model="tiny_cnn", weights=("per-tensor",),
                                      calibrations=("minmax",), baseline=baseline, eval_samples=1, progress=False))
    assert [r["row"] for r in rows] == ["quantized"] and "perf_per_w_gain_vs_fp32" not in rows[0]
