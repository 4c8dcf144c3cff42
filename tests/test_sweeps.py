"""Design-space sweeps: grid expansion, agreement with direct simulation, resume, Dask, the CLI."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

import tpusim
from tpusim.cli import main
from tpusim.errors import ConfigError, ModelError
from tpusim.sweeps import SweepError, build_points, expand_grid, parse_set, parse_values

TPU_V1 = str(Path(__file__).resolve().parents[1] / "configs" / "tpu_v1.yaml")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
from tpusim import sweeps as sweep_module


# ---------------------------------------------------------------------------------------------- grids

def test_cross_product_first_key_outermost():
    assert expand_grid({"a": [1, 2], "b": ["x", "y", "z"]}) == [
        {"a": 1, "b": "x"}, {"a": 1, "b": "y"}, {"a": 1, "b": "z"},
        {"a": 2, "b": "x"}, {"a": 2, "b": "y"}, {"a": 2, "b": "z"},
    ]


def test_zip_takes_values_position_by_position_and_holds_single_values():
    assert expand_grid({"a": [1, 2, 3], "b": [4, 5, 6], "c": ["k"]}, zip=True) == [
        {"a": 1, "b": 4, "c": "k"}, {"a": 2, "b": 5, "c": "k"}, {"a": 3, "b": 6, "c": "k"},
    ]


def test_empty_grid_is_one_point():
    assert expand_grid({}) == [{}]
    assert expand_grid({}, zip=True) == [{}]


def test_zip_of_unequal_lists_names_every_length():
    with pytest.raises(SweepError, match=r"--zip .*a: 3 values, b: 2 values"):
        expand_grid({"a": [1, 2, 3], "b": [4, 5]}, zip=True)


def test_a_key_without_values_is_an_error():
    with pytest.raises(SweepError, match="array.rows: no values"):
        expand_grid({"array.rows": []})


def test_set_values_are_read_as_yaml():
    assert parse_set("array.rows=32,64,128") == ("array.rows", [32, 64, 128])
    assert parse_set("quant.weights=per-tensor,per-channel") == ("quant.weights", ["per-tensor", "per-channel"])
    assert parse_set("input_preprocessing.mean=[0.5,0.5,0.5],[0,0,0]") == (
        "input_preprocessing.mean", [[0.5, 0.5, 0.5], [0, 0, 0]])
    assert parse_values("1,8") == [1, 8]
    with pytest.raises(ConfigError, match="KEY.PATH=VALUE"):
        parse_set("array.rows")
    with pytest.raises(ConfigError, match="comma-separated"):
        parse_set("array.rows=")


def test_models_and_batches_cross_the_zipped_settings():
    points = build_points(TPU_V1, ["tiny_cnn", "mlp"], {"array.rows": [32, 64], "array.cols": [32, 64]},
                          zip=True, batch=[1, 4])
    assert [(p.model, p.batch, dict(p.overrides)["array.rows"], dict(p.overrides)["array.cols"])
            for p in points] == [
        ("tiny_cnn", 1, 32, 32), ("tiny_cnn", 1, 64, 64), ("tiny_cnn", 4, 32, 32), ("tiny_cnn", 4, 64, 64),
        ("mlp", 1, 32, 32), ("mlp", 1, 64, 64), ("mlp", 4, 32, 32), ("mlp", 4, 64, 64),
    ]


def test_bad_points_fail_before_any_work():
    with pytest.raises(ConfigError, match="array.bogus"):
        build_points(TPU_V1, "tiny_cnn", {"array.bogus": [1, 2]})
    with pytest.raises(ConfigError, match=r"array.rows: must be >= 1, got 0"):
        build_points(TPU_V1, "tiny_cnn", {"array.rows": [64, 0]})
    with pytest.raises(SweepError, match="batch"):
        build_points(TPU_V1, "tiny_cnn", {}, batch=[1, 0])
    with pytest.raises(SweepError, match="pass it as the batch argument"):
        build_points(TPU_V1, "tiny_cnn", {"batch": [1, 2]})
    with pytest.raises(ModelError, match="no_such_model"):
        build_points(TPU_V1, "no_such_model", {})
    with pytest.raises(ModelError, match="missing.onnx: no such model file"):
        build_points(TPU_V1, "missing.onnx", {})


def test_point_keys_change_with_every_value_and_the_config_file(tmp_path):
    a, b = build_points(TPU_V1, "tiny_cnn", {"array.rows": [32, 64]})
    (c,) = build_points(TPU_V1, "tiny_cnn", {"array.rows": [32]}, batch=2)
    (d,) = build_points(TPU_V1, "tiny_cnn", {"array.rows": [32]}, quantize=True)
    (e,) = build_points(TPU_V1, "mlp", {"array.rows": [32]})
    assert len({p.key for p in (a, b, c, d, e)}) == 5
    assert a.key == build_points(TPU_V1, "tiny_cnn", {"array.rows": [32]})[0].key
    edited = tmp_path / "tpu_v1.yaml"
    edited.write_text(Path(TPU_V1).read_text().replace("static_power_w: 28", "static_power_w: 30"))
    (energy_table,) = (Path(TPU_V1).parent / "energy").glob("horowitz45.yaml")
    (tmp_path / "energy").mkdir()
    (tmp_path / "energy" / energy_table.name).write_text(energy_table.read_text())
    assert build_points(edited, "tiny_cnn", {"array.rows": [32]})[0].key != a.key


# ------------------------------------------------------------------------------------------ real runs

def test_sweep_rows_equal_direct_simulation(tmp_path):
    grid = {"array.rows": [64, 128], "array.cols": [64, 128]}
    rows = tpusim.sweep(TPU_V1, ["tiny_cnn", "mlp"], grid, zip=True, batch=[1, 4], out=tmp_path, jobs=2,
                        progress=False, plots=False)
    assert len(rows) == 8
    for row in rows:
        direct = tpusim.simulate(TPU_V1, row["model"], batch=row["batch"], quantize=False,
                                 overrides={"array.rows": row["array.rows"], "array.cols": row["array.cols"]})
        s = direct.summary
        assert row["latency_s"] == s["latency_s"]
        assert row["total_cycles"] == s["total_cycles"]
        assert row["tops"] == s["tops"]
        assert row["utilization"] == s["utilization"]
        assert row["macs"] == s["macs"]
        assert row["total_tops_per_w"] == s["energy"]["total_tops_per_w"]
        assert row["dynamic_tops_per_w"] == s["energy"]["dynamic_tops_per_w"]
        assert row["energy_per_inference_pj"] == s["energy"]["total_pj"] / row["batch"]
        for key in ("active_cycles", "weight_stall_cycles", "weight_shift_cycles", "non_matrix_cycles"):
            assert row[key] == s["breakdown"][key]
        assert row["energy_mac_pj"] == direct.evaluation.energy.dynamic.mac
    with open(tmp_path / "sweep.csv", newline="") as handle:
        table = list(csv.DictReader(handle))
    assert [(r["model"], int(r["batch"]), int(r["array.rows"])) for r in table] == [
        (r["model"], r["batch"], r["array.rows"]) for r in rows]
    assert [int(r["total_cycles"]) for r in table] == [r["total_cycles"] for r in rows]
    assert len(list((tmp_path / "points").glob("*.json"))) == 8


def _count_calls(monkeypatch) -> list:
    calls = []
    real = sweep_module.simulate_point

    def counting(config, point):
        calls.append(point.label())
        return real(config, point)

    monkeypatch.setattr(sweep_module, "simulate_point", counting)
    return calls


def test_resume_skips_finished_points_and_fresh_recomputes(tmp_path, monkeypatch):
    calls = _count_calls(monkeypatch)
    first = tpusim.sweep(TPU_V1, "tiny_cnn", {"array.rows": [32]}, out=tmp_path, jobs=1, progress=False)
    assert calls == ["model=tiny_cnn, batch=1, array.rows=32"]

    calls.clear()
    full = tpusim.sweep(TPU_V1, "tiny_cnn", {"array.rows": [32, 64]}, out=tmp_path, jobs=1, progress=False)
    assert calls == ["model=tiny_cnn, batch=1, array.rows=64"]
    assert full[0] == first[0]

    calls.clear()
    again = tpusim.sweep(TPU_V1, "tiny_cnn", {"array.rows": [32, 64]}, out=tmp_path, jobs=1, progress=False)
    assert calls == [] and again == full

    calls.clear()
    fresh = tpusim.sweep(TPU_V1, "tiny_cnn", {"array.rows": [32, 64]}, out=tmp_path, jobs=1, progress=False,
                         fresh=True)
    assert len(calls) == 2 and fresh == full
    assert (tmp_path / "sweep_array_rows.png").read_bytes().startswith(PNG_MAGIC)


def test_a_damaged_point_file_is_recomputed(tmp_path, monkeypatch):
    calls = _count_calls(monkeypatch)
    rows = tpusim.sweep(TPU_V1, "tiny_cnn", {"array.rows": [32]}, out=tmp_path, jobs=1, progress=False, plots=False)
    (point_file,) = (tmp_path / "points").glob("*.json")
    point_file.write_text('{"record": ')
    calls.clear()
    assert tpusim.sweep(TPU_V1, "tiny_cnn", {"array.rows": [32]}, out=tmp_path, jobs=1, progress=False,
                        plots=False) == rows
    assert len(calls) == 1
    assert json.loads(point_file.read_text())["record"] == rows[0]


def test_a_failing_point_names_itself_and_keeps_the_finished_ones(tmp_path, monkeypatch):
    real = sweep_module.simulate_point

    def failing(config, point):
        if dict(point.overrides)["array.rows"] == 64:
            raise ZeroDivisionError("boom")
        return real(config, point)

    monkeypatch.setattr(sweep_module, "simulate_point", failing)
    with pytest.raises(RuntimeError, match=r"array.rows=64 failed: ZeroDivisionError"):
        tpusim.sweep(TPU_V1, "tiny_cnn", {"array.rows": [32, 64]}, out=tmp_path, jobs=1, progress=False)
    assert len(list((tmp_path / "points").glob("*.json"))) == 1
    assert not (tmp_path / "sweep.csv").exists()


def test_dask_cluster_gives_the_local_result(tmp_path):
    distributed = pytest.importorskip("distributed")
    grid = {"array.rows": [32, 64]}
    local = tpusim.sweep(TPU_V1, "tiny_cnn", grid, batch=[1, 2], jobs=1, progress=False)
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster:
        remote = tpusim.sweep(TPU_V1, "tiny_cnn", grid, batch=[1, 2], out=tmp_path, executor="dask",
                              scheduler=cluster.scheduler_address, progress=False, plots=False)
    assert remote == local
    assert len(list((tmp_path / "points").glob("*.json"))) == 4


def test_api_option_errors():
    with pytest.raises(SweepError, match="executor"):
        tpusim.sweep(TPU_V1, "tiny_cnn", {}, executor="slurm")
    with pytest.raises(SweepError, match="scheduler"):
        tpusim.sweep(TPU_V1, "tiny_cnn", {}, scheduler="tcp://127.0.0.1:1")
    with pytest.raises(SweepError, match="jobs"):
        tpusim.sweep(TPU_V1, "tiny_cnn", {}, jobs=0)


# ------------------------------------------------------------------------------------------------ CLI

def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_sweep_writes_table_points_and_plots(tmp_path, capsys):
    out = tmp_path / "out"
    code, stdout, _ = _run(capsys, "sweep", TPU_V1, "--model", "tiny_cnn", "--set", "array.rows=32,64",
                           "--set", "array.cols=32,64", "--zip", "--batch", "1,2", "--out", out, "--jobs", 1)
    assert code == 0
    with open(out / "sweep.csv", newline="") as handle:
        table = list(csv.DictReader(handle))
    assert [(r["batch"], r["array.rows"], r["array.cols"]) for r in table] == [
        ("1", "32", "32"), ("1", "64", "64"), ("2", "32", "32"), ("2", "64", "64")]
    assert sorted(p.name for p in out.glob("*.png")) == ["sweep_array_rows.png", "sweep_batch.png"]
    assert f"wrote {out / 'sweep.csv'}" in stdout


@pytest.mark.parametrize("argv, message", [
    (["--set", "array.bogus=1,2"], "array.bogus"),
    (["--set", "array.rows"], "KEY.PATH=VALUE"),
    (["--set", "array.rows=0,64"], "array.rows: must be >= 1"),
    (["--set", "array.rows=32,64", "--set", "array.cols=32", "--set", "weight_fifo.depth_tiles=1,2,3", "--zip"],
     "--zip needs value lists of equal length"),
    (["--set", "array.rows=32", "--set", "array.rows=64"], "given twice"),
    (["--batch", "0"], "batch"),
    (["--scheduler", "tcp://127.0.0.1:1"], "executor 'dask'"),
])
def test_cli_sweep_user_errors_exit_2_with_one_line(tmp_path, capsys, argv, message):
    code, _, stderr = _run(capsys, "sweep", TPU_V1, "--model", "tiny_cnn", "--out", tmp_path, *argv)
    assert code == 2
    assert message in stderr
    assert stderr.count("\n") == 1
    assert not (tmp_path / "points").exists()


def test_point_keys_change_with_the_energy_table_and_the_calibration_data(tmp_path):
    """A resumed sweep must not reuse points priced with another energy table or calibrated on other data."""
    config = tmp_path / "tpu_v1.yaml"
    config.write_text(Path(TPU_V1).read_text())
    (tmp_path / "energy").mkdir()
    table = tmp_path / "energy" / "horowitz45.yaml"
    table.write_text((Path(TPU_V1).parent / "energy" / "horowitz45.yaml").read_text())
    (before,) = build_points(config, "tiny_cnn", {"array.rows": [32]})
    table.write_text(table.read_text() + "\n# edited\n")
    (after,) = build_points(config, "tiny_cnn", {"array.rows": [32]})
    assert before.key != after.key
    data = tmp_path / "calib.npy"
    np.save(data, np.zeros((2, 3, 32, 32), np.float32))
    (first,) = build_points(config, "tiny_cnn", {"array.rows": [32]}, quantize=True, calib_data=data)
    np.save(data, np.ones((2, 3, 32, 32), np.float32))
    (second,) = build_points(config, "tiny_cnn", {"array.rows": [32]}, quantize=True, calib_data=data)
    assert first.key != second.key and first.calib_data == str(data)


def test_cli_sweep_takes_input_shape_weights_and_calibration_data(tmp_path, capsys):
    data = tmp_path / "calib.npy"
    np.save(data, np.random.default_rng(0).standard_normal((6, 3, 32, 32)).astype(np.float32))
    code = main(["sweep", TPU_V1, "--model", "tiny_cnn", "--set", "array.rows=64,128", "--input-shape", "2,3,32,32",
                 "--weights", "per-tensor", "--quantize", "--calib-data", str(data), "--jobs", "1",
                 "--out", str(tmp_path / "sw")])
    assert code == 0
    rows = list(csv.DictReader(open(tmp_path / "sw" / "sweep.csv")))
    assert [r["batch"] for r in rows] == ["2", "2"] and {r["quant.weights"] for r in rows} == {"per-tensor"}
    # The six given samples calibrated (fewer than quant.calibration_samples), so fidelity is on them: not synthetic.
    assert all(r["evaluated_on"] == "the first 4 calibration samples" and r["held_out"] == "False" for r in rows)
