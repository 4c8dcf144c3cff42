"""The command line: outputs land atomically; bad input is one line on stderr and exit code 2."""
from __future__ import annotations

import argparse
import csv
import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import onnx
import pytest
from onnx_graphs import GraphBuilder

from tpusim.cli import build_parser, main

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
    assert message in _error_after_phase_lines(stderr) and "Traceback" not in stderr
    assert not out.exists()


def _error_after_phase_lines(stderr: str) -> str:
    """The one error line; before it (progress is on, stderr is no terminal) only the started phase's line."""
    *before, error = stderr.splitlines()
    assert error.startswith("tpusim: error: ") and stderr.endswith("\n")
    assert all(line.startswith("tpusim: ") and line.endswith(" ...") for line in before), before
    return error


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
    assert code == 2 and "unsupported ops: Hardmax x2, LpNormalization x1" in _error_after_phase_lines(stderr)
    assert not (tmp_path / "o").exists()


def _commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """(command path, parser) for the top level and every subcommand."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _commands(sub, path + (name,))


def test_every_option_has_help_and_every_valued_option_shows_its_default():
    missing = []
    for path, parser in _commands(build_parser()):
        formatter = parser._get_formatter()
        for action in parser._actions:
            if not action.option_strings or isinstance(action, argparse._HelpAction):
                continue
            flag = f"{' '.join(path)} {action.option_strings[-1]}"
            if not action.help:
                missing.append(f"{flag}: no help")
            elif action.nargs != 0 and not action.required and "default" not in formatter._get_help_string(action):
                missing.append(f"{flag}: no default")
    assert not missing


def test_help_shows_the_actual_default():
    from tpusim.pipeline import RunOptions

    run = build_parser()._subparsers._group_actions[0].choices["run"]
    assert run.get_default("eval_samples") == RunOptions.eval_samples
    help_text = " ".join(run.format_help().split())
    assert "(default: kernel)" in help_text and f"(default: {RunOptions.eval_samples})" in help_text


HEAVY = ("numpy", "onnx", "onnxruntime", "numba", "matplotlib", "tpusim.pipeline", "tpusim.workloads", "tpusim.quant")


def test_help_and_argument_errors_import_no_heavy_module():
    """`tpusim --help` and argument errors must be instant: no heavy module may be imported to build the parser."""
    argvs = [["--help"], ["--version"], ["run"], ["run", "c.yaml", "--modle", "m"], ["workloads", "list", "--help"]]
    argvs += [[name, "--help"] for name in ("run", "compile", "quantize", "check", "compare", "sweep", "workloads")]
    code = ("import contextlib, io, sys\nfrom tpusim.cli import main\n"
            f"for argv in {argvs!r}:\n"
            "    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):\n"
            "        try:\n            main(argv)\n        except SystemExit:\n            pass\n"
            f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def _tpusim(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tpusim", *argv], capture_output=True, text=True, timeout=timeout)


def _one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("tpusim: error: ") and result.stderr.count("\n") == 1, result.stderr
    return result.stderr


def _one_line_error_in_process(capsys, *argv: str) -> str:
    """What ``_one_line_error`` checks, from ``main`` in this process (no 1.5-2.5 s of imports a case); the
    unknown-flag and fresh-process tests check it in the console script's own process."""
    try:
        code = main(list(argv))
    except SystemExit as exit_:  # argparse's errors
        code = exit_.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("tpusim: error: ") and err.count("\n") == 1, err
    return err


@pytest.mark.parametrize("command", ["run", "compile", "quantize", "compare", "sweep"])
def test_a_misspelt_flag_is_named_as_unknown(capsys, command):
    err = _one_line_error_in_process(capsys, command, TPU_V1, "--modle", "tiny_cnn")
    assert f"tpusim {command}: unrecognized argument --modle; did you mean --model?" in err
    assert "required" not in err


def test_an_unknown_flag_with_no_close_match_gets_no_suggestion():
    err = _one_line_error(_tpusim("run", TPU_V1, "--model", "tiny_cnn", "--frobnicate=3"))
    assert "unrecognized argument --frobnicate (see tpusim run --help)" in err


