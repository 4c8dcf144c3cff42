import copy
import math
from pathlib import Path

import numpy as np
import pytest
import yaml

from tpusim.config import load_config
from tpusim.energy.table import ARITHMETIC_OPS, load_energy_table
from tpusim.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "configs" / "energy" / "horowitz45.yaml"


@pytest.fixture(scope="module")
def table():
    return load_energy_table(SHIPPED)


@pytest.fixture(scope="module")
def shipped_data():
    return yaml.safe_load(SHIPPED.read_text())


def write_table(tmp_path: Path, data) -> Path:
    path = tmp_path / "table.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_tpu_v1_config_names_the_shipped_table():
    cfg = load_config(REPO / "configs" / "tpu_v1.yaml")
    assert Path(cfg.energy.table) == SHIPPED
    assert load_energy_table(cfg.energy.table).name == "horowitz45"


@pytest.mark.parametrize(
    "op, pj",
    [
        ("int8_add", 0.03), ("int32_add", 0.1), ("int8_mul", 0.2), ("int32_mul", 3.1),
        ("fp16_add", 0.4), ("fp16_mul", 1.1), ("fp32_add", 0.9), ("fp32_mul", 3.7),
    ],
)  # fmt: skip
def test_arithmetic_is_horowitz(table, op, pj):
    assert table.op_pj(op) == pj


def test_every_number_has_a_source_and_assumptions_are_marked(table):
    sources = dict(table.sources)
    assert set(sources) >= {f"arithmetic.{op}" for op in ARITHMETIC_OPS}
    assert {"sram.anchors[0]", "sram.anchors[2]", "dram.DDR3", "dram.HBM2", "register", "idle_pe"} <= set(sources)
    for key in ("host_link", "idle_pe", "arithmetic.int32_shift", "sram.extrapolation_exponent", "dram.GDDR5"):
        assert sources[key].startswith("assumption"), key
    assert "3.97" in sources["dram.HBM2"] and "O'Connor" in sources["dram.HBM2"]


@pytest.mark.parametrize("capacity, pj_per_64bit", [(8192, 10.0), (32768, 20.0), (1048576, 100.0)])
def test_sram_rule_reproduces_horowitz_anchors_exactly(table, capacity, pj_per_64bit):
    assert table.sram_pj_per_byte(capacity) * 8 == pj_per_64bit
    assert table.sram_pj_per_byte(capacity, "write") * 8 == pj_per_64bit  # write = read


def test_sram_rule_between_and_beyond_anchors(table):
    # 8 KB -> 32 KB is a sqrt law; 32 KB -> 1 MB has slope log 5 / log 32.
    assert table.sram_pj_per_byte(16384) * 8 == pytest.approx(10 * math.sqrt(2), rel=1e-12)
    assert table.sram_pj_per_byte(131072) * 8 == pytest.approx(20 * 4 ** (math.log(5) / math.log(32)), rel=1e-12)
    # Beyond 1 MB and below 8 KB: the stated exponent 0.5.
    assert table.sram_pj_per_byte(4 * 2**20) * 8 == 200.0
    assert table.sram_pj_per_byte(24 * 2**20) * 8 == pytest.approx(100 * math.sqrt(24), rel=1e-12)
    assert table.sram_pj_per_byte(2048) * 8 == 5.0


def test_sram_rule_is_monotonic_and_continuous(table):
    capacities = np.unique(np.geomspace(64, 2**32, 2000).astype(np.int64))
    energies = np.array([table.sram_pj_per_byte(int(c)) for c in capacities])
    assert np.all(np.diff(energies) > 0)
    for anchor in table.sram_anchors:
        c = anchor.capacity_bytes
        assert table.sram_pj_per_byte(c - 1) == pytest.approx(anchor.pj_per_byte, rel=1e-4)
        assert table.sram_pj_per_byte(c + 1) == pytest.approx(anchor.pj_per_byte, rel=1e-4)


def test_sram_write_ratio_is_applied(tmp_path, shipped_data):
    data = copy.deepcopy(shipped_data)
    data["sram"]["write_to_read_ratio"]["value"] = 1.5
    table = load_energy_table(write_table(tmp_path, data))
    assert table.sram_pj_per_byte(8192, "write") == 1.25 * 1.5


def test_mac_energy_int8_vs_fp32(table):
    assert table.mac_pj("int8") == 0.2 + 0.1
    assert table.mac_pj("fp32") == 3.7 + 0.9
    assert table.mac_pj("fp32") / table.mac_pj("int8") == pytest.approx(4.6 / 0.3, rel=1e-12)


def test_activation_unit_recipes(table):
    assert table.requant_pj == 3.1 + 0.1 + 0.2 + 2 * 0.1  # multiply, round add, shift, 2-sided clamp
    assert table.nonlinearity_pj == 0.03
    assert table.pool_pj == 0.1


def test_dram_per_byte_by_technology(table):
    assert table.dram_pj_per_byte("DDR3") == 1300 / 64 * 8
    assert table.dram_pj_per_byte("GDDR5") == 14.0 * 8
    assert table.dram_pj_per_byte("HBM2") == 3.97 * 8
    with pytest.raises(ConfigError, match=r"horowitz45\.yaml: dram\.LPDDR4: missing .*DDR3, GDDR5, HBM2"):
        table.dram_pj_per_byte("LPDDR4")


