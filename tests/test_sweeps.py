"""Design-space sweeps: grid expansion, agreement with direct simulation, resume, Dask, the CLI."""
from __future__ import annotations

import csv
import inspect
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import tpusim
from tpusim.cli import main
from tpusim.errors import ConfigError, ModelError
from tpusim.sweeps import SweepError, build_points, expand_grid, parse_set, parse_values

REPO = Path(__file__).resolve().parents[1]
TPU_V1 = str(REPO / "configs" / "tpu_v1.yaml")
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
    assert parse_set("weight_memory.bandwidth_gb_s=1e1,3.4e1") == ("weight_memory.bandwidth_gb_s", [10.0, 34.0])
    with pytest.raises(ConfigError, match="KEY.PATH=VALUE"):
        parse_set("array.rows")
    with pytest.raises(ConfigError, match=r"^--set array\.rows: '': expected comma-separated"):
        parse_set("array.rows=")
    with pytest.raises(ConfigError, match=r"^--set array\.rows: '\[1': cannot read"):
        parse_set("array.rows=[1")


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

def test_points_that_reuse_a_compiled_program_equal_direct_simulation(tmp_path):
    # bandwidths vary fastest: a worker compiles each array shape once and simulates the other points on it
    grid = {"array.rows": [64, 128], "weight_memory.bandwidth_gb_s": [17.0, 34.0, 400.0],
            "host.bandwidth_gb_s": [2.0, 14.0]}
    rows = tpusim.sweep(TPU_V1, "tiny_cnn", grid, batch=[1, 4], jobs=1, progress=False, plots=False)
    assert len(rows) == 24 and len({r["total_cycles"] for r in rows}) > 4
    for row in rows:
        overrides = {key: row[key] for key in grid}
        direct = tpusim.simulate(TPU_V1, "tiny_cnn", batch=row["batch"], quantize=False, overrides=overrides).summary
        breakdown = direct["breakdown"]
        assert (row["total_cycles"], row["weight_stall_cycles"], row["non_matrix_cycles"]) == (
            direct["total_cycles"], breakdown["weight_stall_cycles"], breakdown["non_matrix_cycles"])
        assert row["energy_per_inference_pj"] == direct["energy"]["total_pj"] / row["batch"]


def test_a_quantized_sweep_quantizes_once_per_quantization_and_equals_direct_simulation(monkeypatch):
    from tpusim import pipeline

    quantized = []
    real = pipeline.quantize
    monkeypatch.setattr(pipeline, "quantize", lambda *args: quantized.append(args[0].quant.weights) or real(*args))
    sweep_module._clear_caches()
    grid = {"quant.weights": ["per-channel", "per-tensor"], "array.rows": [32, 64],
            "weight_memory.bandwidth_gb_s": [17.0, 400.0]}
    rows = tpusim.sweep(TPU_V1, "tiny_cnn", grid, batch=[1, 2], quantize=True, jobs=1, progress=False, plots=False)
    # array rows, bandwidths and batch sizes share a quantization (batch 2's points find both kept from batch
    # 1's); the weight granularity does not
    assert len(rows) == 16 and quantized == ["per-channel", "per-tensor"]
    monkeypatch.setattr(pipeline, "quantize", real)
    for row in rows[::3]:
        direct = tpusim.simulate(TPU_V1, "tiny_cnn", batch=row["batch"], quantize=True,
                                 overrides={key: row[key] for key in grid}).summary
        assert row["total_cycles"] == direct["total_cycles"]
        assert row["top1_agreement"] == direct["fidelity"]["top1_agreement"]
        assert row["output_sqnr_db"] == direct["fidelity"]["output_sqnr_db"]
        assert row["energy_per_inference_pj"] == direct["energy"]["total_pj"] / row["batch"]


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


def _direct_record(point, config=TPU_V1):
    direct = tpusim.simulate(config, point.model, batch=point.batch, overrides=dict(point.overrides), quantize=False)
    return sweep_module.point_record(point, direct.summary, direct.evaluation.energy)


