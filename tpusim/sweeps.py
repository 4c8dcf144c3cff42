"""Design-space sweeps: many independent ``tpusim.simulate`` runs, in parallel, resumable, as one tidy table.

A sweep is a set of *points*; each point is a model, a batch size and a set of config overrides. The
points are the cross product of the swept values (or, with ``zip=True``, the config values taken position by
position) and run on local worker processes or on a Dask distributed cluster. With an output folder,
every finished point is written at once to ``points/<hash>.json`` (atomically), so an interrupted sweep
resumes where it stopped; ``sweep.csv`` and the plots are then assembled from the point files. A worker
keeps the parsed config and the lowered model between points (see :func:`simulate_point`).

>>> import tpusim
>>> rows = tpusim.sweep("configs/tpu_v1.yaml", "mlp", {"array.rows": [64, 128, 256], "array.cols": [64, 128, 256]},
...                     zip=True, batch=[1, 8], out="results/mlp-arrays")
>>> rows[0]["latency_s"], rows[0]["total_tops_per_w"]
"""
from __future__ import annotations

import argparse
import builtins
import functools
import hashlib
import itertools
import json
import os
import pickle
import select
import signal
import struct
import subprocess
import sys
import threading
import time
import traceback
import weakref
from collections import deque
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tpusim.allocator import keep_freed_memory
from tpusim.arguments import positive_int, shape
from tpusim.errors import ConfigError, TpusimError
from tpusim.progress import Progress
from tpusim.report.files import atomic_write_csv, atomic_write_json, check_output_dir
from tpusim.report.tables import format_duration, format_energy, format_percent, format_table

# The simulator (tpusim.pipeline: onnx, numba) and the config reader (yaml) are imported where
# used: `tpusim --help` imports this module to build its parser, and a sweep worker process starts in
# a fraction of a second and imports them once, for its first point.
if TYPE_CHECKING:
    from tpusim.config import HardwareConfig
    from tpusim.energy.model import RunEnergy
    from tpusim.energy.table import EnergyTable
    from tpusim.ir import Graph
    from tpusim.config import RecordedResults
    from tpusim.pipeline import RunOptions
    from tpusim.quant.stage import QuantOutcome

POINTS_DIR = "points"
CSV_NAME = "sweep.csv"
POINT_FORMAT = 2  # bump when a point file's record changes meaning, so old files are not reused
BREAKDOWN_KEYS = ("active_cycles", "weight_stall_cycles", "weight_shift_cycles", "non_matrix_cycles",
                  "raw_stall_cycles", "input_stall_cycles", "useful_mac_cycles", "unused_mac_cycles",
                  "ub_stall_cycles")
ENERGY_KEYS = ("total_pj", "dynamic_pj", "static_pj", "total_tops_per_w", "dynamic_tops_per_w",
               "total_inferences_per_j", "dynamic_inferences_per_j")
PLOTTED_METRICS = ("latency_s", "utilization", "total_tops_per_w")


class SweepError(TpusimError):
    """A sweep grid or option is invalid, or one of its points cannot run."""


@dataclass(frozen=True)
class SweepPoint:
    """One design point: what ``tpusim.simulate`` is called with (the config file is the sweep's)."""

    model: str
    batch: int
    overrides: tuple[tuple[str, Any], ...]
    quantize: bool
    key: str  # names the point's file; see point_key
    # Contents of the config file with its energy tables, and of the model file: a worker process keeps
    # the parsed config and the lowered model between points under these, so an edited file is read again.
    config_digest: str
    model_digest: str
    input_shape: tuple[int, ...] | None = None
    calib_data: str | None = None
    data_digest: str | None = None  # the calibration data's contents

    @property
    def params(self) -> dict[str, Any]:
        """The swept parameters as they appear in the sweep's table."""
        from tpusim.pipeline import model_label

        return {"model": model_label(self.model), "batch": self.batch, **dict(self.overrides)}

    def label(self) -> str:
        return ", ".join(f"{key}={value}" for key, value in self.params.items())


def point_key(config_digest: str, model: str, model_digest: str, batch: int,
              overrides: tuple[tuple[str, Any], ...], quantize: bool, input_shape: tuple[int, ...] | None = None,
              data_digest: str | None = None) -> str:
    """A stable name for a point: changes with the content of every file it reads (the config and the
    energy table it names, the model, the calibration data) and with any value."""
    identity = {"format": POINT_FORMAT, "config": config_digest, "model": model, "model_file": model_digest,
                "batch": batch, "overrides": [list(item) for item in overrides], "quantize": quantize,
                "input_shape": list(input_shape) if input_shape else None, "calib_data": data_digest}
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _model_digest(model: str, input_shape: tuple[int, ...] | None = None) -> str:
    from tpusim.frontend import load_onnx
    from tpusim.pipeline import resolve_model

    path = resolve_model(model)
    # A missing, corrupt or unsupported model (or a shape it cannot take) fails here, in one line, before any work.
    load_onnx(path, batch=1, input_shape=input_shape)
    return _file_digest(path)


