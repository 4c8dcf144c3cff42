"""Figures drawn in a second Python process while the first goes on with the run.

A run's three figures cost a command-line ``tpusim run`` about 0.7 s on one core (ResNet-50): importing
matplotlib (a quarter of a second) and drawing. Neither needs anything but the timing and energy, which
exist long before quantization ends, and drawing is pure-Python work that holds the GIL, so a thread
would only slow the run's own Python. :class:`FigureRenderer` therefore starts a worker process when the
run starts: it imports matplotlib while the model is lowered, draws the figures as soon as they are
submitted, on the other core, while calibration and integer execution run, and hands back PNG bytes,
which the run writes with its other files (atomically, in its file set: the worker writes nothing).

The worker draws with the same code (:func:`tpusim.report.plots.render_png`) and the same matplotlib,
so its PNGs are the bytes the run would draw itself. Where the worker cannot start, dies or fails, the
figures are drawn in this process, exactly as they would have been; a process that has imported
matplotlib already (a notebook, the tests) draws them itself too, which then costs only the drawing.
The worker ignores the terminal's Ctrl-C (its own session) and ends when the run closes its input, ends
or is killed; what it prints goes nowhere, and warnings its figures raise (a glyph missing from the
font) are raised again in the run.

Once its imports are done the worker draws one small figure and drops it: the first figure a process
draws also loads the font and sets up the rasteriser and the PNG encoder (about 0.08 s), and the worker
does that while the run is still lowering the model. Where the run's figures are waiting already (a run
that does not quantize submits them as soon as it has timed the model), the first of them sets that up
instead: the warm-up would only delay them (0.08-0.15 s of a ResNet-50 ``--no-quantize`` run).

A run that will wait for its figures at once (one that does not quantize) asks for them ``spread``: the
worker forks, and the copy draws every second figure while the worker draws the others, on the core the
run leaves idle.
"""
from __future__ import annotations

import os
import pickle
import struct
import subprocess
import sys
import threading
import warnings
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Mapping

if TYPE_CHECKING:  # the plots' module (numpy) is loaded where figures are drawn: a run starts the worker first
    from tpusim.report.plots import FigureJob

_LENGTH = struct.Struct("<Q")  # a message: its pickle's length, then the pickle

_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])  # the folder holding the tpusim package

# What the worker runs: this package where the run found it, whatever the worker's own path would find.
_WORKER_CODE = f"import sys; sys.path.insert(0, {_PACKAGE_ROOT!r}); from tpusim.report.figure_worker import serve; serve()"


def worker_environment() -> dict[str, str]:
    """The worker's environment: this process's, with one BLAS thread. Drawing needs no threads of numpy's
    BLAS, and a worker that forks (``spread``) must have no thread but its own: a thread holding a lock at
    the fork would hold it in the copy for ever."""
    return {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}


def _write_message(stream: IO[bytes], value: Any) -> None:
    data = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(_LENGTH.pack(len(data)))
    stream.write(data)
    stream.flush()


def _read_message(stream: IO[bytes]) -> Any:
    """The next message, or None at the end of the stream."""
    header = stream.read(_LENGTH.size)
    if len(header) < _LENGTH.size:
        return None
    (length,) = _LENGTH.unpack(header)
    data = stream.read(length)
    if len(data) < length:
        return None
    return pickle.loads(data)


def _warm_up() -> None:
    """Draw a small figure with what the run's figures use (text, ticks on a log axis, bars, PNG encoding)
    and drop it: what a first figure sets up is then ready for the run's."""
    from matplotlib.figure import Figure

    from tpusim.report.plots import figure_png

    fig = Figure(figsize=(2, 1.5), dpi=40)
    ax = fig.add_subplot()
    ax.barh([0, 1], [1.0, 20.0])
    ax.set_xscale("log")
    ax.set_title("conv1, 0.5 pJ")
    figure_png(fig)


def _request_waiting(stream: IO[bytes]) -> bool:
    """Whether a request can be read from ``stream`` at once (False where pipes cannot be polled)."""
    import select

    try:
        return bool(select.select([stream], [], [], 0)[0])
    except (OSError, ValueError):
        return False


def _drawn(jobs: list[FigureJob]) -> tuple[list[bytes], list[tuple[str, type]]]:
    """The jobs' PNGs and the warnings drawing them raised, as (message, category)."""
    from tpusim.report.plots import render_png

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # the run's own filters decide what is shown
        pngs = [render_png(job) for job in jobs]
    return pngs, [(str(w.message), w.category) for w in caught]


