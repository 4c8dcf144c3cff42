"""Local sweep workers: an interrupt at any moment ends the sweep and every worker within a couple of
seconds, keeping the finished points; a script that calls ``tpusim.sweep`` at top level needs no
``__main__`` guard."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from tpusim.sweeps import TaskFailed, pool_map

REPO = Path(__file__).resolve().parents[1]
TPU_V1 = str(REPO / "configs" / "tpu_v1.yaml")
EXIT_BOUND_S = 2.5

pytestmark = pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="finds workers through /proc")


def _workers_of(pid: int) -> list[int]:
    """Live sweep worker processes started by process ``pid`` (each names its parent on its command line)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            args = [a for a in (entry / "cmdline").read_bytes().split(b"\0") if a]
        except OSError:
            continue
        if args and any(b"_worker_main" in a for a in args) and args[-1] == str(pid).encode():
            found.append(int(entry.name))
    return found


def _no_workers_left(pid: int, within_s: float = 1.0) -> bool:
    deadline = time.monotonic() + within_s
    while _workers_of(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_pool_map_returns_every_result_and_leaves_no_worker():
    results = dict(pool_map(abs, [-3, -2, -1, 0, 1], jobs=2))
    assert results == {-3: 3, -2: 2, -1: 1, 0: 0, 1: 1}
    assert _no_workers_left(os.getpid(), within_s=0.1)


def test_pool_map_with_groups_returns_every_result_and_leaves_no_worker():
    results = dict(pool_map(abs, list(range(-6, 6)), jobs=2, group=lambda item: item % 3))
    assert results == {item: abs(item) for item in range(-6, 6)}
    assert _no_workers_left(os.getpid(), within_s=0.1)


def test_a_failing_task_ends_the_iteration_and_its_workers():
    with pytest.raises(TaskFailed) as info:
        list(pool_map(int, ["1", "x", "2", "3"], jobs=2))
    assert info.value.item == "x" and not info.value.user and "invalid literal" in info.value.message
    assert _no_workers_left(os.getpid(), within_s=0.1)


def test_interrupts_at_random_moments_end_the_pool_at_once():
    """Ctrl-C at 12 random moments (starting workers, waiting on them, handing out work, consuming a
    result): each time the KeyboardInterrupt surfaces within the bound and no worker is left."""
    rng = random.Random(7)
    active = threading.Event()
    fired_at: list[float] = []

    def handler(signum, frame):
        if active.is_set():
            raise KeyboardInterrupt

    def fire():
        fired_at.append(time.monotonic())
        os.kill(os.getpid(), signal.SIGINT)

    previous = signal.signal(signal.SIGINT, handler)
    try:
        interrupted = 0
        for trial in range(12):
            fired_at.clear()
            timer = threading.Timer(rng.uniform(0.0, 0.8), fire)
            active.set()
            try:
                timer.start()
                for _ in pool_map(time.sleep, [0.05] * 40, jobs=2):
                    pass
                active.clear()
            except KeyboardInterrupt:
                active.clear()
                interrupted += 1
                assert time.monotonic() - fired_at[0] < EXIT_BOUND_S, f"trial {trial}"
            finally:
                active.clear()
                timer.cancel()
            assert _no_workers_left(os.getpid()), f"trial {trial}: workers left"
        assert interrupted >= 10
    finally:
        signal.signal(signal.SIGINT, previous)


def _reader(stream, sink: bytearray) -> threading.Thread:
    def pump():
        for chunk in iter(lambda: stream.read1(4096), b""):
            sink.extend(chunk)
    thread = threading.Thread(target=pump, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("seed", [1, 2])
def test_interrupted_cli_sweep_exits_at_once_and_keeps_finished_points(tmp_path, seed):
    """As `timeout -s INT` does: SIGINT to the whole process group at a random moment of the sweep."""
    out = tmp_path / "sw"
    argv = [sys.executable, "-m", "tpusim", "sweep", TPU_V1, "--model", "tiny_cnn,mlp", "--quantize",
            "--set", "array.rows=16,32,64,128,256", "--set", "array.cols=64,256", "--jobs", "2", "--out", str(out)]
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
                               cwd=tmp_path)
    err = bytearray()
    reader = _reader(process.stderr, err)
    try:
        deadline = time.monotonic() + 60
        while b"tpusim: sweeping (" not in err and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert b"tpusim: sweeping (" in err, err.decode(errors="replace")
        time.sleep(random.Random(seed).uniform(0.0, 1.5))
        os.killpg(process.pid, signal.SIGINT)
        sent = time.monotonic()
        code = process.wait(timeout=30)
        assert time.monotonic() - sent < EXIT_BOUND_S
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    reader.join(timeout=5)
    text = err.decode(errors="replace")
    assert code in (0, 130), text
    assert "Traceback" not in text
    if code == 130:
        assert text.rstrip().endswith("tpusim: interrupted")
    assert _no_workers_left(process.pid)
    points = sorted((out / "points").glob("*")) if (out / "points").exists() else []
    assert all(p.suffix == ".json" and "record" in json.loads(p.read_text()) for p in points)


def test_the_readme_snippet_runs_as_a_script_without_a_main_guard(tmp_path):
    script = tmp_path / "snippet.py"
    script.write_text(textwrap.dedent(f"""\
        import tpusim
        print("top level ran")
        rows = tpusim.sweep({TPU_V1!r}, "tiny_cnn", {{"array.rows": [64, 128]}}, out="results/sweep-tiny",
                            jobs=2, progress=False, plots=False)
        print(len(rows), "rows")
        """))
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["top level ran", "2 rows"]
    assert "Traceback" not in done.stderr
    assert (tmp_path / "results" / "sweep-tiny" / "sweep.csv").is_file()
