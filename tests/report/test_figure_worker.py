import os
import pickle
import subprocess
import sys
from pathlib import Path
import warnings

import pytest

from tpusim.report import figure_worker, plots
from tpusim.report.figure_worker import FigureRenderer
from tpusim.report.plots import FigureJob, render_png


def _rows(names):
    return [{"layer": name, "active_cycles": 10 * (i + 1), "weight_stall_cycles": 5, "weight_shift_cycles": 2,
             "non_matrix_cycles": i} for i, name in enumerate(names)]


JOBS = {
    "latency.png": FigureJob("latency_breakdown", (_rows(["conv1", "conv2", "fc"]),), {"title": "three layers"}),
    "energy.png": FigureJob("energy_breakdown", ({"conv1": {"mac": 3e6, "total": 3e6}, "fc": {"mac": 1e6, "total": 1e6}},)),
}


def _not_here(monkeypatch):
    """Drawing in this process fails: what a test gets was drawn by the worker."""
    def drawn_here(job):
        raise AssertionError("drawn in the test's process")
    monkeypatch.setattr(plots, "render_png", drawn_here)


def test_the_worker_draws_the_bytes_this_process_draws(monkeypatch):
    expected = {name: render_png(job) for name, job in JOBS.items()}
    _not_here(monkeypatch)
    with FigureRenderer(background=True) as figures:
        assert figures.in_background
        figures.submit(JOBS)
        pngs = figures.pngs()
    assert pngs == expected


def test_without_a_worker_the_figures_are_drawn_here(monkeypatch):
    monkeypatch.setattr(FigureRenderer, "_launch", staticmethod(lambda: None))  # as when it cannot start
    with FigureRenderer(background=True) as figures:
        assert not figures.in_background
        figures.submit(JOBS)
        assert figures.pngs() == {name: render_png(job) for name, job in JOBS.items()}


def test_an_interpreter_that_cannot_say_where_it_is_draws_itself(monkeypatch):
    monkeypatch.setattr(sys, "executable", "")
    with FigureRenderer(background=True) as figures:
        assert not figures.in_background


def test_a_worker_that_dies_leaves_the_figures_to_this_process():
    with FigureRenderer(background=True) as figures:
        figures._process.kill()
        figures._process.wait()
        figures.submit(JOBS)
        assert figures.pngs() == {name: render_png(job) for name, job in JOBS.items()}


def test_a_figure_that_fails_in_the_worker_fails_here_as_it_would_have():
    broken = {"latency.png": FigureJob("latency_breakdown", ([{"layer": "conv1"}],))}  # no cycle columns
    with FigureRenderer(background=True) as figures:
        figures.submit(broken)
        with pytest.raises(KeyError, match="active_cycles"):
            figures.pngs()


def test_warnings_of_the_worker_are_raised_in_the_run(monkeypatch):
    # DejaVu Sans has no CJK glyphs: matplotlib warns, and a user must see it as if drawn in-process
    job = {"latency.png": FigureJob("latency_breakdown", (_rows(["卷积"]),))}
    _not_here(monkeypatch)
    with FigureRenderer(background=True) as figures:
        figures.submit(job)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            figures.pngs()
    assert any("missing from font" in str(w.message) and w.category is UserWarning for w in caught)


THREE_JOBS = {**JOBS, "roofline.png": FigureJob("latency_breakdown", (_rows(["a", "b"]),), {"title": "third"})}


def test_figures_spread_over_two_processes_are_the_bytes_this_process_draws(monkeypatch):
    expected = {name: render_png(job) for name, job in THREE_JOBS.items()}
    _not_here(monkeypatch)
    with FigureRenderer(background=True) as figures:
        figures.submit(THREE_JOBS, spread=True)
        assert figures.pngs() == expected


