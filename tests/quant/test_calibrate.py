"""Calibration data that would weaken the result without a word: refused (integer arrays) or accepted
with a one-line warning that also stays on the calibration set (``CalibrationSet.warnings``)."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tpusim.cli import main
from tpusim.config import load_config
from tpusim.errors import CalibrationDataWarning, DataError
from tpusim.quant.calibrate import load_calibration_set

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
                 str(tmp_path / "q.onnx")]) == 0
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(": ")[2] for line in lines] == [str(folder)] * 3
    assert all(line.startswith("tpusim: warning: ") for line in lines)
    assert "converted" in lines[0] and "resized" in lines[1] and "not held-out" in lines[2]