@pytest.mark.parametrize("command, setting, message", [
    ("run", "array.rows=0", "tpu_v1.yaml (--set array.rows): array.rows: must be >= 1, got 0"),
    ("run", "array.rows=abc", "tpu_v1.yaml (--set array.rows): array.rows: expected an integer, got 'abc'"),
    ("run", "array.banks=2", "tpu_v1.yaml (--set array.banks): array.banks: unknown key"),
    ("run", "array.rows", "--set 'array.rows': expected KEY.PATH=VALUE"),
    ("compile", "array.rows=0", "tpu_v1.yaml (--set array.rows): array.rows: must be >= 1, got 0"),
    ("compare", "array.rows=0", "tpu_v1.yaml (--set array.rows): array.rows: must be >= 1, got 0"),
])
def test_a_set_error_names_the_flag_and_the_key(tmp_path, capsys, command, setting, message):
    extra = ["--out", str(tmp_path / "out"), "--no-progress"] if command in ("run", "compare") else []
    err = _one_line_error_in_process(capsys, command, TPU_V1, "--model", "tiny_cnn", "--set", setting, *extra)
    assert message in err
    assert not (tmp_path / "out").exists()


def test_a_set_error_in_a_fresh_process_is_one_line(tmp_path):
    """After the imports a run needs (nothing they print, no traceback): one line, exit code 2."""
    err = _one_line_error(_tpusim("run", TPU_V1, "--model", "tiny_cnn", "--set", "array.rows=0", "--out",
                                  str(tmp_path / "out"), "--no-progress"))
    assert "tpu_v1.yaml (--set array.rows): array.rows: must be >= 1, got 0" in err
    assert not (tmp_path / "out").exists()


def _wait_for_library(pid: int, fragment: str, timeout_s: float) -> bool:
    """Whether process ``pid`` mapped a shared library whose path contains ``fragment`` (it is importing it)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if fragment in Path(f"/proc/{pid}/maps").read_text():
                return True
        except OSError:
            return False
        time.sleep(0.005)
    return False


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid``."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            pass
    return found


def _figure_worker(pid: int, timeout_s: float) -> int | None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for child in _children(pid):
            try:
                if "figure_worker" in Path(f"/proc/{child}/cmdline").read_text():
                    return child
            except OSError:
                pass
        time.sleep(0.005)
    return None


def _gone(pid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                return True  # ended, not yet reaped
        except OSError:
            return True
        time.sleep(0.01)
    return False


def _interruptible() -> None:
    """In the child before it runs: Ctrl-C as a terminal's foreground command gets it. A test run started as a
    background job (``cmd &`` in a script) ignores SIGINT, and its children would inherit that."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc to see what the process imports")
# Interrupted while these initialise, onnx segfaulted, matplotlib aborted, onnxruntime raised ImportError, or the
# interrupt was lost (the run went on to exit 0); the others are the import's start (numpy) and its middle (numba).
# matplotlib's ft2font is loaded by the run's figure worker, not by the run.
@pytest.mark.parametrize("library", ["_multiarray_umath", "onnx_cpp2py_export", "onnxruntime_pybind11_state",
                                     "ft2font", "llvmlite"])
def test_ctrl_c_while_importing_is_one_line_and_exit_130(tmp_path, library):
    # a quantizing run: --no-quantize no longer imports ONNX Runtime
    process = subprocess.Popen([sys.executable, "-m", "tpusim", "run", TPU_V1, "--model", "tiny_cnn", "--eval-samples",
                                "1", "--no-progress", "--out", str(tmp_path / "out")],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=_interruptible)
    try:
        importer = process.pid if library != "ft2font" else _figure_worker(process.pid, timeout_s=60)
        assert importer is not None, "no figure worker was started"
        assert _wait_for_library(importer, library, timeout_s=60), f"{library} was never loaded"
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 130 and err == "tpusim: interrupted\n", err
    assert _gone(importer, timeout_s=10), "the figure worker outlived the run"


@pytest.mark.parametrize("seed", range(4))
def test_ctrl_c_at_a_random_moment_of_a_run_is_one_line_and_exit_130(tmp_path, seed):
    """Later than the imports too: inside Numba's compiler callbacks, integer execution, the plots."""
    process = subprocess.Popen([sys.executable, "-m", "tpusim", "run", TPU_V1, "--model", "tiny_cnn", "--out",
                                str(tmp_path / "out"), "--eval-samples", "2"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=_interruptible)
    try:
        assert _wait_for_library(process.pid, "_multiarray_umath", timeout_s=60)
        time.sleep(random.Random(seed).uniform(0.0, 3.0))
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode in (0, 130) and "Traceback" not in err and "Exception" not in err, err
    if process.returncode == 130:
        assert err.endswith("tpusim: interrupted\n") and err.count("tpusim: interrupted") == 1


def test_check_counts_have_thousands_separators(tmp_path, capsys):
    b = GraphBuilder((1, 4, 4, 4))
    y = "input"
    for _ in range(1200):
        y = b.node("Relu", [y])
    path = tmp_path / "deep.onnx"
    onnx.save(b.model(y), path)
    code, stdout, _ = _run(capsys, "check", path)
    assert code == 0
    assert stdout.splitlines()[-1] == f"{path}: 1,200 nodes: 1,200 lowered"
