"""Calibration data that would weaken the result without a word: refused (integer arrays) or accepted
with a one-line warning that also stays on the calibration set (``CalibrationSet.warnings``)."""
from __future__ import annotations

import warnings
import weakref
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from PIL import Image

from tpusim.cli import main
from tpusim.config import load_config
from tpusim.errors import CalibrationDataWarning, DataError, ModelError
from tpusim.frontend import lower_model
from tpusim.frontend.lowering import index_rows, load_onnx
from tpusim.frontend.reference import run_reference
from tpusim.quant import calibrate
from tpusim.quant.calibrate import graph_tensors, load_calibration_set, synthetic_ids, synthetic_inputs
from tpusim.workloads import build_model

TPU_V1 = str(Path(__file__).resolve().parents[2] / "configs" / "tpu_v1.yaml")
PREP = load_config(TPU_V1).input_preprocessing
SHAPE = (3, 32, 32)


def _load(path, samples=32):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = load_calibration_set(path, SHAPE, samples, 0, PREP)
    shown = [str(w.message) for w in caught if issubclass(w.category, CalibrationDataWarning)]
    assert shown == list(data.warnings)
    return data


def _npy(tmp_path, n, dtype=np.float32, name="x.npy"):
    path = tmp_path / name
    rng = np.random.default_rng(n)
    data = rng.integers(0, 256, (n, *SHAPE)) if np.dtype(dtype).kind in "iu" else rng.standard_normal((n, *SHAPE))
    np.save(path, data.astype(dtype))
    return path


@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.int64])
def test_integer_arrays_are_refused(tmp_path, dtype):
    path = _npy(tmp_path, 40, dtype)
    with pytest.raises(DataError, match=rf"x\.npy: dtype {np.dtype(dtype).name}: expected float inputs"):
        load_calibration_set(path, SHAPE, 32, 0, PREP)


def test_enough_samples_hold_some_out_without_a_warning(tmp_path):
    data = _load(_npy(tmp_path, 40))
    assert data.warnings == () and len(data.inputs) == 40


@pytest.mark.parametrize("n", [2, 20, 32])
def test_no_more_samples_than_calibrate_is_warned(tmp_path, n):
    (note,) = _load(_npy(tmp_path, n)).warnings
    assert f"{n} samples, not more than quant.calibration_samples (32)" in note
    assert "not held-out" in note


def test_a_single_sample_is_warned(tmp_path):
    (note,) = _load(_npy(tmp_path, 1)).warnings
    assert "a single sample" in note


def _images(folder: Path, count: int, size: tuple[int, int], mode: str) -> Path:
    folder.mkdir()
    rng = np.random.default_rng(0)
    shape = (size[1], size[0]) if mode == "L" else (size[1], size[0], 3)
    for i in range(count):
        Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode).save(folder / f"{i:02}.png")
    return folder


def test_grayscale_images_of_another_size_are_warned_twice(tmp_path):
    data = _load(_images(tmp_path / "digits", 40, (28, 28), "L"))
    converted, resized = data.warnings
    assert "40 of 40 images are not RGB (40 L) and were converted to the model's 3 channels" in converted
    assert "40 of 40 images resized to the model's 32x32 (40 of 28x28)" in resized
    assert data.inputs.shape == (40, *SHAPE)


def test_images_that_fit_are_not_warned(tmp_path):
    assert _load(_images(tmp_path / "photos", 33, (32, 32), "RGB")).warnings == ()


def test_the_cli_prints_each_warning_as_one_line(tmp_path, capsys):
    folder = _images(tmp_path / "digits", 3, (28, 28), "L")
    assert main(["run", TPU_V1, "--model", "tiny_cnn", "--calib-data", str(folder), "--out", str(tmp_path / "out"),
                 "--no-progress", "--eval-samples", "1", "--no-quantize"]) == 0
    assert capsys.readouterr().err == ""  # nothing calibrates without quantization
    assert main(["quantize", TPU_V1, "--model", "tiny_cnn", "--calib-data", str(folder), "-o",
                 str(tmp_path / "q.onnx"), "--no-progress"]) == 0
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(": ")[2] for line in lines] == [str(folder)] * 3
    assert all(line.startswith("tpusim: warning: ") for line in lines)
    assert "converted" in lines[0] and "resized" in lines[1] and "not held-out" in lines[2]


# --------------------------------------------------------------------------------- streaming statistics

def _tiny_cnn():
    model = build_model("tiny_cnn")
    return model, lower_model(model, "tiny_cnn")