def test_points_run_one_after_another_in_a_process_equal_direct_simulation():
    """A worker keeps the config, the lowered model and the energy table between points and makes no
    per-tensor twin run; every record is still what a direct ``tpusim.simulate`` reports, key for key."""
    grid = {"array.rows": [64, 256], "weight_memory.bandwidth_gb_s": [17, 34],
            "quant.weights": ["per-tensor", "per-channel"]}
    points = build_points(TPU_V1, ["tiny_cnn", "mlp"], grid, zip=True, batch=[1, 3])
    sweep_module._clear_caches()
    try:
        for point in points:
            assert sweep_module.simulate_point(TPU_V1, point) == _direct_record(point), point.label()
        assert sweep_module._lowered.cache_info().misses == 4  # once per model and batch
    finally:
        sweep_module._clear_caches()


def test_resnet50_points_equal_direct_simulation_exactly():
    points = build_points(TPU_V1, "resnet50", {"array.rows": [128, 256], "weight_memory.bandwidth_gb_s": [17, 68]},
                          zip=True, batch=2)
    sweep_module._clear_caches()
    try:
        for point in points:
            record, direct = sweep_module.simulate_point(TPU_V1, point), _direct_record(point)
            assert (record["total_cycles"], record["total_pj"]) == (direct["total_cycles"], direct["total_pj"])
            assert record == direct
    finally:
        sweep_module._clear_caches()


def test_a_sweep_row_equals_the_summary_of_tpusim_run(tmp_path, capsys):
    (row,) = tpusim.sweep(TPU_V1, "tiny_cnn", {"array.rows": [64], "weight_memory.bandwidth_gb_s": [17]}, batch=2,
                          jobs=1, progress=False)
    assert main(["run", TPU_V1, "--model", "tiny_cnn", "--batch", "2", "--no-quantize", "--set", "array.rows=64",
                 "--set", "weight_memory.bandwidth_gb_s=17", "--out", str(tmp_path), "--no-progress"]) == 0
    capsys.readouterr()
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert (row["total_cycles"], row["latency_s"], row["utilization"]) == (
        summary["total_cycles"], summary["latency_s"], summary["utilization"])
    assert {key: row[key] for key in sweep_module.ENERGY_KEYS} == {key: summary["energy"][key]
                                                                   for key in sweep_module.ENERGY_KEYS}
    assert {key: row[key] for key in sweep_module.BREAKDOWN_KEYS} == {key: summary["breakdown"][key]
                                                                      for key in sweep_module.BREAKDOWN_KEYS}


@pytest.mark.parametrize("overrides", [
    {"array.rows": 128, "input_preprocessing.mean": [0.5, 0.5, 0.5]},
    {"array.datatype": "fp32", "energy.static_power_w": 10},
    {"weight_memory.technology": "DDR3", "weight_memory.bandwidth_gb_s": 100},
    {"energy.table": "energy/horowitz45.yaml"},  # relative: resolved against the config's folder
])
def test_a_point_config_is_what_load_config_builds(overrides):
    from tpusim.config import load_config

    (point,) = build_points(TPU_V1, "tiny_cnn", {key: [value] for key, value in overrides.items()})
    assert sweep_module._point_config(TPU_V1, point) == load_config(TPU_V1, overrides)


def test_a_process_reads_an_edited_config_or_model_file_again(tmp_path):
    """Worker caches are keyed on file contents (a Dask worker outlives a sweep)."""
    from tpusim import workloads

    config, model = tmp_path / "chip.yaml", tmp_path / "net.onnx"
    config.write_text(Path(TPU_V1).read_text())
    model.write_bytes(workloads.workload_file("tiny_cnn").read_bytes())
    sweep_module._clear_caches()
    try:
        (first,) = build_points(config, str(model), {})
        before = sweep_module.simulate_point(str(config), first)
        config.write_text(Path(TPU_V1).read_text().replace("static_power_w: 28", "static_power_w: 30"))
        model.write_bytes(workloads.workload_file("mlp").read_bytes())
        (second,) = build_points(config, str(model), {})
        after = sweep_module.simulate_point(str(config), second)
        assert after == _direct_record(second, str(config))
        assert after["macs"] != before["macs"] and after["static_pj"] != before["static_pj"]
    finally:
        sweep_module._clear_caches()