def _data_digest(path: str | Path) -> str:
    """Digest of calibration data: a file's bytes, or every file of a folder (names and bytes)."""
    path = Path(path)
    if not path.exists():
        raise SweepError(f"--calib-data {path}: no such calibration file or folder")
    if path.is_file():
        return _file_digest(path)
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(path)).encode() + b"\0" + _file_digest(file).encode())
    return digest.hexdigest()


def _config_file_digest(path: Path) -> str:
    """Digest of the config file, once it is known to be a readable YAML file (a missing, unreadable or
    binary one fails in load_config's words, before its bytes are hashed)."""
    from tpusim.config import read_yaml_file

    read_yaml_file(path, "config file")
    return _file_digest(path)


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def expand_grid(grid: Mapping[str, Sequence[Any]], *, zip: bool = False) -> list[dict[str, Any]]:
    """Every combination of the grid's values (cross product, first key outermost), or with ``zip=True``
    the values position by position; in zip mode a key with a single value is held constant."""
    for name, values in grid.items():
        if len(values) == 0:
            raise SweepError(f"sweep grid: {name}: no values")
    names = list(grid)
    if not zip:
        return [dict(builtins.zip(names, combo)) for combo in itertools.product(*grid.values())]
    lengths = {name: len(values) for name, values in grid.items() if len(values) > 1}
    if len(set(lengths.values())) > 1:
        listed = ", ".join(f"{name}: {n} values" for name, n in lengths.items())
        raise SweepError(f"--zip needs value lists of equal length (or a single value), got {listed}")
    count = next(iter(lengths.values()), 1)
    return [{name: values[i] if len(values) > 1 else values[0] for name, values in grid.items()}
            for i in range(count)]


def parse_values(text: str) -> list[Any]:
    """``"32,64,128"`` -> [32, 64, 128]; each value is read as YAML, so ``[1,2],[3,4]`` is two lists."""
    import yaml

    from tpusim.config import yaml_value

    try:
        values = yaml_value(f"[{text}]")
    except yaml.YAMLError:
        raise ConfigError(f"{text!r}: cannot read as comma-separated values") from None
    if not values or any(value is None for value in values):
        raise ConfigError(f"{text!r}: expected comma-separated values like 32,64,128")
    return values


def parse_set(text: str) -> tuple[str, list[Any]]:
    """``array.rows=32,64`` -> ("array.rows", [32, 64])."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {text!r}: expected KEY.PATH=VALUE[,VALUE...]")
    try:
        return key.strip(), parse_values(raw)
    except ConfigError as exc:
        raise ConfigError(f"--set {key.strip()}: {exc}") from None


def _as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def build_points(config: str | Path, model: str | Sequence[str], grid: Mapping[str, Sequence[Any]], *,
                 zip: bool = False, batch: int | Sequence[int] = 1, quantize: bool = False,
                 input_shape: tuple[int, ...] | None = None, calib_data: str | Path | None = None) -> list[SweepPoint]:
    """The sweep's points in grid order (models, then batches, then the grid's settings), each checked
    (config values, model, batch) before anything runs. ``zip`` applies to the grid's values only:
    models and batch sizes are always crossed with the grid's settings."""
    for reserved in ("model", "batch"):
        if reserved in grid:
            raise SweepError(f"sweep grid: {reserved}: pass it as the {reserved} argument, not a grid key")
    batches = _as_list(batch)
    for value in batches:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise SweepError(f"batch: expected positive integers, got {value!r}")
    models = [str(m) for m in _as_list(model)]
    if not models or not batches:
        raise SweepError("a sweep needs at least one model and one batch size")
    settings = [tuple(combo.items()) for combo in expand_grid({k: _as_list(v) for k, v in grid.items()}, zip=zip)]
    config_file_digest = _config_file_digest(Path(config))
    # A bad key or value fails here, naming it, before any work; the energy table is part of the point.
    tables = {_config_with(str(config), config_file_digest, dict(overrides)).energy.table for overrides in settings}
    config_digest = config_file_digest + "".join(sorted(_file_digest(Path(t)) for t in tables))
    model_digests = {name: _model_digest(name, input_shape) for name in models}
    data = None if calib_data is None else str(calib_data)
    data_digest = None if data is None else _data_digest(data)
    return [SweepPoint(model=m, batch=b, overrides=overrides, quantize=quantize, input_shape=input_shape,
                       calib_data=data, data_digest=data_digest, config_digest=config_digest,
                       model_digest=model_digests[m],
                       key=point_key(config_digest, m, model_digests[m], b, overrides, quantize, input_shape,
                                     data_digest))
            for m, b, overrides in itertools.product(models, batches, settings)]


