"""The config loader: the shipped configs load; every class of bad input is one ConfigError line."""
from __future__ import annotations

import weakref
from pathlib import Path

import pytest
import yaml

from tpusim.config import HardwareConfig, ReadRecorder, RecordedResults, agrees, load_config, parse_override
from tpusim.errors import ConfigError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TPU_V1 = CONFIGS / "tpu_v1.yaml"


def _write_variant(tmp_path, edit) -> Path:
    data = yaml.safe_load(TPU_V1.read_text())
    edit(data)
    data["energy"]["table"] = str(CONFIGS / "energy" / "horowitz45.yaml")
    path = tmp_path / "variant.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_tpu_v1_values():
    cfg = load_config(TPU_V1)
    assert isinstance(cfg, HardwareConfig)
    assert (cfg.array.rows, cfg.array.cols, cfg.array.clock_mhz) == (256, 256, 700.0)
    assert cfg.tile_bytes == 65536
    assert cfg.weight_memory.bandwidth_gb_s == 34.0
    assert cfg.unified_buffer.capacity_bytes == 24 * 2**20
    assert cfg.accumulators.entries * cfg.array.cols * cfg.accumulators.bits // 8 == 4 * 2**20
    assert cfg.weight_fifo.depth_tiles == 4
    assert all(load_config(p).array.weight_double_buffering for p in sorted(CONFIGS.glob("*.yaml")))
    assert Path(cfg.energy.table).is_absolute() and Path(cfg.energy.table).name == "horowitz45.yaml"


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    load_config(path)


def test_every_key_of_the_shipped_config_has_a_comment():
    for number, line in enumerate(TPU_V1.read_text().splitlines(), start=1):
        stripped = line.strip()
        if stripped and not stripped.startswith("#") and ":" in stripped and not stripped.endswith(":"):
            assert "#" in line, f"line {number} has no comment: {line!r}"


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["array"].update(colums=3), r"array\.colums: unknown key"),
    (lambda d: d["array"].pop("rows"), r"array\.rows: missing key"),
    (lambda d: d["array"].update(rows="many"), r"array\.rows: expected an integer"),
    (lambda d: d["array"].update(rows=2.5), r"array\.rows: expected an integer"),
    (lambda d: d["array"].update(rows=0), r"array\.rows: must be >= 1"),
    (lambda d: d["array"].update(clock_mhz=0), r"array\.clock_mhz: must be > 0"),
    (lambda d: d["accumulators"].update(entries=1), r"accumulators\.entries: must be >= 2"),
    (lambda d: d["weight_memory"].update(requests_in_flight=0), r"weight_memory\.requests_in_flight: must be >= 1"),
    (lambda d: d["weight_memory"].pop("requests_in_flight"), r"weight_memory\.requests_in_flight: missing key"),
    (lambda d: d["array"].update(datatype="int4"), r"array\.datatype: expected one of 'int8', 'fp32'"),
    (lambda d: d["quant"].update(weights="per-row"), r"quant\.weights: expected one of"),
    (lambda d: d["quant"].update(percentile=101), r"quant\.percentile: must be <= 100"),
    (lambda d: d["accumulators"].update(double_buffered=1), r"accumulators\.double_buffered: expected true or false"),
    (lambda d: d["array"].update(weight_double_buffering="yes"),
     r"array\.weight_double_buffering: expected true or false"),
    (lambda d: d["array"].pop("weight_double_buffering"), r"array\.weight_double_buffering: missing key"),
    (lambda d: d["activation_unit"].update(scale_path_bytes_per_cycle=0),
     r"activation_unit\.scale_path_bytes_per_cycle: must be > 0"),
    (lambda d: d["unified_buffer"].update(read_ports=0), r"unified_buffer\.read_ports: must be >= 1"),
    (lambda d: d["unified_buffer"].update(write_ports=1.5), r"unified_buffer\.write_ports: expected an integer"),
    (lambda d: d["unified_buffer"].update(port_bytes_per_cycle=0),
     r"unified_buffer\.port_bytes_per_cycle: must be > 0"),
    (lambda d: d["unified_buffer"].pop("write_ports"), r"unified_buffer\.write_ports: missing key"),
    (lambda d: d["activation_unit"].update(scale_path_bytes_per_cycle=float("inf")),
     r"activation_unit\.scale_path_bytes_per_cycle: expected a finite number, got inf"),
    (lambda d: d["weight_memory"].update(bandwidth_gb_s=float("nan")),
     r"weight_memory\.bandwidth_gb_s: expected a finite number, got nan"),
    (lambda d: d["input_preprocessing"].update(mean=[0.0, float("-inf"), 0.0]),
     r"input_preprocessing\.mean\[1\]: expected a finite number"),
    (lambda d: d.update(host=5), r"host: expected a mapping"),
    (lambda d: d.update(extra={}), r"extra: unknown key"),
])
def test_bad_values_name_file_and_key(tmp_path, edit, message):
    path = _write_variant(tmp_path, edit)
    with pytest.raises(ConfigError, match=message) as info:
        load_config(path)
    assert str(info.value).startswith(str(path)) and "\n" not in str(info.value)