def test_importing_the_module_imports_no_heavy_module():
    """`tpusim --help` imports tpusim.sweeps to build its parser."""
    heavy = ("numpy", "onnx", "onnxruntime", "numba", "matplotlib", "tpusim.pipeline", "tpusim.workloads",
             "tpusim.config", "yaml", "tqdm")
    code = f"import sys, tpusim.sweeps; print(sorted(m for m in {heavy!r} if m in sys.modules))"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


# ------------------------------------------------------------------------------ handing out work

def test_a_worker_keeps_to_its_group_then_takes_a_free_one_then_helps():
    queue = sweep_module._Queue(["a1", "a2", "b1", "b2", "b3", "c1"], group=lambda item: item[0])
    first = sweep_module._NO_GROUP_YET
    assert queue.take(first, []) == ("a", "a1")
    assert queue.take(first, ["a"]) == ("b", "b1")
    assert queue.take("a", ["b"]) == ("a", "a2")
    assert queue.take("a", ["b"]) == ("c", "c1")  # a is done; c has no worker
    assert queue.take("c", ["b"]) == ("b", "b2")  # every group left has a worker: help the largest
    assert queue.take("b", ["b"]) == ("b", "b3")
    assert not queue


def test_without_groups_items_are_handed_out_in_order():
    queue = sweep_module._Queue([3, 1, 2], group=sweep_module._no_group)
    first = sweep_module._NO_GROUP_YET
    assert [queue.take(first, [None])[1] for _ in range(3)] == [3, 1, 2]


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
    evaluated = min(6, inspect.signature(tpusim.simulate).parameters["eval_samples"].default)
    assert all(r["evaluated_on"] == f"the first {evaluated} calibration samples" and r["held_out"] == "False"
               for r in rows)


# ------------------------------------------------------------------------------------ terminal output

def _hand_row(model: str, batch: int, rows: int, latency_s: float, utilization: float, energy_pj: float) -> dict:
    return {"model": model, "batch": batch, "array.rows": rows, "latency_s": latency_s, "tops": 0.1761,
            "utilization": utilization, "energy_per_inference_pj": energy_pj, "total_tops_per_w": 0.005895}


def test_the_terminal_table_shows_units_percentages_and_thousands_separators():
    rows = [_hand_row("tiny_cnn", 1, 32, 1.028e-05, 0.0153, 3.072e8),
            _hand_row("resnet50", 1024, 4096, 2.5, 0.98765, 4.323e10)]
    assert sweep_module.terminal_table(rows, ["model", "batch", "array.rows"]).splitlines() == [
        "model     batch  array.rows   latency    TOPS  utilization  energy/inference    TOPS/W",
        "--------  -----  ----------  --------  ------  -----------  ----------------  --------",
        "tiny_cnn      1          32  10.28 us  0.1761        1.5 %          307.2 uJ  0.005895",
        "resnet50  1,024       4,096     2.5 s  0.1761       98.8 %          43.23 mJ  0.005895",
    ]


def test_a_missing_config_file_is_one_line_before_any_work(tmp_path):
    with pytest.raises(ConfigError, match=r"absent.yaml: no such config file$"):
        build_points(tmp_path / "absent.yaml", "not_a_workload", {})


def _tpusim_in_process(capfd, monkeypatch, cwd: Path, *argv: str) -> subprocess.CompletedProcess:
    """``tpusim ARGV`` run by ``main`` in this process from ``cwd`` (no 1.5-2.5 s of imports a call; the terminal
    test below runs the console script itself), as a finished process. File descriptors 1 and 2 are read,
    not only ``sys.stdout`` and ``sys.stderr``: what a sweep worker process prints is in there too."""
    monkeypatch.chdir(cwd)
    code = main(list(argv))
    out, err = capfd.readouterr()
    return subprocess.CompletedProcess(["tpusim", *argv], code, out, err)