def point_record(point: SweepPoint, summary: Mapping[str, Any], energy: RunEnergy) -> dict[str, Any]:
    """One row of the sweep table: the point's parameters, then what ``tpusim.simulate`` reports for it
    (its ``Result.summary`` and the dynamic energy per component)."""
    s = summary
    run_energy = s["energy"]
    record: dict[str, Any] = {
        **point.params,
        "latency_s": s["latency_s"], "total_cycles": s["total_cycles"], "tops": s["tops"],
        "inferences_per_s": s["inferences_per_s"], "utilization": s["utilization"], "macs": s["macs"],
        "energy_per_inference_pj": run_energy["total_pj"] / s["batch"],
        **{key: run_energy[key] for key in ENERGY_KEYS},
        **{key: s["breakdown"][key] for key in BREAKDOWN_KEYS},
        **{f"energy_{component}_pj": pj for component, pj in energy.dynamic.as_dict().items()
           if component != "total"},
    }
    record.update({key: value for key, value in s.get("fidelity", {}).items()
                   if value is None or isinstance(value, (bool, int, float, str))})
    return record


def simulate_point(config: str, point: SweepPoint) -> dict[str, Any]:
    """Run one point (in a worker process, local or Dask) and return its record, equal to what a direct
    ``tpusim.simulate`` with the point's settings reports.

    A timing point (``quantize`` false) compiles, simulates and prices only: the process reads the
    config, lowers the model and reads the energy table once for all its points, and makes no
    per-tensor twin run (that run measures requantization overhead, which the record has no column
    for). A quantized point is what one ``tpusim.simulate`` call does, except that it takes an earlier
    point's quantization (calibration, integer execution, fidelity: seconds) where nothing that
    quantization read differs (:func:`_quantization_of`)."""
    if point.quantize:
        from tpusim import pipeline

        options = pipeline.RunOptions(config=Path(config), model=point.model, batch=point.batch,
                                      overrides=dict(point.overrides), input_shape=point.input_shape,
                                      calib_data=point.calib_data, quantize=True)
        hardware, graph, model_path = pipeline.prepare(options)
        evaluation = pipeline.evaluate(hardware, graph, model_path, options,
                                       quantize_with=functools.partial(_quantization_of, point))
        return point_record(point, evaluation.summary, evaluation.energy)
    from tpusim.mapping import compile_program
    from tpusim.pipeline import time_and_energy
    from tpusim.report import run_report

    hardware = _point_config(config, point)
    graph = _lowered(point.model, point.model_digest, point.batch, point.input_shape)
    # keyed by a weak reference: a program is only ever another point's of this very graph object, and the
    # cache keeps no graph (and its weights) alive
    program = _programs().get(weakref.ref(graph), hardware, functools.partial(compile_program, graph))
    sim, energy = time_and_energy(graph, hardware, _energy_table(hardware.energy.table, point.config_digest),
                                  program)[1:]
    return point_record(point, run_report.summary(graph, sim, hardware, energy), energy)


# Caches of one process (a local worker, a Dask worker, or the caller's with jobs=1), keyed on file
# digests (the arguments the bodies do not use) so that an edited file is read again. A lowered
# ResNet-50 holds its weights (about 100 MB at any batch), hence room for two only: local workers get
# their points grouped by model and batch (pool_map's groups), so they seldom return to an older one.
@functools.lru_cache(maxsize=4)
def _base_config(config: str, config_digest: str) -> HardwareConfig:
    from tpusim.config import load_config

    return load_config(config)


@functools.lru_cache(maxsize=2)
def _lowered(model: str, model_digest: str, batch: int, input_shape: tuple[int, ...] | None) -> Graph:
    from tpusim.frontend import load_onnx
    from tpusim.pipeline import resolve_model

    return load_onnx(resolve_model(model), batch=batch, input_shape=input_shape)


@functools.lru_cache(maxsize=4)
def _energy_table(path: str, config_digest: str) -> EnergyTable:
    from tpusim.energy.table import load_energy_table

    return load_energy_table(path)


@functools.cache
def _programs() -> RecordedResults:
    """This process's compiled programs, by graph: a point reuses one where it differs from an earlier point
    of its graph only in settings the compiler does not read (the compiler reads 15, none of them a
    bandwidth, latency or price); a graph's points come to a local worker together (``pool_map``'s groups)."""
    from tpusim.config import RecordedResults

    return RecordedResults(4)


@functools.cache
def _quantizations() -> RecordedResults:
    """This process's quantizations (each holds the integer model and the calibration set, so two), noting
    the config sections quantization reads whole: it hands them on to the quantizer."""
    from tpusim.config import RecordedResults

    return RecordedResults(2, whole_sections=True)


def _quantization_of(point: SweepPoint, config: HardwareConfig, graph: Graph, model_path: Path,
                     options: RunOptions) -> QuantOutcome:
    """``pipeline.quantize``'s outcome for the point, reused from an earlier point of the same model file,
    input shape and calibration data whose config agreed in every config section quantization read (it
    reads the quantization settings, the input preprocessing, the accumulators, and the array only for
    PE-level fidelity): an array-size or bandwidth sweep quantizes once. Quantization runs on a batch-1
    lowering whatever the point's batch, so batch sizes share it too."""
    from tpusim import pipeline

    files = (point.model, point.model_digest, point.input_shape, point.calib_data, point.data_digest)
    return _quantizations().get(files, config,
                                lambda recorded: pipeline.quantize(recorded, graph, model_path, options))


