"""Typed, validated hardware / quantization / energy configuration loaded from YAML.

Every section is a frozen dataclass; the loader checks the YAML against the dataclass
fields (unknown keys, missing keys, wrong types, out-of-range values, duplicate keys) and
reports the first problem as one line naming the file and the key path.
"""
from __future__ import annotations

import dataclasses
import math
import re
import threading
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, TypeVar

import yaml

from tpusim.errors import ConfigError


def _range(lo: float | None = None, hi: float | None = None, lo_open: bool = False) -> dict:
    return {"lo": lo, "hi": hi, "lo_open": lo_open}


@dataclass(frozen=True)
class ArrayConfig:
    rows: int = field(metadata=_range(1, 8192))
    cols: int = field(metadata=_range(1, 8192))
    clock_mhz: float = field(metadata=_range(0, None, lo_open=True))
    datatype: Literal["int8", "fp32"]
    weight_double_buffering: bool  # shadow weight registers: the next tile shifts in while one streams

    @property
    def element_bytes(self) -> int:
        return 1 if self.datatype == "int8" else 4

    @property
    def clock_hz(self) -> float:
        return self.clock_mhz * 1e6


@dataclass(frozen=True)
class WeightMemoryConfig:
    technology: str
    capacity_bytes: int = field(metadata=_range(1))
    bandwidth_gb_s: float = field(metadata=_range(0, None, lo_open=True))
    latency_cycles: int = field(metadata=_range(0))
    requests_in_flight: int = field(metadata=_range(1, 1024))  # tile reads whose latencies overlap


@dataclass(frozen=True)
class UnifiedBufferConfig:
    capacity_bytes: int = field(metadata=_range(1))
    width_bytes: int = field(metadata=_range(1))
    read_ports: int = field(metadata=_range(1, 64))   # shared by the MXU's inputs, activation operands, host out
    write_ports: int = field(metadata=_range(1, 64))  # shared by activation results and host in
    port_bytes_per_cycle: float = field(metadata=_range(0, None, lo_open=True))


@dataclass(frozen=True)
class AccumulatorConfig:
    entries: int = field(metadata=_range(2))  # at least one row per half when double-buffered
    bits: int = field(metadata=_range(16, 64))
    double_buffered: bool


@dataclass(frozen=True)
class WeightFifoConfig:
    depth_tiles: int = field(metadata=_range(1, 1024))


@dataclass(frozen=True)
class ComputedWeightsConfig:
    """How an operand computed on the chip (attention's K and V) becomes the array's stationary weights:
    ``host``, a round trip unified buffer -> host -> weight memory -> FIFO (TPU v1 as built), or
    ``direct``, a unified-buffer -> FIFO path of ``direct_bytes_per_cycle``."""

    path: Literal["host", "direct"]
    direct_bytes_per_cycle: float = field(metadata=_range(0, None, lo_open=True))


@dataclass(frozen=True)
class HostConfig:
    bandwidth_gb_s: float = field(metadata=_range(0, None, lo_open=True))
    latency_cycles: int = field(metadata=_range(0))


@dataclass(frozen=True)
class ActivationUnitConfig:
    lanes: int = field(metadata=_range(1))
    per_channel_requant: Literal["native", "extra_pass"]
    pipeline_latency_cycles: int = field(metadata=_range(0))
    scale_path_bytes_per_cycle: float = field(metadata=_range(0, None, lo_open=True))  # requant vectors' path


@dataclass(frozen=True)
class MappingConfig:
    pack_groups: bool
    sub_batching: bool
    recurrent_input: Literal["hoisted", "per_step"]  # an LSTM/GRU's input GEMM x W^T: all steps at once or per step


@dataclass(frozen=True)
class QuantConfig:
    weights: Literal["per-tensor", "per-channel"]
    activations: Literal["asymmetric-uint8", "symmetric-int8"]
    calibration: Literal["minmax", "percentile", "entropy", "mse"]
    percentile: float = field(metadata=_range(50, 100))
    histogram_bins: int = field(metadata=_range(16, 1 << 20))
    calibration_samples: int = field(metadata=_range(1, 100000))
    seed: int = field(metadata=_range(0))
    cross_layer_equalization: bool
    bias_correction: bool


@dataclass(frozen=True)
class InputPreprocessingConfig:
    """How a folder of images becomes model inputs: resize to the model's H x W, scale, normalise."""

    pixel_scale: float = field(metadata=_range(0, None, lo_open=True))
    mean: tuple[float, ...]
    std: tuple[float, ...] = field(metadata=_range(0, None, lo_open=True))


@dataclass(frozen=True)
class EnergyConfig:
    table: str
    static_power_w: float = field(metadata=_range(0))
    idle_pe_gated: bool


