"""The command line: outputs land atomically; bad input is one line on stderr and exit code 2."""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
from onnx_graphs import GraphBuilder

from tpusim.cli import main

TPU_V1 = str(Path(__file__).resolve().parents[1] / "configs" / "tpu_v1.yaml")


@pytest.fixture()
def small_model(tmp_path) -> Path:
    b = GraphBuilder((1, 3, 16, 16))
    y = b.node("Relu", [b.batchnorm(b.conv("input", 3, 8, bias=False, pads=[1, 1, 1, 1]), 8)])
    y = b.node("Flatten", [b.node("GlobalAveragePool", [y])])
    y = b.node("Gemm", [y, b.weight((10, 8))], transB=1)
    path = tmp_path / "small.onnx"
    onnx.save(b.model(y), path)
    return path


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_run_writes_layer_table_and_effective_config(tmp_path, small_model, capsys):
    out = tmp_path / "out"
    code, stdout, _ = _run(capsys, "run", TPU_V1, "--model", small_model, "--out", out, "--batch", 2,
                           "--set", "array.rows=128")
    assert code == 0
    rows = list(csv.DictReader((out / "layers.csv").open()))
    assert [r["op"] for r in rows] == ["conv", "global_avgpool", "reshape", "gemm"]
    conv = rows[0]
    assert (int(conv["M"]), int(conv["K"]), int(conv["N"])) == (2 * 16 * 16, 27, 8)
    assert int(conv["macs"]) == 2 * 16 * 16 * 27 * 8 and int(conv["dram_bytes"]) == 8 * 27
    for row in rows:
        parts = sum(int(row[c]) for c in ("active_cycles", "weight_stall_cycles", "weight_shift_cycles",
                                          "non_matrix_cycles"))
        assert parts == int(row["cycles"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["batch"] == 2 and summary["macs"] == sum(int(r["macs"]) for r in rows)
    assert summary["total_cycles"] == sum(int(r["cycles"]) for r in rows)
    assert "rows: 128" in (out / "config.yaml").read_text()
    assert "layers.csv" in stdout
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("argv, message", [
    (["run", "missing.yaml", "--model", "MODEL"], "missing.yaml: no such config file"),
    (["run", TPU_V1, "--model", "nonexistent.onnx"], "nonexistent.onnx: no such model file"),
    (["run", TPU_V1, "--model", "not_a_workload"], "not a file and not a built-in workload"),
    (["run", TPU_V1, "--model", "MODEL", "--set", "array.rows=0"], "array.rows: must be >= 1"),
    (["run", TPU_V1, "--model", "MODEL", "--set", "array.rows"], "expected KEY.PATH=VALUE"),
])
def test_bad_input_is_one_line_and_exit_code_2(tmp_path, small_model, capsys, argv, message):
    argv = [str(small_model) if a == "MODEL" else a for a in argv]
    out = tmp_path / "never"
    code, _, stderr = _run(capsys, *argv, "--out", out)
    assert code == 2
    assert stderr.count("\n") == 1 and message in stderr and "Traceback" not in stderr
    assert not out.exists()


def test_argument_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as info:
        main(["run", TPU_V1, "--model", "x", "--batch", "0"])
    assert info.value.code == 2


def test_console_entry_point_help():
    for argv in (["--help"], ["run", "--help"], ["workloads", "list", "--help"]):
        result = subprocess.run([sys.executable, "-m", "tpusim", *argv], capture_output=True, text=True, timeout=120)
        assert result.returncode == 0 and "usage: tpusim" in result.stdout


def test_compile_listing_has_one_line_per_instruction(tmp_path, small_model, capsys):
    code, stdout, _ = _run(capsys, "compile", TPU_V1, "--model", small_model, "--listing")
    assert code == 0
    lines = stdout.strip().splitlines()
    assert lines[0].split()[1] == "RHM" and any(" MMUL " in line for line in lines)
    layer_names = {line.rsplit("; ", 1)[1] for line in lines}
    # A reshape is only a new view of the same unified-buffer bytes: it has no instruction.
    assert sorted(name.split("_node")[0] for name in layer_names) == ["Conv", "Gemm", "GlobalAveragePool"]
    out = tmp_path / "listing.txt"
    code, _, _ = _run(capsys, "compile", TPU_V1, "--model", small_model, "-o", out)
    assert code == 0 and out.read_text().strip().splitlines() == lines
    code, stdout, _ = _run(capsys, "compile", TPU_V1, "--model", small_model)
    assert "instructions for 4 layers" in stdout and "MatrixMultiply" in stdout


def test_input_shape_n_is_the_batch(tmp_path, small_model, capsys):
    code, stdout, _ = _run(capsys, "run", TPU_V1, "--model", small_model, "--out", tmp_path / "o", "--no-quantize",
                           "--input-shape", "3,3,16,16")
    assert code == 0
    assert json.loads((tmp_path / "o" / "summary.json").read_text())["batch"] == 3


def test_check_lists_every_node_and_exits_0_when_all_are_supported(capsys):
    from tpusim import workloads

    code, stdout, _ = _run(capsys, "check", workloads.workload_file("tiny_cnn"))
    assert code == 0
    nodes = len(onnx.load(str(workloads.workload_file("tiny_cnn"))).graph.node)
    assert f"{nodes} nodes: {nodes} lowered" in stdout


def test_check_names_every_unsupported_op_with_counts(tmp_path, capsys):
    b = GraphBuilder((1, 3, 4, 4))
    x = b.conv("input", 3, 4)
    y = b.node("Hardmax", [b.node("Hardmax", [b.node("LpNormalization", [x])])])
    path = tmp_path / "m.onnx"
    onnx.save(b.model(y), path)
    code, stdout, stderr = _run(capsys, "check", path)
    assert code == 2
    assert stderr == f"tpusim: error: {path}: unsupported ops: Hardmax x2, LpNormalization x1\n"
    assert sum(line.split()[1:2] == ["unsupported"] for line in stdout.splitlines()) == 3
    assert "4 nodes: 1 lowered, 3 unsupported" in stdout
    code, _, stderr = _run(capsys, "run", TPU_V1, "--model", path, "--no-quantize", "--out", tmp_path / "o")
    assert code == 2 and "unsupported ops: Hardmax x2, LpNormalization x1" in stderr and stderr.count("\n") == 1
    assert not (tmp_path / "o").exists()
