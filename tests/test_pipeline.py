"""`tpusim run` end to end on the tiny model: every report, quantization on every run, bad calibration data,
the PE-level fidelity mode, and the QDQ export."""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from tpusim import pipeline
from tpusim.cli import main
from tpusim.config import load_config
from tpusim.frontend import load_onnx
from tpusim.quant.calibrate import collect_statistics, synthetic_inputs
from tpusim.quant.execute import run_integer
from tpusim.quant.quantize import quantize_graph
from tpusim.quant.stage import _PeArrayUnit
from tpusim.report.plots import render_png
from tpusim.workloads import workload_file

TPU_V1 = str(Path(__file__).resolve().parents[1] / "configs" / "tpu_v1.yaml")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    assert main(["run", TPU_V1, "--model", "tiny_cnn", "--out", str(out), "--no-progress", "--eval-samples", "2",
                 "--fidelity", "pe"]) == 0
    return out


def test_every_report_is_written(tiny_run):
    names = {p.name for p in tiny_run.iterdir()}
    assert names == {"layers.csv", "energy.csv", "rescale.csv", "summary.json", "config.yaml",
                     "latency_breakdown.png", "energy_breakdown.png", "roofline.png"}
    for png in ("latency_breakdown.png", "energy_breakdown.png", "roofline.png"):
        assert (tiny_run / png).read_bytes()[:8] == PNG_MAGIC