def _same_statistics(a: dict, b: dict) -> bool:
    """Every field of every tensor's statistics identical, bit for bit (the sign of a zero extreme too)."""
    return list(a) == list(b) and all(
        repr((s.min, s.max, s.lo, s.hi, s.count)) == repr((t.min, t.max, t.lo, t.hi, t.count))
        and np.array_equal(s.counts, t.counts) for s, t in ((a[name], b[name]) for name in a))


def _per_sample_bytes(graph) -> int:
    return sum(4 * int(np.prod(layer.output_shape)) for layer in graph.layers)


@pytest.mark.parametrize("samples_per_run", [1, 3])
def test_statistics_do_not_depend_on_how_many_samples_run_together(monkeypatch, samples_per_run):
    model, graph = _tiny_cnn()
    data = synthetic_inputs(graph.input_shape[1:], 10, 0)
    whole_batches = calibrate.collect_statistics(model, graph, data, 2048)  # batches of 8: a small model
    monkeypatch.setattr(calibrate, "_RUN_BYTES", samples_per_run * _per_sample_bytes(graph))
    assert _same_statistics(calibrate.collect_statistics(model, graph, data, 2048), whole_batches)


def test_a_large_model_runs_as_many_samples_as_fit_in_the_run_budget(monkeypatch):
    model, graph = _tiny_cnn()
    tensors = calibrate.graph_tensors(graph)
    one = _per_sample_bytes(graph)
    for budget, samples in ((0, 1), (3 * one - 1, 2), (3 * one, 3), (100 * one, 8)):
        monkeypatch.setattr(calibrate, "_RUN_BYTES", budget)
        assert calibrate._samples_per_run(graph, tensors, 8) == samples
    runs = []
    real_session = calibrate._session_exposing

    def counting_session(*args):
        session = real_session(*args)
        real_run = session.run
        session.run = lambda names, feed: runs.append(len(next(iter(feed.values())))) or real_run(names, feed)
        return session

    monkeypatch.setattr(calibrate, "_session_exposing", counting_session)
    monkeypatch.setattr(calibrate, "_RUN_BYTES", 3 * one)
    calibrate.collect_statistics(model, graph, synthetic_inputs(graph.input_shape[1:], 10, 0), 2048)
    assert runs == [3, 3, 3, 1]


def test_a_runs_tensors_are_dropped_before_the_next_run(monkeypatch):
    """No tensor of an ONNX Runtime run is alive when the next run starts (the batch's input is a slice of the
    calibration set). Holding a batch's every tensor until the next batch ran is what made a ResNet-50
    calibration 2.5 GB; within a run, every tensor is alive at once anyway: ONNX Runtime returns them together."""
    model, graph = _tiny_cnn()
    previous: list[weakref.ref] = []
    alive_when_running = []
    real_run = calibrate.FloatModel.run

    def watching_run(self, batch):
        alive_when_running.append(sum(ref() is not None for ref in previous))
        results = real_run(self, batch)
        previous[:] = [weakref.ref(values) for name, values in results.items() if name != graph.input_name]
        return results

    monkeypatch.setattr(calibrate.FloatModel, "run", watching_run)
    calibrate.collect_statistics(model, graph, synthetic_inputs(graph.input_shape[1:], 16, 0), 2048)
    assert len(previous) == len(calibrate.graph_tensors(graph)) - 1 and alive_when_running == [0, 0]


def test_the_model_keeps_its_outputs():
    model, graph = _tiny_cnn()
    before = model.SerializeToString()
    calibrate.collect_statistics(model, graph, synthetic_inputs(graph.input_shape[1:], 2, 0), 2048)
    assert model.SerializeToString() == before


def test_a_tensor_beyond_float32_is_named():
    model, graph = _tiny_cnn()
    huge = calibrate.CalibrationSet(np.full((2, *graph.input_shape[1:]), 3e38, np.float32), "huge inputs",
                                    synthetic=False)
    first = graph.layers[0].output
    with pytest.raises(ModelError, match=rf"tensor {first!r} is NaN or inf when the FP32 model runs on the "
                                         r"calibration data \(huge inputs\)"):
        calibrate.collect_statistics(model, graph, huge, 2048)


def _bits(values: np.ndarray) -> np.ndarray:
    assert values.dtype == np.float32
    return values.view(np.int32)


@pytest.mark.parametrize("samples", [1, 8, 20])
def test_synthetic_inputs_are_the_generators_whole_draw(samples):
    whole = np.random.default_rng(3).standard_normal((samples, *SHAPE)).astype(np.float32)
    drawn = synthetic_inputs(SHAPE, samples, 3).inputs
    assert drawn.dtype == np.float32 and drawn.shape == whole.shape
    assert np.array_equal(_bits(np.asarray(drawn)), _bits(whole))