@dataclass(frozen=True)
class HardwareConfig:
    name: str
    array: ArrayConfig
    weight_memory: WeightMemoryConfig
    unified_buffer: UnifiedBufferConfig
    accumulators: AccumulatorConfig
    weight_fifo: WeightFifoConfig
    computed_weights: ComputedWeightsConfig
    host: HostConfig
    activation_unit: ActivationUnitConfig
    mapping: MappingConfig
    quant: QuantConfig
    input_preprocessing: InputPreprocessingConfig
    energy: EnergyConfig

    @property
    def tile_bytes(self) -> int:
        """One weight tile fills the array: rows x cols weights."""
        return self.array.rows * self.array.cols * self.array.element_bytes

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def replace(self, **overrides: Any) -> "HardwareConfig":
        """A copy with dotted-key overrides applied, e.g. ``replace(**{"array.rows": 128})``."""
        data = self.to_dict()
        for key, value in overrides.items():
            _set_dotted(data, key, value, "override")
        return from_dict(data, "override")


class _NumberLoader(yaml.SafeLoader):
    """YAML as PyYAML reads it, but for numbers with an exponent and no dot or sign in it (``1e9``, ``3.4e1``),
    which PyYAML's YAML 1.1 takes for strings and YAML 1.2 (and every user) for numbers."""


_NumberLoader.add_implicit_resolver("tag:yaml.org,2002:float",
                                    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
                                    list("-+0123456789"))


def yaml_value(text: str) -> Any:
    """A value given on the command line (``--set``), read as YAML as a config file is."""
    return yaml.load(text, Loader=_NumberLoader)