def test_the_figures_of_the_command_line_are_the_bytes_drawn_in_process(tmp_path):
    # A fresh process has no matplotlib: it draws in its worker (tpusim.report.figure_worker), this one here
    out = tmp_path / "run"
    result = subprocess.run([sys.executable, "-m", "tpusim", "run", TPU_V1, "--model", "tiny_cnn", "--no-quantize",
                             "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    config, graph, _ = pipeline.prepare(pipeline.RunOptions(config=Path(TPU_V1), model="tiny_cnn"))
    _, sim, energy = pipeline.time_and_energy(graph, config)
    for name, job in pipeline.run_figures(config, sim, energy).items():
        assert (out / name).read_bytes() == render_png(job), name


def test_energy_csv_sums_to_the_summary(tiny_run):
    rows = list(csv.DictReader((tiny_run / "energy.csv").open()))
    summary = json.loads((tiny_run / "summary.json").read_text())
    for row in rows:
        parts = sum(float(v) for k, v in row.items() if k.endswith("_pj") and k != "total_pj")
        assert parts == pytest.approx(float(row["total_pj"]), rel=1e-6)
    assert sum(float(r["total_pj"]) for r in rows) == pytest.approx(summary["energy"]["dynamic_pj"], rel=1e-6)
    e = summary["energy"]
    assert e["static_pj"] == pytest.approx(28.0 * summary["latency_s"] * 1e12)
    assert e["total_tops_per_w"] == pytest.approx(2 * summary["macs"] / (e["total_pj"] * 1e-12) / 1e12)


def test_quantization_columns_and_pe_fidelity(tiny_run):
    rows = list(csv.DictReader((tiny_run / "layers.csv").open()))
    summary = json.loads((tiny_run / "summary.json").read_text())
    matrix = [r for r in rows if r["op"] in ("conv", "gemm")]
    assert all(float(r["sqnr_db"]) > 10 for r in matrix)
    # What pe_array_cycles counts: the PE-level array stepping each group's T tiles back to back, weights
    # always ready (R to shift the first in, max(M, R) per further tile, then M + R + C - 2 to drain), for
    # every group and every evaluation sample.
    rows_, cols = 256, 256
    for r in matrix:
        m, k, n, groups = (int(r[c]) for c in ("M", "K", "N", "groups"))
        tiles = -(-k // rows_) * -(-n // cols)
        per_group = rows_ + (tiles - 1) * max(m, rows_) + m + rows_ + cols - 2
        assert int(r["pe_array_cycles"]) == summary["fidelity"]["samples"] * groups * per_group, r["layer"]
    assert summary["calibration"]["synthetic"] is True and summary["fidelity"]["samples"] == 2
    assert summary["fidelity"]["wrapped_accumulations"] == 0


def test_pe_fidelity_follows_the_weight_double_buffering_switch(tiny_run, tmp_path):
    # without shadow registers every tile runs alone: 2R + C + M - 2 cycles each, the values unchanged
    assert main(["run", TPU_V1, "--model", "tiny_cnn", "--out", str(tmp_path), "--no-progress", "--eval-samples",
                 "2", "--fidelity", "pe", "--set", "array.weight_double_buffering=false"]) == 0
    single = list(csv.DictReader((tmp_path / "layers.csv").open()))
    samples = json.loads((tmp_path / "summary.json").read_text())["fidelity"]["samples"]
    rows_, cols = 256, 256
    for r in (r for r in single if r["op"] in ("conv", "gemm")):
        m, k, n, groups = (int(r[c]) for c in ("M", "K", "N", "groups"))
        tiles = -(-k // rows_) * -(-n // cols)
        assert int(r["pe_array_cycles"]) == samples * groups * tiles * (2 * rows_ + cols + m - 2), r["layer"]
    double = list(csv.DictReader((tiny_run / "layers.csv").open()))
    assert [r["sqnr_db"] for r in single] == [r["sqnr_db"] for r in double]


def test_pe_array_computes_the_same_values_as_the_kernel(tiny_run, tmp_path):
    assert main(["run", TPU_V1, "--model", "tiny_cnn", "--out", str(tmp_path), "--no-progress", "--eval-samples",
                 "2"]) == 0
    kernel = list(csv.DictReader((tmp_path / "layers.csv").open()))
    pe = list(csv.DictReader((tiny_run / "layers.csv").open()))
    assert [r["sqnr_db"] for r in kernel] == [r["sqnr_db"] for r in pe]
    assert "pe_array_cycles" not in kernel[0]


def _bad_data(tmp_path, kind):
    if kind == "wrong shape":
        path = tmp_path / "x.npy"
        np.save(path, np.zeros((4, 3, 16, 16), np.float32))
    elif kind == "wrong dtype":
        path = tmp_path / "x.npy"
        np.save(path, np.array([["a"] * 3] * 2))
    elif kind == "nan":
        path = tmp_path / "x.npy"
        data = np.zeros((4, 3, 32, 32), np.float32)
        data[1, 2, 3, 4] = np.nan
        np.save(path, data)
    elif kind == "empty folder":
        path = tmp_path / "images"
        path.mkdir()
    else:
        path = tmp_path / "notes.txt"
        path.write_text("hello")
    return path


@pytest.mark.parametrize("kind, message", [
    ("wrong shape", "expected samples of shape (3, 32, 32)"),
    ("wrong dtype", "expected a numeric array"),
    ("nan", "NaN or inf"),
    ("empty folder", "no images"),
    ("text file", "must be a .npy/.npz file or a folder of images"),
])
def test_bad_calibration_data_is_one_line_and_exit_2(tmp_path, capsys, kind, message):
    path = _bad_data(tmp_path, kind)
    out = tmp_path / "out"
    code = main(["run", TPU_V1, "--model", "tiny_cnn", "--calib-data", str(path), "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and message in err and str(path) in err and err.count("\n") == 1
    assert not out.exists()


def test_real_calibration_data_from_npy_and_images(tmp_path, capsys):
    rng = np.random.default_rng(0)
    data = tmp_path / "calib.npy"
    np.save(data, rng.standard_normal((40, 3, 32, 32)).astype(np.float32))
    assert main(["run", TPU_V1, "--model", "tiny_cnn", "--calib-data", str(data), "--out", str(tmp_path / "a"),
                 "--no-progress", "--eval-samples", "2"]) == 0
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert summary["calibration"]["synthetic"] is False and summary["calibration"]["samples"] == 32
    assert summary["fidelity"]["evaluated_on"].startswith("2 held-out samples")
    assert "SYNTHETIC" not in capsys.readouterr().err
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    assert main(["run", TPU_V1, "--model", "tiny_cnn", "--calib-data", str(folder), "--out", str(tmp_path / "b"),
                 "--no-progress", "--eval-samples", "1"]) == 0


def test_quantize_exports_qdq_that_onnxruntime_runs(tmp_path, capsys):
    out = tmp_path / "tiny_int8.onnx"
    assert main(["quantize", TPU_V1, "--model", "tiny_cnn", "--weights", "per-tensor", "--calibration", "mse",
                 "-o", str(out)]) == 0
    assert "per-tensor weights, mse calibration" in capsys.readouterr().out
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    y = session.run(None, {session.get_inputs()[0].name: np.zeros((1, 3, 32, 32), np.float32)})[0]
    assert y.shape == (1, 10) and np.all(np.isfinite(y))
    code = main(["quantize", TPU_V1, "--model", "tiny_cnn", "--set", "array.datatype=fp32", "-o", str(tmp_path / "x")])
    assert code == 2 and not (tmp_path / "x").exists()


def test_accumulator_width_reaches_the_integers(tmp_path):
    """A 16-bit accumulator wraps in the integer execution itself, and the run says where."""
    narrow = pipeline.run(pipeline.RunOptions(config=Path("configs/tpu_v1.yaml"), model="tiny_cnn", out_dir=tmp_path,
                                              overrides={"accumulators.bits": 16, "quant.calibration_samples": 4},
                                              eval_samples=1))
    wrapped = narrow.evaluation.quant.fidelity.wrapped
    assert sum(wrapped.values()) > 0
    assert narrow.summary["fidelity"]["wrapped_accumulations"] == sum(wrapped.values())
    assert any("wrapped around the 16-bit accumulator" in w for w in narrow.evaluation.warnings)


def test_pe_array_and_kernel_give_identical_integers_in_every_tensor():
    """--fidelity pe computes with the PE-level array what the default run computes with the int8 GEMM:
    the same integers in every tensor of the network, not only the same SQNR."""
    path = workload_file("tiny_cnn")
    graph = load_onnx(path)
    data = synthetic_inputs(graph.input_shape[1:], 2, seed=0)
    qgraph = quantize_graph(graph, collect_statistics(onnx.load(str(path)), graph, data, 2048),
                            load_config(TPU_V1).quant)
    kernel = run_integer(qgraph, data.inputs[:1], keep_all=True).tensors
    for double_buffered in (True, False):
        pe = run_integer(qgraph, data.inputs[:1], keep_all=True, engine=_PeArrayUnit(256, 256, double_buffered)).tensors
        assert kernel.keys() == pe.keys()
        for name in kernel:
            np.testing.assert_array_equal(kernel[name], pe[name], err_msg=name)