def test_duplicate_keys_are_an_error(tmp_path):
    text = TPU_V1.read_text().replace("  rows: 256", "  rows: 256\n  rows: 128", 1)
    path = tmp_path / "dup.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=r"dup\.yaml: line \d+: duplicate key 'rows'"):
        load_config(path)


def test_invalid_yaml_and_missing_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("array: [1, 2\n")
    with pytest.raises(ConfigError, match="broken.yaml: line .*invalid YAML"):
        load_config(path)
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "absent.yaml")
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping at the top level"):
        load_config(path)


def test_overrides_apply_and_are_validated():
    cfg = load_config(TPU_V1, {"array.rows": 128, "quant.weights": "per-tensor"})
    assert cfg.array.rows == 128 and cfg.quant.weights == "per-tensor"
    assert cfg.tile_bytes == 128 * 256
    with pytest.raises(ConfigError, match=r"--set array\.rowz\): array\.rowz: unknown key"):
        load_config(TPU_V1, {"array.rowz": 1})
    with pytest.raises(ConfigError, match=r"array\.rows: must be >= 1"):
        load_config(TPU_V1, {"array.rows": -4})
    with pytest.raises(ConfigError, match="no such section"):
        load_config(TPU_V1, {"nosection.rows": 1})


def test_parse_override_reads_yaml_values():
    assert parse_override("array.rows=128") == ("array.rows", 128)
    assert parse_override("mapping.pack_groups=false") == ("mapping.pack_groups", False)
    assert parse_override("quant.weights=per-tensor") == ("quant.weights", "per-tensor")
    with pytest.raises(ConfigError, match="KEY.PATH=VALUE"):
        parse_override("array.rows")


def test_effective_config_round_trips(tmp_path):
    cfg = load_config(TPU_V1, {"array.cols": 64})
    path = tmp_path / "effective.yaml"
    path.write_text(cfg.to_yaml())
    assert load_config(path) == cfg
    assert cfg.replace(**{"array.rows": 32}).array.rows == 32


@pytest.mark.parametrize("variant", ["tpu_v1_gddr5.yaml", "tpu_v1_hbm.yaml"])
def test_memory_variants_are_tpu_v1_but_for_the_weight_memory(variant):
    base, other = load_config(TPU_V1).to_dict(), load_config(CONFIGS / variant).to_dict()
    assert {key for key in base if base[key] != other[key]} == {"name", "weight_memory"}


def test_hbm_config_states_its_memory():
    memory = load_config(CONFIGS / "tpu_v1_hbm.yaml").weight_memory
    assert (memory.technology, memory.capacity_bytes, memory.bandwidth_gb_s, memory.latency_cycles,
            memory.requests_in_flight) == ("HBM2", 32 * 2**30, 900.0, 70, 8)
    assert load_config(TPU_V1).weight_memory.requests_in_flight == 1