def _phase_lines(stderr: str) -> list[str]:
    return [re.sub(r" in \d+\.\d\d s$", " in T s", line) for line in stderr.splitlines()]


def test_cli_progress_is_plain_lines_per_phase_when_stderr_is_no_terminal(tmp_path, capfd, monkeypatch):
    done = _tpusim_in_process(capfd, monkeypatch, tmp_path, "sweep", TPU_V1, "--model", "tiny_cnn", "--set",
                              "array.rows=32,64", "--jobs", "2", "--out", "sw")
    assert done.returncode == 0, done.stderr
    assert "\r" not in done.stderr and "\x1b" not in done.stderr
    assert _phase_lines(done.stderr) == [
        "tpusim: sweeping (2 points) ...",
        "tpusim: sweeping: 2 points in T s",
        "tpusim: writing sweep.csv and plots ...",
        "tpusim: writing sweep.csv and plots: done in T s",
    ]
    table = done.stdout.splitlines()
    assert table[0].split() == ["model", "batch", "array.rows", "latency", "TOPS", "utilization", "energy/inference",
                                "TOPS/W"]
    assert len(table) == 2 + 2 + 2 and all(re.search(r" us .* % .* [mu]J ", line) for line in table[2:4]), table
    done = _tpusim_in_process(capfd, monkeypatch, tmp_path, "sweep", TPU_V1, "--model", "tiny_cnn", "--set",
                              "array.rows=32,64", "--jobs", "2", "--out", "sw", "--no-progress")
    assert done.returncode == 0 and done.stderr == ""


def test_a_resumed_sweep_counts_only_the_points_it_computes(tmp_path, capsys):
    tpusim.sweep(TPU_V1, "tiny_cnn", {"array.rows": [32]}, out=tmp_path, jobs=1, progress=False, plots=False)
    tpusim.sweep(TPU_V1, "tiny_cnn", {"array.rows": [32, 64, 128]}, out=tmp_path, jobs=1, plots=False)
    assert _phase_lines(capsys.readouterr().err) == [
        "tpusim: sweeping, 1 of 3 points saved before (2 points) ...",
        "tpusim: sweeping, 1 of 3 points saved before: 2 points in T s",
        "tpusim: writing sweep.csv ...",
        "tpusim: writing sweep.csv: done in T s",
    ]
    tpusim.sweep(TPU_V1, "tiny_cnn", {"array.rows": [32, 64, 128]}, out=tmp_path, jobs=1, plots=False)
    assert _phase_lines(capsys.readouterr().err) == ["tpusim: writing sweep.csv ...",
                                                    "tpusim: writing sweep.csv: done in T s"]


def test_a_quantized_point_in_this_process_shows_none_of_its_run_phases(tmp_path, capsys):
    tpusim.sweep(TPU_V1, "tiny_cnn", {"quant.calibration_samples": [2]}, quantize=True, jobs=1, plots=False)
    assert _phase_lines(capsys.readouterr().err) == ["tpusim: sweeping (1 point) ...",
                                                    "tpusim: sweeping: 1 point in T s"]


def test_on_a_terminal_the_points_are_one_bar_that_only_moves_forward(tmp_path):
    from terminal import run_on_a_terminal

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    returncode, text = run_on_a_terminal([sys.executable, "-m", "tpusim", "sweep", TPU_V1, "--model", "tiny_cnn",
                                          "--set", "array.rows=16,32,64,128", "--jobs", "1",
                                          "--out", str(tmp_path / "sw")], env, timeout_s=120)
    assert returncode == 0, text
    counts = [int(done) for done in re.findall(r"sweeping:.*?(\d+)/4 ", text)]
    assert counts and counts == sorted(counts)
    assert "tpusim: sweeping" not in text  # no plain lines on a terminal: a bar, then a status line
    assert "tpusim: writing sweep.csv and plots ...\r\x1b[K" in text