def _clear_caches() -> None:
    for cache in (_base_config, _lowered, _energy_table, _programs, _quantizations):
        cache.cache_clear()


# Overrides that load_config must see: it resolves a relative energy table against the config's folder
# and checks the weight-memory technology against the table.
_READ_WITH_THE_FILE = ("energy", "energy.table", "weight_memory", "weight_memory.technology")


def _config_with(config: str, config_digest: str, overrides: Mapping[str, Any]) -> HardwareConfig:
    """``load_config(config, overrides)``, built from this process's parsed base config where that is
    the same (every other override is checked by the same code either way); an invalid override fails
    with load_config's message, which names the config file."""
    from tpusim.config import load_config

    if not any(key in _READ_WITH_THE_FILE for key in overrides):
        try:
            return _base_config(config, config_digest).replace(**overrides)
        except ConfigError:
            pass
    return load_config(config, dict(overrides))


def _point_config(config: str, point: SweepPoint) -> HardwareConfig:
    return _config_with(config, point.config_digest, dict(point.overrides))


class _PointStore:
    """Finished points as ``DIR/points/<key>.json``, each written atomically as it finishes."""

    def __init__(self, out: Path | None):
        self.folder = out / POINTS_DIR if out is not None else None

    def path(self, point: SweepPoint) -> Path | None:
        return self.folder / f"{point.key}.json" if self.folder is not None else None

    def load(self, point: SweepPoint) -> dict[str, Any] | None:
        path = self.path(point)
        if path is None or not path.is_file():
            return None
        try:
            return json.loads(path.read_text())["record"]
        except (ValueError, KeyError, TypeError):
            return None  # unreadable: compute the point again and overwrite the file

    def save(self, point: SweepPoint, record: dict[str, Any]) -> None:
        path = self.path(point)
        if path is not None:
            atomic_write_json(path, {"point": point.params, "quantize": point.quantize, "record": record})

    def discard_all(self) -> None:
        if self.folder is not None and self.folder.is_dir():
            for path in self.folder.glob("*.json"):
                path.unlink()


Completed = Iterator[tuple[SweepPoint, dict[str, Any]]]


def _run_in_process(config: str, points: Sequence[SweepPoint]) -> Completed:
    try:
        for point in points:
            yield point, _checked(point, lambda: simulate_point(config, point))
    finally:
        _clear_caches()  # the caller's process: do not keep lowered models alive after the sweep


# Local workers are plain ``python -c`` processes of our own rather than a multiprocessing pool:
# - they never re-import the caller's ``__main__`` (spawn/forkserver do), so a script that calls
#   ``tpusim.sweep`` at top level works without an ``if __name__ == "__main__":`` guard;
# - they run in their own session and ignore SIGINT, so an interrupt reaches only this process,
#   which kills them (SIGKILL) and waits for them: nothing is left half-done on a lock, no exit
#   handler waits on a queue, and no helper process (resource tracker, fork server) exists;
# - each watches its parent and exits if the parent is gone (killed with SIGKILL, say).
# Tasks and results are pickled frames over the worker's stdin and a private copy of its stdout.
_WORKER_CODE = "from tpusim.sweeps import _worker_main; _worker_main()"
_FRAME_HEADER = struct.Struct("!Q")


def _write_frame(stream: Any, obj: Any) -> None:
    payload = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(_FRAME_HEADER.pack(len(payload)) + payload)
    stream.flush()


def _read_exactly(stream: Any, size: int) -> bytes | None:
    chunks, left = [], size
    while left:
        chunk = stream.read(left)
        if not chunk:
            return None
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _read_frame(stream: Any) -> Any:
    """The next object, or None at end of stream (the other side closed or died)."""
    header = _read_exactly(stream, _FRAME_HEADER.size)
    if header is None:
        return None
    payload = _read_exactly(stream, _FRAME_HEADER.unpack(header)[0])
    return None if payload is None else pickle.loads(payload)


def _watch_parent(parent: int) -> None:
    while True:
        time.sleep(0.2)
        if os.getppid() != parent:
            os._exit(3)