def test_unified_buffer_ports_are_tpu_v1s_paths():
    # one 256-byte path out to the MXU and one back from the activation unit: 167 GiB/s each at 700 MHz
    for path in sorted(CONFIGS.glob("tpu_v1*.yaml")):
        ub = load_config(path).unified_buffer
        assert (ub.read_ports, ub.write_ports) == (1, 1)
    ub = load_config(TPU_V1).unified_buffer
    assert ub.port_bytes_per_cycle == 256.0
    assert round(ub.port_bytes_per_cycle * load_config(TPU_V1).array.clock_hz / 2**30) == 167
    # the hypothetical FP32 chip's 4-byte elements: four times the bytes for one vector per cycle
    assert load_config(CONFIGS / "tpu_v1_fp32.yaml").unified_buffer.port_bytes_per_cycle == 4 * 256.0


def test_numbers_with_an_exponent_are_numbers_in_a_file_and_on_the_command_line(tmp_path):
    # PyYAML (YAML 1.1) reads 1e9 and 3.4e1 as strings; a whole number of bytes may be written as 8e9
    text = TPU_V1.read_text()
    text = text.replace("bandwidth_gb_s: 34  #", "bandwidth_gb_s: 3.4e1  #", 1)
    text = text.replace("capacity_bytes: 8589934592   #", "capacity_bytes: 8e9   #", 1)
    path = tmp_path / "exponents.yaml"
    path.write_text(text)
    config = load_config(path)
    assert config.weight_memory.bandwidth_gb_s == 34.0
    assert config.weight_memory.capacity_bytes == 8_000_000_000 and type(config.weight_memory.capacity_bytes) is int
    assert parse_override("weight_memory.bandwidth_gb_s=1e2") == ("weight_memory.bandwidth_gb_s", 100.0)
    assert parse_override("array.rows=128") == ("array.rows", 128)
    assert parse_override("weight_memory.technology=HBM2") == ("weight_memory.technology", "HBM2")
    assert load_config(TPU_V1, {"weight_memory.capacity_bytes": parse_override("x=4e9")[1]}).weight_memory.capacity_bytes \
        == 4_000_000_000
    with pytest.raises(ConfigError, match=r"array\.rows: expected an integer, got 0\.25"):
        load_config(TPU_V1, {"array.rows": parse_override("array.rows=2.5e-1")[1]})


def test_recorded_results_are_kept_by_key_and_by_what_their_computation_read():
    base = load_config(TPU_V1)
    cache, computed = RecordedResults(2), []

    def rows_and_cols(config):
        computed.append(config)
        return config.array.rows * config.array.cols

    assert cache.get("a", base, rows_and_cols) == 256 * 256
    assert cache.get("a", base.replace(**{"array.clock_mhz": 940.0}), rows_and_cols) == 256 * 256  # not read
    assert len(computed) == 1 and isinstance(computed[0], ReadRecorder)
    assert cache.get("b", base, rows_and_cols) == 256 * 256 and len(computed) == 2  # another key
    assert cache.get("a", base.replace(**{"array.rows": 128}), rows_and_cols) == 128 * 256  # read: computed
    assert len(computed) == 3
    assert cache.get("a", base, rows_and_cols) == 256 * 256 and len(computed) == 4  # pushed out (size 2)


def test_recorded_results_note_whole_sections_where_asked():
    base, reads = load_config(TPU_V1), {}
    assert ReadRecorder(base, reads, whole_sections=True).array is base.array
    assert reads == {("array",): base.array}
    assert agrees(base.replace(**{"energy.static_power_w": 0.0}), reads)
    assert not agrees(base.replace(**{"array.clock_mhz": 940.0}), reads)  # in the section, though not read
    fine = {}
    assert ReadRecorder(base, fine).array.rows == 256 and fine == {("array", "rows"): 256}


def test_a_dead_weak_reference_never_matches_a_kept_result():
    class Owner:
        pass

    owner, cache = Owner(), RecordedResults(2)
    cache.get(weakref.ref(owner), load_config(TPU_V1), lambda config: "first owner's")
    assert cache.get(weakref.ref(owner), load_config(TPU_V1), lambda config: "computed") == "first owner's"
    del owner
    assert cache.get(weakref.ref(Owner()), load_config(TPU_V1), lambda config: "computed") == "computed"
