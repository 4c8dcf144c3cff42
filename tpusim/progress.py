"""Progress on stderr, one API for every command: a run's phases (lowering, quantizing, integer
execution, timing and energy, reports), a comparison's runs, a sweep's points.

    with Progress(enabled) as progress:                 # ends the last phase when the block ends
        progress.phase("lowering")                      # a phase without a count
        progress.phase("quantizing", 32, "samples")     # ends "lowering"; a counted phase
        progress.update(8)                              # work done so far in this phase
        progress.phase("timing and energy")

A stage that runs inside a command but does not own its ``Progress`` (the pipeline's functions) reports
to :func:`current`, the innermost open one (a silent one when none is open). Calling ``phase`` again
with the current phase's name does not start a new phase; it only gives the phase its size once that
is known.

On a terminal a counted phase is one bar that only moves forward, an uncounted phase one status line;
both are erased when the phase ends. Anywhere else (a pipe, a log file, CI) there is no carriage return,
no cursor code and no bar: a phase is a line when it starts, a line every ``interval_s`` while it runs
(counted phases only) and a line with its size and elapsed time when it ends:

    tpusim: quantizing ...
    tpusim: quantizing: 32 samples in 3.12 s
"""
from __future__ import annotations

import sys
import threading
import time
from typing import IO, Any

PREFIX = "tpusim: "


class Progress:
    """The phases of one command on stderr (see the module docstring); ``enabled=False`` writes nothing."""

    def __init__(self, enabled: bool = True, stream: IO[str] | None = None, interactive: bool | None = None,
                 interval_s: float = 30.0):
        self.enabled = enabled
        self._stream = stream  # None: sys.stderr as it is when a phase writes (tests swap it)
        self._interactive = interactive  # None: whether the stream is a terminal
        self._interval_s = interval_s
        self._name: str | None = None
        self._total: int | None = None
        self._unit = ""
        self._done = 0
        self._started = 0.0
        self._last_line = 0.0
        self._bar: Any = None  # a tqdm bar, on a terminal
        self._status_shown = False

    def __enter__(self) -> "Progress":
        _open_in_this_thread().append(self)
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if exc_type is None:
            self.close()
        elif self.enabled:
            self._end(finished=False)  # the error that follows says why; the phase did not finish
        _open_in_this_thread().remove(self)

    @property
    def stream(self) -> IO[str]:
        return self._stream if self._stream is not None else sys.stderr

    @property
    def interactive(self) -> bool:
        if self._interactive is not None:
            return self._interactive
        isatty = getattr(self.stream, "isatty", None)
        try:
            return bool(isatty and isatty())
        except ValueError:  # a closed stream
            return False

    def phase(self, name: str, total: int | None = None, unit: str = "") -> None:
        """End the current phase and start ``name`` (of ``total`` ``unit``\\s, when it is counted)."""
        if not self.enabled:
            return
        if name == self._name:
            if total is not None and self._total is None:
                self._total, self._unit = total, unit
                if self.interactive:
                    self._clear_status()
                    self._open_bar()
            return
        self._end()
        self._name, self._total, self._unit, self._done = name, total, unit, 0
        self._started = self._last_line = time.perf_counter()
        if self.interactive:
            if total is None:
                self._write(f"{PREFIX}{name} ...")
                self._status_shown = True
            else:
                self._open_bar()
        else:
            size = f" ({_amount(total, unit)})" if total is not None else ""
            self._write(f"{PREFIX}{name}{size} ...\n")

    def update(self, done: int) -> None:
        """``done`` units of the current phase are finished (a smaller number than before is ignored)."""
        if not self.enabled or self._name is None or done <= self._done:
            return
        if self._total is not None:
            done = min(done, self._total)
        if self._bar is not None:
            self._bar.update(done - self._done)
        self._done = done
        now = time.perf_counter()
        if not self.interactive and self._total is not None and now - self._last_line >= self._interval_s:
            self._last_line = now
            self._write(f"{PREFIX}{self._name}: {done:,} of {_amount(self._total, self._unit)}\n")

    def close(self) -> None:
        """End the current phase."""
        if self.enabled:
            self._end()

    def _end(self, finished: bool = True) -> None:
        if self._name is None:
            return
        elapsed = time.perf_counter() - self._started
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        self._clear_status()
        if finished and not self.interactive:
            size = _amount(self._done, self._unit) if self._total is not None else "done"
            self._write(f"{PREFIX}{self._name}: {size} in {elapsed:.2f} s\n")
        self._name = None

    def _open_bar(self) -> None:
        from tqdm import tqdm  # only on a terminal, only once a phase is counted

        self._bar = tqdm(total=self._total, initial=self._done, desc=self._name, unit=self._unit or "it",
                         leave=False, file=self.stream, dynamic_ncols=True)

    def _clear_status(self) -> None:
        if self._status_shown:
            self._write("\r\x1b[K")
            self._status_shown = False

    def _write(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()


def _amount(count: int, unit: str) -> str:
    """``unit`` is a plural ("points", "calibration samples"): one of them is said in the singular."""
    if count == 1 and unit.endswith("s"):
        unit = unit[:-1]
    return f"{count:,} {unit}" if unit else f"{count:,}"


_threads = threading.local()  # each thread its own open Progress objects: runs in threads do not mix
_SILENT = Progress(enabled=False)


def _open_in_this_thread() -> list[Progress]:
    if not hasattr(_threads, "open"):
        _threads.open = []
    return _threads.open


def current() -> Progress:
    """The innermost :class:`Progress` open in this thread (a silent one when none is open)."""
    opened = _open_in_this_thread()
    return opened[-1] if opened else _SILENT