def _worker_main() -> None:
    """A pool worker: reads (function, argument) frames from stdin and answers each with ("ok", result),
    ("user", message) for bad input (a TpusimError), or ("crash", description); exits at end of input."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    keep_freed_memory()
    replies = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # anything printed goes to stderr, never into the result stream
    tasks = os.fdopen(os.dup(0), "rb")
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    threading.Thread(target=_watch_parent, args=(int(sys.argv[1]),), daemon=True).start()
    while True:
        try:
            task = _read_frame(tasks)
        except Exception as exc:
            _write_frame(replies, ("crash", f"cannot read the task: {exc!r}"))
            return
        if task is None:
            return
        function, argument = task
        try:
            reply: tuple[str, Any] = ("ok", function(argument))
        except TpusimError as exc:
            reply = ("user", str(exc))
        except Exception as exc:  # the parent reports it as the task's failure, with this traceback
            reply = ("crash", f"{exc!r}\n{traceback.format_exc()}")
        _write_frame(replies, reply)


class _NoInterrupt:
    """Ctrl-C held back until the block ends while worker processes are started or torn down, so an
    interrupt can never leave a started worker unrecorded or a recorded one not killed. (Python runs
    signal handlers in the main thread only; elsewhere there is nothing to hold back.)"""

    def __enter__(self) -> None:
        self.caught = False
        self.previous = None
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._defer)

    def _defer(self, signum: int, frame: Any) -> None:
        self.caught = True

    def __exit__(self, *exc: Any) -> None:
        if self.previous is None:
            return
        signal.signal(signal.SIGINT, self.previous)
        if self.caught:
            if callable(self.previous):
                self.previous(signal.SIGINT, None)
            elif self.previous == signal.SIG_DFL:
                raise KeyboardInterrupt


class TaskFailed(Exception):
    """A task raised in a worker: ``user`` for a TpusimError (``message`` is its text), else a crash."""

    def __init__(self, user: bool, message: str, item: Any = None):
        super().__init__(message)
        self.user, self.message, self.item = user, message, item


_NO_GROUP_YET = object()


class _Worker:
    def __init__(self) -> None:
        import tpusim

        env = dict(os.environ)
        package_root = str(Path(tpusim.__file__).resolve().parents[1])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
        self.process = subprocess.Popen([sys.executable, "-c", _WORKER_CODE, str(os.getpid())],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env,
                                        start_new_session=True)
        self.item: Any = None
        self.group: Hashable = _NO_GROUP_YET

    @property
    def fd(self) -> int:
        return self.process.stdout.fileno()

    def submit(self, function: Callable[[Any], Any], item: Any) -> None:
        self.item = item
        try:
            _write_frame(self.process.stdin, (function, item))
        except OSError:  # the worker is gone (killed from outside, out of memory)
            raise TaskFailed(False, f"its worker process died (exit code {self.process.wait()})", item) from None

    def result(self) -> Any:
        reply = _read_frame(self.process.stdout)
        if reply is None:
            raise TaskFailed(False, f"its worker process died (exit code {self.process.wait()})")
        kind, value = reply
        if kind == "ok":
            return value
        raise TaskFailed(kind == "user", value)

    def stop(self, kill: bool) -> None:
        if kill and self.process.poll() is None:
            self.process.kill()
        for stream in (self.process.stdin, self.process.stdout):
            try:
                stream.close()
            except OSError:
                pass
        try:
            self.process.wait(timeout=None if kill else 10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


class _Queue:
    """Items not yet handed out, by group (in order of first appearance), each group in item order."""

    def __init__(self, items: Sequence[Any], group: Callable[[Any], Hashable]):
        self.groups: dict[Hashable, deque[Any]] = {}
        for item in items:
            self.groups.setdefault(group(item), deque()).append(item)

    def __bool__(self) -> bool:
        return bool(self.groups)

    def take(self, previous: Hashable, others: Iterable[Hashable]) -> tuple[Hashable, Any]:
        """The next item of group ``previous``; when that group is done, of the first group that no other
        worker is on; when every group has a worker, of the group with the most items left."""
        key = previous
        if key not in self.groups:
            taken = set(others)
            free = [k for k in self.groups if k not in taken]
            key = free[0] if free else max(self.groups, key=lambda k: len(self.groups[k]))
        items = self.groups[key]
        item = items.popleft()
        if not items:
            del self.groups[key]
        return key, item


def _no_group(item: Any) -> None:
    return None


def pool_map(function: Callable[[Any], Any], items: Sequence[Any], jobs: int,
             group: Callable[[Any], Hashable] = _no_group) -> Iterator[tuple[Any, Any]]:
    """``(item, function(item))`` for every item, in completion order, computed on ``jobs`` local worker
    processes; ``function`` and the items must pickle (a module-level function, ``functools.partial``).
    Items are handed out in order; with ``group``, a worker keeps to the group of its last item while
    that group has items left and then moves to a group no other worker is on, so that what a worker
    keeps for a group (a lowered model) serves most of the group's items.
    A task that raises ends the iteration with :class:`TaskFailed`. However the iteration ends
    (exhausted, an exception, ``close()``, Ctrl-C), every worker is gone when it has ended."""
    workers: list[_Worker] = []
    todo = _Queue(items, group)
    finished = False
    try:
        for _ in range(min(jobs, len(items))):
            with _NoInterrupt():
                workers.append(_Worker())
        idle = list(workers)
        busy: dict[int, _Worker] = {}
        while todo or busy:
            while todo and idle:
                worker = idle.pop()
                worker.group, item = todo.take(worker.group, (other.group for other in busy.values()))
                worker.submit(function, item)
                busy[worker.fd] = worker
            ready, _, _ = select.select(list(busy), [], [])
            for fd in ready:
                worker = busy.pop(fd)
                item = worker.item
                try:
                    result = worker.result()
                except TaskFailed as failure:
                    failure.item = item
                    raise
                idle.append(worker)
                yield item, result
        finished = True
    finally:
        with _NoInterrupt():
            for worker in workers:
                worker.stop(kill=not finished)


def _lowering_of(point: SweepPoint) -> Hashable:
    return point.model, point.model_digest, point.batch, point.input_shape  # the key of _lowered


def _run_local(config: str, points: Sequence[SweepPoint], jobs: int) -> Completed:
    completed = pool_map(functools.partial(simulate_point, config), points, jobs, group=_lowering_of)
    try:
        while True:
            try:
                point, record = next(completed)
            except StopIteration:
                return
            except TaskFailed as failure:
                point = failure.item
                if failure.user:
                    raise SweepError(f"sweep point {point.label()}: {failure.message}") from None
                raise RuntimeError(f"sweep point {point.label()} failed: {failure.message}") from None
            yield point, record
    finally:
        completed.close()


def _run_dask(config: str, points: Sequence[SweepPoint], scheduler: str | None, jobs: int) -> Completed:
    try:
        from distributed import Client, as_completed
    except ImportError:
        raise SweepError("--executor dask needs the dask distributed package: pip install 'tpusim[dask]'") from None
    # Without an address Dask starts its own local cluster; workers must see the config file's path.
    try:
        client = Client(scheduler) if scheduler else Client(n_workers=jobs, threads_per_worker=1)
    except (OSError, TimeoutError) as exc:
        raise SweepError(f"--scheduler {scheduler}: cannot reach the Dask scheduler: {exc}") from None
    try:
        futures = client.map(simulate_point, [config] * len(points), points, pure=False)
        by_future = dict(zip(futures, points))
        try:
            for future in as_completed(futures):
                point = by_future[future]
                yield point, _checked(point, future.result)
        finally:
            client.cancel(futures)
    finally:
        client.close()


def _checked(point: SweepPoint, compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    try:
        return compute()
    except TpusimError as exc:
        raise SweepError(f"sweep point {point.label()}: {exc}") from exc
    except Exception as exc:
        raise RuntimeError(f"sweep point {point.label()} failed: {exc!r}") from exc


def sweep(config: str | Path, model: str | Sequence[str], grid: Mapping[str, Sequence[Any]], *, zip: bool = False,
          batch: int | Sequence[int] = 1, out: str | Path | None = None, fresh: bool = False,
          executor: str = "local", scheduler: str | None = None, jobs: int | None = None, quantize: bool = False,
          progress: bool = True, plots: bool = True, input_shape: tuple[int, ...] | None = None,
          calib_data: str | Path | None = None) -> list[dict[str, Any]]:
    """Simulate every point of a design-space grid and return one record (a flat dict) per point, in grid order.

    ``grid`` maps config key paths to the values to sweep, e.g. ``{"array.rows": [128, 256]}``; ``model``
    (a built-in workload name or an ``.onnx`` path) and ``batch`` may be single values or lists and are
    swept too. The points are the cross product of all the lists, or with ``zip=True`` the grid's lists
    are taken position by position (all of equal length; a single value is held constant) and crossed
    with the models and batch sizes.

    Each record holds the point's parameters (``model``, ``batch`` and every grid key) and its results:
    ``latency_s``, ``total_cycles``, ``tops``, ``inferences_per_s``, ``utilization``, ``macs``,
    ``energy_per_inference_pj``, the energy totals and efficiencies (``total_pj``, ``dynamic_pj``,
    ``static_pj``, ``total_tops_per_w``, ``dynamic_tops_per_w``, ``total_inferences_per_j``, ...),
    the cycle breakdown (``active_cycles``, ``weight_stall_cycles``, ``weight_shift_cycles``,
    ``non_matrix_cycles``, ...), dynamic energy per component (``energy_mac_pj``, ...) and, with
    ``quantize=True``, the fidelity figures of ``Result.summary["fidelity"]``. ``pandas.DataFrame(records)``
    gives the table.

    With ``out``, each finished point is saved at once as ``out/points/<hash>.json``; a rerun skips the
    saved points (``fresh=True`` discards them first), and ``out/sweep.csv`` plus, with ``plots``, one PNG
    per swept parameter (``out/sweep_<parameter>.png``) are assembled from the point files. Points run on
    ``jobs`` local processes (default: one per CPU) or, with ``executor="dask"``, on the Dask distributed
    cluster at ``scheduler`` (an address such as ``tcp://10.0.0.5:8786``; without one Dask starts a local
    cluster). Dask workers read the config and model files from the same paths as this process.
    ``input_shape`` (models with dynamic dimensions) and ``calib_data`` (with ``quantize``) are passed
    to every point as ``tpusim.simulate`` takes them. With ``progress``, stderr shows one counted phase for
    the points still to compute and one for writing the files (:mod:`tpusim.progress`: plain lines when
    stderr is not a terminal).
    """
    if executor not in ("local", "dask"):
        raise SweepError(f"executor: expected 'local' or 'dask', got {executor!r}")
    if scheduler is not None and executor != "dask":
        raise SweepError("a scheduler address needs executor 'dask'")
    if jobs is not None and (isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1):
        raise SweepError(f"jobs: expected a positive integer, got {jobs!r}")
    out_dir = Path(out) if out is not None else None
    if out_dir is not None:
        check_output_dir(out_dir, "out")
    config_path = Path(config).resolve()
    points = build_points(config_path, model, grid, zip=zip, batch=batch, quantize=quantize, input_shape=input_shape,
                          calib_data=calib_data)
    store = _PointStore(out_dir)
    if fresh:
        store.discard_all()

    records: dict[str, dict[str, Any]] = {}
    pending: dict[str, SweepPoint] = {}
    for point in points:
        if point.key in records or point.key in pending:
            continue
        saved = store.load(point)
        if saved is not None:
            records[point.key] = saved
        else:
            pending[point.key] = point

    workers = min(jobs or os.cpu_count() or 1, max(len(pending), 1))
    todo = list(pending.values())
    if not todo:
        completed: Completed = iter(())
    elif executor == "dask":
        completed = _run_dask(str(config_path), todo, scheduler, workers)
    elif workers == 1:
        completed = _run_in_process(str(config_path), todo)
    else:
        completed = _run_local(str(config_path), todo, workers)
    # The points' own stages (a quantized point run in this process) report to an inner silent Progress:
    # this one counts points.
    with Progress(progress) as shown, Progress(enabled=False):
        try:
            if todo:
                shown.phase(_sweeping(len(records), len(records) + len(todo)), len(todo), "points")
            for done, (point, record) in enumerate(completed, start=1):
                store.save(point, record)
                records[point.key] = record
                shown.update(done)
        finally:
            close = getattr(completed, "close", None)
            if close is not None:
                close()  # stops (kills) the workers now, not when the generator is collected

        rows = [dict(records[point.key]) for point in points]
        if out_dir is not None:
            shown.phase(f"writing {CSV_NAME} and plots" if plots else f"writing {CSV_NAME}")
            write_table(rows, out_dir / CSV_NAME)
            if plots:
                write_plots(rows, swept_parameters(points, grid), out_dir)
    return rows


def _sweeping(saved: int, total: int) -> str:
    """The name of the phase that computes the points a sweep has not saved yet."""
    return f"sweeping, {saved:,} of {total:,} points saved before" if saved else "sweeping"


def swept_parameters(points: Sequence[SweepPoint], grid: Mapping[str, Sequence[Any]]) -> list[str]:
    """Parameters that take more than one value across the points, in table order."""
    names = ["model", "batch", *grid]
    return [name for name in names if len({json.dumps(p.params[name], default=str) for p in points}) > 1]


def _columns(rows: Iterable[dict[str, Any]]) -> list[str]:
    columns: dict[str, None] = {}
    for row in rows:
        columns.update(dict.fromkeys(row))
    return list(columns)


def write_table(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    return atomic_write_csv(path, _columns(rows), rows)


def write_plots(rows: Sequence[dict[str, Any]], parameters: Sequence[str], out_dir: Path) -> list[Path]:
    """Latency, utilization and TOPS/W against each numeric swept parameter (against each swept parameter
    if none is numeric), a line per combination of the others (coloured by one of them past ten lines,
    :func:`tpusim.report.plots.sweep_figure`); a parameter swept in lockstep with one
    already plotted (``zip``) gets no plot of its own."""
    from tpusim.report.plots import determined_by, plot_sweep

    numeric = [p for p in parameters if all(isinstance(r[p], (int, float)) and not isinstance(r[p], bool)
                                            for r in rows)]
    axes: list[str] = []
    for name in numeric or parameters:
        if not any(determined_by(rows, name, x) and determined_by(rows, x, name) for x in axes):
            axes.append(name)
    return [plot_sweep(rows, x=name, metrics=PLOTTED_METRICS, path=out_dir / f"sweep_{_file_safe(name)}.png",
                       params=parameters)
            for name in axes]


TERMINAL_RESULTS = ("latency", "tops", "utilization", "energy", "tops_per_w")
TERMINAL_HEADERS = {"latency": "latency", "tops": "TOPS", "utilization": "utilization",
                    "energy": "energy/inference", "tops_per_w": "TOPS/W"}


def terminal_table(rows: Sequence[dict[str, Any]], parameters: Sequence[str], max_rows: int = 40) -> str:
    """The sweep's table as the terminal shows it: the parameters, then latency and energy per inference in
    the units their size calls for, utilization in %, counts with thousands separators (sweep.csv keeps
    plain numbers)."""
    shown = [{**{p: r[p] for p in parameters}, "latency": format_duration(r["latency_s"]), "tops": r["tops"],
              "utilization": format_percent(r["utilization"]), "energy": format_energy(r["energy_per_inference_pj"]),
              "tops_per_w": r["total_tops_per_w"]} for r in rows]
    text = [p for p in parameters if not all(isinstance(r[p], (int, float)) for r in rows)]
    return format_table([*parameters, *TERMINAL_RESULTS], shown, max_rows=max_rows, left=text,
                        headers=TERMINAL_HEADERS)


def _file_safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)


def add_sweep_command(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``tpusim sweep`` on the CLI's subcommand parsers."""
    parser = subparsers.add_parser(
        "sweep", help="simulate a grid of design points in parallel; write sweep.csv and plots",
        description="Simulate every combination of the swept values (or, with --zip, the values position by "
                    "position) and write one row per point to OUT/sweep.csv, with plots. Finished points are "
                    "kept in OUT/points/, so a rerun resumes where the last one stopped.")
    parser.add_argument("config", type=Path, help="hardware config YAML, e.g. configs/tpu_v1.yaml")
    parser.add_argument("--model", required=True, metavar="M[,M...]",
                        help="built-in workload names or .onnx paths, comma-separated")
    parser.add_argument("--batch", metavar="B[,B...]",
                        help="batch sizes, comma-separated (default: the N of --input-shape, else 1)")
    parser.add_argument("--input-shape", type=shape, metavar="N,C,H,W",
                        help="input shape for models with dynamic dimensions; N is the batch unless --batch is given "
                             "(default: the model's own input shape)")
    parser.add_argument("--calib-data", metavar="PATH",
                        help="calibration inputs for --quantize: a .npy/.npz or a folder of images "
                             "(default: a seeded synthetic set)")
    parser.add_argument("--weights", choices=("per-tensor", "per-channel"),
                        help="weight quantization granularity for every point (default: the config's quant.weights)")
    parser.add_argument("--set", dest="grid", action="append", default=[], metavar="KEY.PATH=V1[,V2...]",
                        help="sweep a config value, e.g. --set array.rows=32,64,128 (repeatable; one value "
                             "just overrides; default: the config file's values)")
    parser.add_argument("--zip", action="store_true",
                        help="take the --set value lists position by position instead of their cross product (models and "
                             "batch sizes are still crossed with them)")
    parser.add_argument("--out", type=Path, help="output folder (default results/sweep-<models>-<config>/)")
    parser.add_argument("--fresh", action="store_true", help="discard finished points in OUT and recompute all")
    parser.add_argument("--jobs", type=positive_int, metavar="N", help="local worker processes (default: one per CPU)")
    parser.add_argument("--executor", choices=("local", "dask"), default="local",
                        help="local worker processes or a Dask distributed cluster")
    parser.add_argument("--scheduler", metavar="ADDRESS",
                        help="Dask scheduler address for --executor dask, e.g. tcp://10.0.0.5:8786 (default: a "
                             "local Dask cluster of --jobs workers)")
    parser.add_argument("--quantize", action="store_true",
                        help="calibrate and run the integer model too, adding fidelity columns (slower)")
    parser.add_argument("--no-progress", dest="progress", action="store_false",
                        help="no progress bar or phase lines on stderr")
    parser.set_defaults(handler=_cmd_sweep)
    return parser


