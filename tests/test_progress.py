"""Progress on stderr: plain lines, one per phase start and end, anywhere but a terminal; bars that only move
forward on a terminal; a run's phases in order, the integer-execution count over every evaluation batch."""
from __future__ import annotations

import csv
import io
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from onnx_graphs import save_small_classifier
from terminal import run_on_a_terminal

from tpusim.cli import main
from tpusim.progress import Progress, current

REPO = Path(__file__).resolve().parents[1]
TPU_V1 = str(REPO / "configs" / "tpu_v1.yaml")
RUN_PHASES = ["loading and lowering the model", "timing and energy", "quantizing", "integer execution",
              "writing reports and plots"]
ELAPSED = re.compile(r" in \d+\.\d\d s$")


def _lines(text: str) -> list[str]:
    return [ELAPSED.sub(" in T s", line) for line in text.splitlines()]


def test_plain_lines_when_not_a_terminal():
    out = io.StringIO()
    with Progress(stream=out) as progress:
        progress.phase("lowering")
        progress.phase("quantizing")
        progress.phase("quantizing", 32, "samples")  # the same phase, now with its size
        progress.update(8)
        progress.update(4)  # never backwards
        progress.update(40)  # never beyond the total
        progress.phase("timing", 3)
        progress.update(2)
    assert _lines(out.getvalue()) == [
        "tpusim: lowering ...",
        "tpusim: lowering: done in T s",
        "tpusim: quantizing ...",
        "tpusim: quantizing: 32 samples in T s",
        "tpusim: timing (3) ...",
        "tpusim: timing: 2 in T s",
    ]


def test_one_of_a_unit_is_said_in_the_singular():
    out = io.StringIO()
    with Progress(stream=out) as progress:
        progress.phase("sweeping", 1, "points")
        progress.update(1)
        progress.phase("comparing", 2, "runs")
        progress.update(2)
    assert _lines(out.getvalue()) == [
        "tpusim: sweeping (1 point) ...",
        "tpusim: sweeping: 1 point in T s",
        "tpusim: comparing (2 runs) ...",
        "tpusim: comparing: 2 runs in T s",
    ]


def test_a_line_per_interval_while_a_counted_phase_runs():
    out = io.StringIO()
    with Progress(stream=out, interval_s=0.0) as progress:
        progress.phase("sweeping", 1200, "points")
        progress.update(600)
        progress.update(600)  # no progress, no line
        progress.update(1200)
    assert _lines(out.getvalue()) == [
        "tpusim: sweeping (1,200 points) ...",
        "tpusim: sweeping: 600 of 1,200 points",
        "tpusim: sweeping: 1,200 of 1,200 points",
        "tpusim: sweeping: 1,200 points in T s",
    ]


def test_disabled_progress_writes_nothing():
    out = io.StringIO()
    with Progress(enabled=False, stream=out) as progress:
        progress.phase("lowering")
        progress.phase("quantizing", 4)
        progress.update(4)
    assert out.getvalue() == ""


def test_current_is_the_innermost_open_progress_else_silent():
    assert not current().enabled
    with Progress(stream=io.StringIO()) as outer:
        assert current() is outer
        with Progress(enabled=False) as inner:
            assert current() is inner
        assert current() is outer
    assert not current().enabled


def test_on_a_terminal_a_bar_only_moves_forward_and_is_erased():
    out = io.StringIO()
    with Progress(stream=out, interactive=True) as progress:
        progress.phase("lowering")
        progress.phase("integer execution", 10, "layers")
        for done in (3, 7, 2, 10):
            progress.update(done)
            progress._bar.refresh()  # tqdm draws at most every 0.1 s; draw every step here
    text = out.getvalue()
    assert text.startswith("tpusim: lowering ...\r\x1b[K")  # the status line, erased when its phase ends
    counts = [int(n) for n in re.findall(r"(\d+)/10 ", text)]
    assert counts == sorted(counts) and counts[-1] == 10 and 2 not in counts
    assert text.endswith("\r")  # the bar erases itself (leave=False): nothing is left on the line