def _drawn_on_two_processes(jobs: list[FigureJob]) -> tuple[list[bytes], list[tuple[str, type]]]:
    """:func:`_drawn`, with every second job drawn at the same time by a forked copy of this process, which
    sends back its PNGs (or what failed) through a pipe. A copy that dies before it answers leaves its jobs to
    this process."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the copy: draw, answer, and end without running anything of the worker's
        os.close(read_end)
        try:
            with os.fdopen(write_end, "wb") as answer:
                try:
                    reply: tuple = ("pngs", *_drawn(jobs[1::2]))
                except Exception as exc:
                    reply = ("error", f"{type(exc).__name__}: {exc}")
                _write_message(answer, reply)
        finally:
            os._exit(0)
    os.close(write_end)
    answers = os.fdopen(read_end, "rb")
    try:
        own, own_warnings = _drawn(jobs[0::2])
        reply = _read_message(answers)
    finally:
        answers.close()  # a copy still writing (this process failed) gets a broken pipe and ends
        os.waitpid(pid, 0)
    if reply is None:  # the copy died
        theirs, their_warnings = _drawn(jobs[1::2])
    elif reply[0] == "error":
        raise RuntimeError(reply[1])
    else:
        theirs, their_warnings = reply[1], reply[2]
    pngs = [own[i // 2] if i % 2 == 0 else theirs[i // 2] for i in range(len(jobs))]
    return pngs, own_warnings + their_warnings


def serve() -> None:
    """The worker: import matplotlib now, then answer each ``(jobs, spread)`` with ``("pngs", pngs, warnings)``
    or ``("error", text)`` until the input ends."""
    channel = os.fdopen(os.dup(1), "wb")  # the replies; whatever else writes to stdout goes nowhere
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
    sys.stdout = open(os.devnull, "w")
    from matplotlib.backends import backend_agg  # noqa: F401  (what the figures will need, loaded while the run lowers)
    from matplotlib import figure  # noqa: F401
    from PIL import PngImagePlugin  # noqa: F401

    requests = sys.stdin.buffer
    if not _request_waiting(requests):
        _warm_up()
    while (request := _read_message(requests)) is not None:
        jobs, spread = request
        try:
            if spread and len(jobs) > 1 and hasattr(os, "fork"):
                reply: tuple = ("pngs", *_drawn_on_two_processes(jobs))
            else:
                reply = ("pngs", *_drawn(jobs))
        except Exception as exc:  # the run draws them itself, and fails there as it would have
            reply = ("error", f"{type(exc).__name__}: {exc}")
        try:
            _write_message(channel, reply)
        except (BrokenPipeError, pickle.PicklingError):
            break
    os._exit(0)  # nothing to finalise: an interpreter shutdown would only collect matplotlib's objects


class FigureRenderer:
    """Figures submitted once, drawn by a worker process when one runs (see the module's docstring) and
    returned by :meth:`pngs`. Use it as a context manager: leaving it ends the worker."""

    def __init__(self, background: bool | None = None):
        """``background``: draw in a worker process; None: when this process has not imported matplotlib."""
        self._names: list[str] = []
        self._jobs: list[FigureJob] | None = None
        self._sender: threading.Thread | None = None
        self._sent = False
        self._spread = False
        if background is None:
            background = "matplotlib" not in sys.modules
        self._process = self._launch() if background else None

    @staticmethod
    def _launch() -> subprocess.Popen | None:
        if not sys.executable:  # an embedded interpreter that cannot say where it is
            return None
        try:
            return subprocess.Popen([sys.executable, "-c", _WORKER_CODE], stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                    start_new_session=True, env=worker_environment())
        except OSError:
            return None

    @property
    def in_background(self) -> bool:
        """Whether a worker process is drawing (or will draw) the figures."""
        return self._process is not None

    def submit(self, jobs: Mapping[str, FigureJob], spread: bool = False) -> None:
        """Hand over the figures to draw, by name; returns at once (the worker may still be importing).
        ``spread``: the caller will only wait for them, so the worker draws them on two processes."""
        if self._jobs is not None:
            raise RuntimeError("figures are submitted once")
        self._names, self._jobs = list(jobs), list(jobs.values())
        self._spread = spread
        if self._process is not None:
            self._sender = threading.Thread(target=self._send, name="tpusim-figures", daemon=True)
            self._sender.start()

    def _send(self) -> None:
        try:
            _write_message(self._process.stdin, (self._jobs, self._spread))
            self._sent = True
        except (OSError, ValueError):  # the worker is gone: pngs() draws them here
            pass

    def pngs(self) -> dict[str, bytes]:
        """The submitted figures' PNGs by name: the worker's, or drawn here."""
        if self._jobs is None:
            raise RuntimeError("no figures were submitted")
        reply = self._reply()
        if reply is not None and reply[0] == "pngs" and len(reply[1]) == len(self._jobs):
            for message, category in reply[2]:
                warnings.warn(message, category, stacklevel=2)
            return dict(zip(self._names, reply[1]))
        from tpusim.report.plots import render_png

        return {name: render_png(job) for name, job in zip(self._names, self._jobs)}

    def _reply(self) -> tuple | None:
        if self._process is None or self._sender is None:
            return None
        self._sender.join()
        if not self._sent:
            return None
        try:
            reply = _read_message(self._process.stdout)
        except (OSError, EOFError, pickle.UnpicklingError, AttributeError, ImportError):
            return None
        return reply if isinstance(reply, tuple) and reply else None

    def close(self, kill: bool = False) -> None:
        """End the worker: it ends by itself when its input closes; ``kill`` does not wait for that."""
        process, self._process = self._process, None
        if process is None:
            return
        if kill:
            process.kill()
        for stream in (process.stdin, process.stdout):
            try:
                stream.close()
            except OSError:
                pass
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def __enter__(self) -> "FigureRenderer":
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        self.close(kill=exc_type is not None)