def _cmd_sweep(args: argparse.Namespace) -> int:
    from tpusim.pipeline import model_label

    grid: dict[str, list[Any]] = {}
    for item in args.grid:
        key, values = parse_set(item)
        if key in grid:
            raise ConfigError(f"--set {key}: given twice")
        grid[key] = values
    models = [m.strip() for m in args.model.split(",") if m.strip()]
    if not models:
        raise SweepError(f"--model {args.model!r}: expected model names")
    if args.weights is not None:
        if "quant.weights" in grid:
            raise ConfigError("--weights and --set quant.weights=...: give one of them")
        grid["quant.weights"] = [args.weights]
    if args.calib_data is not None and not args.quantize:
        raise SweepError("--calib-data needs --quantize (without it no point calibrates)")
    if args.batch is not None:
        batches = parse_values(args.batch)
    else:
        batches = [args.input_shape[0] if args.input_shape else 1]
    out = args.out or Path("results") / f"sweep-{'-'.join(model_label(m) for m in models)}-{Path(args.config).stem}"
    check_output_dir(out)
    rows = sweep(args.config, models, grid, zip=args.zip, batch=batches, out=out, fresh=args.fresh,
                 executor=args.executor, scheduler=args.scheduler, jobs=args.jobs, quantize=args.quantize,
                 input_shape=args.input_shape, calib_data=args.calib_data, progress=args.progress)
    print(terminal_table(rows, ["model", "batch", *grid]))
    for path in sorted(out.glob("sweep*")):
        print(f"wrote {path}")
    return 0