def _run_argv(tmp_path: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "tpusim", "run", TPU_V1, "--model", str(save_small_classifier(tmp_path / "m.onnx")),
            "--out", str(tmp_path / "out"), "--eval-samples", "3", *extra]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}


def test_a_run_prints_each_phase_once_in_order_without_control_codes(tmp_path):
    result = subprocess.run(_run_argv(tmp_path), capture_output=True, text=True, timeout=300, env=_env())
    assert result.returncode == 0, result.stderr
    assert "\r" not in result.stderr and "\x1b" not in result.stderr
    starts = [line[len("tpusim: "):-len(" ...")].split(" (")[0] for line in result.stderr.splitlines()
              if line.endswith(" ...")]
    ends = [line[len("tpusim: "):].split(":")[0] for line in result.stderr.splitlines() if ELAPSED.search(line)]
    assert starts == RUN_PHASES and ends == RUN_PHASES
    layers = len(list(csv.DictReader((tmp_path / "out" / "layers.csv").open())))
    # one count over the 3 evaluation batches, not one per batch
    assert f"tpusim: integer execution ({3 * layers} layer runs) ..." in result.stderr.splitlines()


def test_quantize_prints_its_phases_and_no_progress_silences_them(tmp_path):
    argv = [sys.executable, "-m", "tpusim", "quantize", TPU_V1, "--model", str(save_small_classifier(tmp_path / "m.onnx")),
            "-o", str(tmp_path / "q.onnx")]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=_env())
    assert result.returncode == 0, result.stderr
    lines = [line for line in _lines(result.stderr) if not line.startswith("tpusim: warning: ")]
    assert lines == ["tpusim: loading and lowering the model ...", "tpusim: loading and lowering the model: done in T s",
                     "tpusim: quantizing ...", "tpusim: quantizing: 32 calibration samples in T s",
                     "tpusim: writing the QDQ model ...", "tpusim: writing the QDQ model: done in T s"]
    quiet = subprocess.run(argv + ["--no-progress"], capture_output=True, text=True, timeout=300, env=_env())
    assert quiet.returncode == 0 and [line for line in quiet.stderr.splitlines()
                                      if not line.startswith("tpusim: warning: ")] == [], quiet.stderr


def test_no_progress_prints_no_phase_lines(tmp_path, capfd):
    # by main in this process (the test above runs the console script): file descriptor 2, not only sys.stderr
    assert main(_run_argv(tmp_path, "--no-progress")[3:]) == 0  # the arguments after "python -m tpusim"
    err = capfd.readouterr().err
    assert not [line for line in err.splitlines() if not line.startswith("tpusim: warning: ")], err


def test_on_a_terminal_the_integer_execution_bar_never_restarts(tmp_path):
    returncode, text = run_on_a_terminal(_run_argv(tmp_path), _env(), timeout_s=300)
    assert returncode == 0, text
    counts = [(int(done), int(total)) for done, total in re.findall(r"integer execution:.*?(\d+)/(\d+) ", text)]
    layers = len(list(csv.DictReader((tmp_path / "out" / "layers.csv").open())))
    assert counts and {total for _, total in counts} == {3 * layers}  # one bar for all 3 evaluation batches
    assert [done for done, _ in counts] == sorted(done for done, _ in counts)
    for phase in RUN_PHASES:
        assert text.count(f"tpusim: {phase} ...") + text.count(f"\r{phase}:") >= 1, phase
    assert "tpusim: quantizing: " not in text  # no plain end lines on a terminal


def test_a_phase_that_fails_gets_no_end_line():
    out = io.StringIO()
    with pytest.raises(ValueError):
        with Progress(stream=out) as progress:
            progress.phase("lowering")
            raise ValueError("bad model")
    assert out.getvalue() == "tpusim: lowering ...\n"
    assert not current().enabled


def test_each_thread_has_its_own_current_progress():
    seen = []
    with Progress(stream=io.StringIO()):
        thread = threading.Thread(target=lambda: seen.append(current().enabled))
        thread.start()
        thread.join()
    assert seen == [False]