def _drop(data, path):
    *parents, last = path
    for key in parents:
        data = data[key]
    del data[last]


def _set(data, path, value):
    *parents, last = path
    for key in parents:
        data = data[key]
    data[last] = value


BAD_TABLES = [
    (_drop, ("arithmetic", "int8_mul"), None, "arithmetic.int8_mul: missing key"),
    (_drop, ("idle_pe",), None, "idle_pe: missing key"),
    (_drop, ("dram", "HBM2", "source"), None, "dram.HBM2.source: missing key"),
    (_set, ("arithmetic", "int32_add", "pj"), -0.1, "arithmetic.int32_add.pj: must be a finite number > 0, got -0.1"),
    (_set, ("register", "pj_per_bit"), 0, "register.pj_per_bit: must be a finite number > 0, got 0"),
    (_set, ("host_link", "pj_per_bit"), "ten", "host_link.pj_per_bit: expected a number, got 'ten'"),
    (_set, ("idle_pe", "pj_per_cycle"), True, "idle_pe.pj_per_cycle: expected a number, got True"),
    (_set, ("sram", "extrapolation_exponent", "value"), float("nan"), "sram.extrapolation_exponent.value: must be"),
    (_set, ("arithmetic", "int4_add"), {"pj": 0.01, "source": "x"}, "arithmetic.int4_add: unknown key"),
    (_set, ("dram", "DDR3", "pj"), 20.0, "dram.DDR3.pj: unknown key"),
    (_set, ("vendor",), "acme", "vendor: unknown key"),
    (_set, ("register", "source"), "", "register.source: expected a non-empty string"),
    (_set, ("dram",), {}, "dram: expected at least one memory technology"),
    (_set, ("sram", "anchors"), [], "sram.anchors: expected a non-empty list"),
    (_set, ("sram", "anchors", 1, "capacity_bytes"), 4096, "anchors[1].capacity_bytes: anchors must be in increasing"),
    (_set, ("sram", "anchors", 2, "pj_per_64bit_read"), 15, "sram.anchors[2].pj_per_64bit_read: must be >="),
    (_set, ("sram", "anchors", 0, "capacity_bytes"), 8192.5, "anchors[0].capacity_bytes: expected a positive"),
    (_set, ("arithmetic",), [1, 2], "arithmetic: expected a mapping, got list"),
]  # fmt: skip


@pytest.mark.parametrize("edit, key_path, value, message", BAD_TABLES)
def test_bad_table_is_one_line_naming_file_and_key(tmp_path, shipped_data, edit, key_path, value, message):
    data = copy.deepcopy(shipped_data)
    if edit is _drop:
        _drop(data, key_path)
    else:
        _set(data, key_path, value)
    path = write_table(tmp_path, data)
    with pytest.raises(ConfigError) as err:
        load_energy_table(path)
    text = str(err.value)
    assert "\n" not in text
    assert text.startswith(f"{path}: ")
    assert message in text


def test_duplicate_key_is_refused(tmp_path):
    text = SHIPPED.read_text()
    line = "  int8_add:   {pj: 0.03, source: \"[H14] 8-bit int add\"}\n"
    assert line in text
    path = tmp_path / "dup.yaml"
    path.write_text(text.replace(line, line + "  int8_add: {pj: 0.05, source: typo}\n"))
    line_no = text.splitlines().index(line.rstrip("\n")) + 2
    with pytest.raises(ConfigError, match=rf"^{path}: line {line_no}: duplicate key 'int8_add'$"):
        load_energy_table(path)


def test_unreadable_tables(tmp_path):
    with pytest.raises(ConfigError, match="no such energy table file"):
        load_energy_table(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("arithmetic: [1, 2\n")
    with pytest.raises(ConfigError, match=rf"^{bad}: line \d+: invalid YAML"):
        load_energy_table(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(ConfigError, match=rf"^{scalar}: top level: expected a mapping"):
        load_energy_table(scalar)


def test_a_table_is_parsed_once_per_content_and_afresh_once_edited(tmp_path, shipped_data, monkeypatch):
    import tpusim.energy.table as table_module

    parses = []
    real_parse = table_module.parse_yaml
    monkeypatch.setattr(table_module, "parse_yaml", lambda *args: parses.append(args[1]) or real_parse(*args))
    path = write_table(tmp_path, shipped_data)
    first = load_energy_table(path)
    assert load_energy_table(str(path)) is first and len(parses) == 1
    edited = copy.deepcopy(shipped_data)
    edited["sram"]["write_to_read_ratio"]["value"] = 1.5
    write_table(tmp_path, edited)
    assert load_energy_table(path).sram_write_to_read_ratio == 1.5 and len(parses) == 2
    write_table(tmp_path, shipped_data)  # the first bytes again: their table, not a parse
    assert load_energy_table(path) is first and len(parses) == 2
    path.write_text("arithmetic: [1, 2\n")  # a broken file is refused however often it is read
    for _ in range(2):
        with pytest.raises(ConfigError, match=rf"^{path}: line \d+: invalid YAML"):
            load_energy_table(path)