def test_synthetic_samples_read_in_any_order_are_those_of_the_whole_draw():
    whole = np.random.default_rng(5).standard_normal((20, *SHAPE)).astype(np.float32)
    drawn = synthetic_inputs(SHAPE, 20, 5).inputs
    for start, stop in ((3, 11), (11, 20), (0, 1), (19, 20), (2, 18), (0, 20)):  # on, back, and on again
        assert np.array_equal(_bits(drawn[start:stop]), _bits(whole[start:stop]))
    part = drawn.part(4, 30)
    assert len(part) == 16 and np.array_equal(_bits(part[2:5]), _bits(whole[6:9]))
    assert np.array_equal(_bits(drawn[-1]), _bits(whole[-1])) and len(drawn.part(25, 30)) == 0
    with pytest.raises(IndexError):
        drawn[20]


def _counting_reads(data, reads: list[tuple[int, int]]):
    inner = data.inputs._read
    data.inputs._read = lambda start, stop: reads.append((start, stop)) or inner(start, stop)
    return data


def test_calibration_reads_its_samples_one_run_at_a_time(monkeypatch):
    model, graph = _tiny_cnn()
    reads: list[tuple[int, int]] = []
    one = _per_sample_bytes(graph)
    monkeypatch.setattr(calibrate, "_RUN_BYTES", 3 * one)
    data = _counting_reads(synthetic_inputs(graph.input_shape[1:], 10, 0), reads)
    stats = calibrate.collect_statistics(model, graph, data, 2048)
    assert reads == [(0, 3), (3, 6), (6, 9), (9, 10)]
    assert _same_statistics(stats, calibrate.collect_statistics(
        model, graph, calibrate.CalibrationSet(np.asarray(data.inputs), "held whole", True), 2048))


def test_an_npy_file_is_read_a_slice_at_a_time_with_its_own_values(tmp_path, monkeypatch):
    rng = np.random.default_rng(1)
    values = rng.standard_normal((12, *SHAPE))
    np.save(tmp_path / "x64.npy", values)  # float64 on disk: each read converts as a whole load would
    np.save(tmp_path / "one.npy", values[0].astype(np.float32))  # a single sample without its axis
    monkeypatch.setattr(calibrate, "_SCAN_BYTES", 5 * 8 * int(np.prod(SHAPE)))  # the NaN scan: 5 samples a read
    data = _load(tmp_path / "x64.npy")
    assert isinstance(data.inputs, calibrate.Samples) and data.inputs.shape == (12, *SHAPE)
    assert np.array_equal(_bits(data.inputs[4:9]), _bits(values[4:9].astype(np.float32)))
    assert np.array_equal(_bits(data.part(10, 40).inputs[0:2]), _bits(values[10:12].astype(np.float32)))
    assert np.array_equal(_bits(np.asarray(_load(tmp_path / "one.npy").inputs)), _bits(values[:1].astype(np.float32)))
    values[11, 0, 0, 0] = np.inf  # in the last read of the scan
    np.save(tmp_path / "inf.npy", values)
    with pytest.raises(DataError, match=r"inf\.npy: contains NaN or inf"):
        load_calibration_set(tmp_path / "inf.npy", SHAPE, 32, 0, PREP)
    np.save(tmp_path / "fortran.npy", np.asfortranarray(values[:4].astype(np.float32)))  # loaded whole
    assert np.array_equal(_bits(_load(tmp_path / "fortran.npy").inputs[1:3]), _bits(values[1:3].astype(np.float32)))


def test_a_truncated_npy_file_is_one_line(tmp_path):
    path = _npy(tmp_path, 4)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DataError, match=r"x\.npy: not a readable \.npy/\.npz file"):
        load_calibration_set(path, SHAPE, 32, 0, PREP)


def test_images_are_decoded_when_read_as_a_whole_load_would(tmp_path):
    folder = _images(tmp_path / "digits", 5, (28, 28), "L")
    data = _load(folder)
    assert isinstance(data.inputs, calibrate.Samples) and data.inputs.shape == (5, *SHAPE)
    with Image.open(folder / "03.png") as image:
        pixels = np.asarray(image.convert("RGB").resize((32, 32), Image.BILINEAR), dtype=np.float32)
    mean, std = np.asarray(PREP.mean, np.float32), np.asarray(PREP.std, np.float32)
    expected = (pixels.transpose(2, 0, 1) / np.float32(PREP.pixel_scale) - mean.reshape(-1, 1, 1)) / std.reshape(-1, 1, 1)
    assert np.array_equal(_bits(data.inputs[3]), _bits(expected.astype(np.float32)))
    (folder / "04.png").write_bytes((folder / "04.png").read_bytes()[:60])  # its header stays, its pixels go
    with pytest.raises(DataError, match=r"04\.png: not a readable image"):
        np.asarray(data.inputs)