def test_a_figure_that_fails_in_the_workers_copy_fails_here_as_it_would_have():
    broken = {**JOBS, "broken.png": FigureJob("latency_breakdown", ([{"layer": "conv1"}],))}
    broken = {name: broken[name] for name in ("latency.png", "broken.png", "energy.png")}  # the copy draws the second
    with FigureRenderer(background=True) as figures:
        figures.submit(broken, spread=True)
        with pytest.raises(KeyError, match="active_cycles"):
            figures.pngs()


def test_warnings_of_the_workers_copy_are_raised_in_the_run(monkeypatch):
    jobs = {"latency.png": JOBS["latency.png"],
            "cjk.png": FigureJob("latency_breakdown", (_rows(["卷积"]),))}  # the second: drawn by the copy
    _not_here(monkeypatch)
    with FigureRenderer(background=True) as figures:
        figures.submit(jobs, spread=True)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            figures.pngs()
    assert any("missing from font" in str(w.message) for w in caught)


_COPY_DIES = """
import os, pickle, sys
sys.path.insert(0, sys.argv[1])
from tpusim.report import figure_worker
from tpusim.report.plots import render_png
jobs = pickle.loads(bytes.fromhex(sys.argv[2]))
parent, drawn = os.getpid(), figure_worker._drawn
def dies_in_the_copy(jobs):
    if os.getpid() != parent:
        os._exit(1)
    return drawn(jobs)
figure_worker._drawn = dies_in_the_copy
pngs, caught = figure_worker._drawn_on_two_processes(jobs)
assert pngs == [render_png(job) for job in jobs] and caught == [], "the worker did not draw the copy's figures"
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="spreading forks the worker")
def test_a_copy_that_dies_leaves_its_figures_to_the_worker():
    # in a process of its own, single-threaded as the worker is (forking this test process would copy its threads)
    jobs = pickle.dumps(list(THREE_JOBS.values())).hex()
    result = subprocess.run([sys.executable, "-c", _COPY_DIES, figure_worker._PACKAGE_ROOT, jobs], capture_output=True,
                            text=True, timeout=120, env=figure_worker.worker_environment())
    assert result.returncode == 0, result.stderr


def test_the_worker_has_one_thread_so_it_may_fork():
    probe = "import sys; sys.path.insert(0, sys.argv[1]); import tpusim.report.plots, matplotlib.figure, os; " \
            "print(len(os.listdir('/proc/self/task')))"
    if not Path("/proc/self/task").is_dir():
        pytest.skip("no /proc to count threads in")
    result = subprocess.run([sys.executable, "-c", probe, figure_worker._PACKAGE_ROOT], capture_output=True, text=True,
                            timeout=120, env=figure_worker.worker_environment())
    assert result.stdout.strip() == "1", result.stderr


def test_a_process_that_has_matplotlib_draws_itself(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", sys.modules.get("matplotlib", object()))
    with FigureRenderer() as figures:
        assert not figures.in_background


def test_figures_are_submitted_once_and_only_then_returned():
    with FigureRenderer(background=False) as figures:
        with pytest.raises(RuntimeError, match="no figures"):
            figures.pngs()
        figures.submit({})
        with pytest.raises(RuntimeError, match="once"):
            figures.submit({})
        assert figures.pngs() == {}


def test_leaving_on_an_error_ends_the_worker_at_once():
    with pytest.raises(ValueError):
        with FigureRenderer(background=True) as figures:
            process = figures._process
            raise ValueError
    assert process.poll() is not None


def test_the_worker_ends_when_its_input_closes_and_prints_nothing():
    process = subprocess.Popen([sys.executable, "-c", figure_worker._WORKER_CODE], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = process.communicate(timeout=60)
    assert (process.returncode, out, err) == (0, b"", b"")


def test_the_worker_warms_up_only_while_no_request_is_waiting():
    read_end, write_end = os.pipe()
    with os.fdopen(read_end, "rb") as requests, os.fdopen(write_end, "wb") as run:
        assert not figure_worker._request_waiting(requests)
        run.write(b"x")
        run.flush()
        assert figure_worker._request_waiting(requests)