class _UniqueKeyLoader(_NumberLoader):
    """PyYAML silently keeps the last of two equal keys; this loader refuses them."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: set = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise ConfigError(
                f"{loader.name}: line {key_node.start_mark.line + 1}: duplicate key {key!r}"
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _check_value(value: Any, tp: Any, meta: Any, where: str, path: str) -> Any:
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: {path}: expected a mapping, got {type(value).__name__}")
        return _build(tp, value, where, path)
    if typing.get_origin(tp) is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{where}: {path}: expected {_type_name(tp)}, got {value!r}")
        return value
    if typing.get_origin(tp) is tuple:
        if not isinstance(value, (list, tuple)) or not value:
            raise ConfigError(f"{where}: {path}: expected a non-empty list, got {value!r}")
        (item_type, _) = typing.get_args(tp)
        return tuple(_check_value(v, item_type, meta, where, f"{path}[{i}]") for i, v in enumerate(value))
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: {path}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, float) and value.is_integer():  # 8e9 bytes: a whole number, written as a float
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: {path}: expected an integer, got {value!r}")
    elif tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: {path}: expected a number, got {value!r}")
        value = float(value)
        if not math.isfinite(value):  # YAML's .inf and .nan are numbers; no setting means either
            raise ConfigError(f"{where}: {path}: expected a finite number, got {value!r}")
    elif tp is str:
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{where}: {path}: expected a non-empty string, got {value!r}")
        return value
    lo, hi = meta.get("lo"), meta.get("hi")
    if lo is not None and (value < lo or (meta.get("lo_open") and value == lo)):
        bound = f"> {lo}" if meta.get("lo_open") else f">= {lo}"
        raise ConfigError(f"{where}: {path}: must be {bound}, got {value!r}")
    if hi is not None and value > hi:
        raise ConfigError(f"{where}: {path}: must be <= {hi}, got {value!r}")
    return value


def _build(cls: type, data: dict, where: str, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            path = f"{prefix}.{key}" if prefix else str(key)
            raise ConfigError(f"{where}: {path}: unknown key (expected one of {', '.join(fields)})")
    values = {}
    for name, f in fields.items():
        path = f"{prefix}.{name}" if prefix else name
        if name not in data:
            raise ConfigError(f"{where}: {path}: missing key")
        values[name] = _check_value(data[name], hints[name], f.metadata, where, path)
    return cls(**values)


def from_dict(data: Any, where: str) -> HardwareConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping at the top level")
    return _build(HardwareConfig, data, where)


def _set_dotted(data: dict, key: str, value: Any, where: str) -> None:
    parts = key.split(".")
    node = data
    for i, part in enumerate(parts[:-1]):
        if not isinstance(node.get(part), dict):
            raise ConfigError(f"{where}: {'.'.join(parts[: i + 1])}: no such section")
        node = node[part]
    if parts[-1] not in node:
        raise ConfigError(f"{where}: {key}: unknown key")
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``array.rows=128`` -> ("array.rows", 128); the value is read as YAML."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected KEY.PATH=VALUE")
    key, raw = text.split("=", 1)
    try:
        value = yaml_value(raw)
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def read_yaml_file(path: Path, what: str) -> Any:
    """Parse a YAML file strictly (duplicate keys refused); every failure is one ConfigError line."""
    return parse_yaml(read_file_bytes(path, what), path, what)


def read_file_bytes(path: Path, what: str) -> bytes:
    """The bytes of the ``what`` at ``path``; a missing or unreadable file is one ConfigError line."""
    where = str(path)
    if path.is_dir():
        raise ConfigError(f"{where}: is a folder, not a {what}")
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{where}: no such {what}") from None
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read: {exc.strerror}") from None


def parse_yaml(raw: bytes, path: Path, what: str) -> Any:
    """YAML read from the file at ``path`` parsed strictly, as :func:`read_yaml_file` does."""
    where = str(path)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        hint = " (an ONNX model? it goes after --model)" if path.suffix.lower() == ".onnx" else ""
        raise ConfigError(f"{where}: not a YAML {what}: binary, not UTF-8 text{hint}") from None
    try:
        loader = _UniqueKeyLoader(text)
        loader.name = where
        try:
            return loader.get_single_data()
        finally:
            loader.dispose()
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f"line {mark.line + 1}: " if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{where}: {line}invalid YAML: {problem}") from None


_CHECKOUT_CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# a checkout's configs/ folder, else the copy a non-editable install puts in the package (tpusim/configs)
SHIPPED_CONFIGS = _CHECKOUT_CONFIGS if _CHECKOUT_CONFIGS.is_dir() else Path(__file__).resolve().parent / "configs"


def resolve_table_path(table: str, config_path: Path) -> Path:
    """Where a config's ``energy.table`` is: an absolute path as it is; a relative one against the
    config file's folder, or, when nothing is there, against tpusim's shipped ``configs/`` (so a
    copy of a shipped config keeps working anywhere)."""
    given = Path(table).expanduser()
    if given.is_absolute():
        return given
    beside = (config_path.parent / given).resolve()
    if beside.exists():
        return beside
    shipped = (SHIPPED_CONFIGS / given).resolve()
    return shipped if shipped.is_file() else beside


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> HardwareConfig:
    """Load and validate a YAML config, and every file it names (the energy table), before any work.

    A relative ``energy.table`` resolves against the config file's folder, then against tpusim's
    shipped ``configs/`` (:func:`resolve_table_path`)."""
    path = Path(path)
    where = str(path)
    data = read_yaml_file(path, "config file")
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping at the top level")
    for key, value in (overrides or {}).items():
        _set_dotted(data, key, value, f"{where} (--set {key})")
    energy = data.get("energy")
    given_table = None
    if isinstance(energy, dict) and isinstance(energy.get("table"), str) and energy["table"]:
        given_table = energy["table"]
        energy["table"] = str(resolve_table_path(given_table, path))
    config = from_dict(data, where)
    table = Path(config.energy.table)
    if not table.is_file():
        searched = "" if Path(given_table).expanduser().is_absolute() else \
            f" (looked beside the config and in {SHIPPED_CONFIGS})"
        raise ConfigError(f"{where}: energy.table: no such energy table file {given_table!r}{searched}")
    from tpusim.energy.table import load_energy_table  # the table module reads YAML through this one

    load_energy_table(table).dram_pj_per_byte(config.weight_memory.technology)
    return config


class ReadRecorder:
    """A view of a config (and of its sections, which it wraps in turn) that notes the value of every
    setting read through it, by its path: what a stage's output was computed from, so that a config that
    :func:`agrees` with those reads gets the same output. With ``whole_sections`` a section read is noted
    whole and handed out as it is, for code that passes sections on (a coarser note, never a wrong one)."""

    __slots__ = ("_target", "_reads", "_path", "_whole")

    def __init__(self, target: Any, reads: dict[tuple[str, ...], Any], *, path: tuple[str, ...] = (),
                 whole_sections: bool = False):
        self._target, self._reads, self._path, self._whole = target, reads, path, whole_sections

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._target, name)
        path = (*self._path, name)
        if not self._whole and dataclasses.is_dataclass(value) and not isinstance(value, type):
            return ReadRecorder(value, self._reads, path=path)
        self._reads[path] = value
        return value


def agrees(config: Any, reads: dict[tuple[str, ...], Any]) -> bool:
    """Whether ``config`` has every value a :class:`ReadRecorder` noted."""
    for path, value in reads.items():
        setting = config
        for name in path:
            setting = getattr(setting, name)
        if setting != value:
            return False
    return True


_Result = TypeVar("_Result")


class RecordedResults:
    """Results computed from a config, each kept with what the computation read of the config (through a
    :class:`ReadRecorder`): a later request under an equal key whose config :func:`agrees` with those reads
    gets the kept result instead of a new computation. What was read is recorded as the computation runs,
    so no list of the settings it depends on can fall behind it. Holds the ``size`` results used last.
    One request at a time: a Dask worker runs a sweep's points on threads."""

    def __init__(self, size: int, *, whole_sections: bool = False):
        self.size, self.whole_sections = size, whole_sections
        self._entries: list[tuple[Any, dict[tuple[str, ...], Any], Any]] = []  # the latest first
        self._lock = threading.Lock()

    def get(self, key: Any, config: Any, compute: Callable[[Any], _Result]) -> _Result:
        """The result kept for ``key`` and a config that agrees with ``config``, else ``compute(view)`` of a
        recording view of ``config``, kept."""
        with self._lock:
            for i, (kept_key, reads, result) in enumerate(self._entries):
                if kept_key == key and agrees(config, reads):
                    self._entries.insert(0, self._entries.pop(i))
                    return result
            reads: dict[tuple[str, ...], Any] = {}
            result = compute(ReadRecorder(config, reads, whole_sections=self.whole_sections))
            self._entries.insert(0, (key, reads, result))
            del self._entries[self.size:]
            return result