@pytest.mark.parametrize("workload", ["tiny_cnn", "bert_tiny"])
def test_float_model_reference_is_every_graph_tensor_as_our_evaluator_computes_it(workload):
    # bert_tiny has an embedding layer without inputs (a constant): evaluated once, not asked of ONNX Runtime
    model = build_model(workload)
    graph = lower_model(model, workload, batch=1)
    rows = index_rows(graph)
    x = np.asarray((synthetic_ids(graph.input_shape[1:], 1, 0, rows) if rows else synthetic_inputs(graph.input_shape[1:], 1, 0)).inputs)
    float_model = calibrate.FloatModel(model, graph)
    assert float_model.covers_graph and (len(float_model.constants) > 0) == (workload == "bert_tiny")
    ours, theirs = run_reference(graph, x, keep_all=True), float_model.reference(x)
    for name in graph_tensors(graph):
        assert theirs[name].shape == ours[name].shape, name
        np.testing.assert_allclose(theirs[name], ours[name], rtol=1e-4, atol=1e-5 * float(np.ptp(ours[name])), err_msg=name)
    partial = calibrate.FloatModel(model, graph, graph_tensors(graph)[:3])
    assert not partial.covers_graph and set(partial.reference(x)) >= set(graph_tensors(graph)[:3])


def test_statistics_through_a_given_float_model_are_those_of_a_new_session():
    model = build_model("tiny_cnn")
    graph = lower_model(model, "tiny_cnn")
    data = synthetic_inputs(graph.input_shape[1:], 10, 0)
    shared = calibrate.collect_statistics(model, graph, data, 2048, float_model=calibrate.FloatModel(model, graph))
    assert _same_statistics(shared, calibrate.collect_statistics(model, graph, data, 2048))


def test_a_model_file_runs_from_its_bytes_with_the_outputs_of_its_parsed_model(tmp_path):
    model, graph = _tiny_cnn()
    path = tmp_path / "tiny.onnx"
    onnx.save(model, path)
    served = calibrate.model_for_onnxruntime(path)
    assert served == calibrate.ModelFile(path)
    assert load_onnx(path).external_data is False and calibrate.model_for_onnxruntime(path, False) == served
    from_bytes, from_proto = calibrate.FloatModel(served, graph), calibrate.FloatModel(model, graph)
    assert from_bytes.output_names == from_proto.output_names and from_bytes.fixed_batch == from_proto.fixed_batch
    data = synthetic_inputs(graph.input_shape[1:], 10, 0)
    assert _same_statistics(calibrate.collect_statistics(served, graph, data, 2048, float_model=from_bytes),
                            calibrate.collect_statistics(model, graph, data, 2048, float_model=from_proto))


@pytest.mark.parametrize("reads_external_data_of_bytes", [True, False])
def test_a_model_with_external_data_runs_from_its_files_or_is_loaded_with_them(tmp_path, monkeypatch,
                                                                               reads_external_data_of_bytes):
    # ONNX Runtime 1.21 and later read a bytes model's external data from a folder it is given; an older one
    # gets the model loaded with its data.
    if reads_external_data_of_bytes and not calibrate._READS_EXTERNAL_DATA_OF_BYTES:
        pytest.skip(f"ONNX Runtime {ort.__version__} finds no external data of a model given as bytes")
    monkeypatch.setattr(calibrate, "_READS_EXTERNAL_DATA_OF_BYTES", reads_external_data_of_bytes)
    model, graph = _tiny_cnn()
    path = tmp_path / "tiny.onnx"
    onnx.save(model, path, save_as_external_data=True, all_tensors_to_one_file=True, location="tiny.onnx.data",
              size_threshold=0)
    served = calibrate.model_for_onnxruntime(path)
    assert served == calibrate.ModelFile(path) if reads_external_data_of_bytes else isinstance(served, onnx.ModelProto)
    # The lowering of the file knows it (and saves the search of the file); a model in memory does not.
    assert load_onnx(path).external_data is True and graph.external_data is None
    assert type(calibrate.model_for_onnxruntime(path, external_data=True)) is type(served)
    x = np.asarray(synthetic_inputs(graph.input_shape[1:], 1, 0).inputs)
    ours = run_reference(graph, x, keep_all=True)
    theirs = calibrate.FloatModel(served, graph).reference(x)
    assert all(np.allclose(theirs[name], ours[name], rtol=1e-4, atol=1e-5) for name in graph_tensors(graph))
    loaded = calibrate.FloatModel(onnx.load(str(path)), graph).reference(x)
    assert all(np.array_equal(theirs[name], loaded[name]) for name in graph_tensors(graph))