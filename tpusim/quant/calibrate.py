"""Calibration: input data for it, and per-tensor statistics of the FP32 model over that data.

The FP32 model runs in ONNX Runtime with every tensor of the lowered graph exposed as an output;
statistics are collected once (histograms merged exactly across batches), and range choice is then a
pure function of them (``tpusim.quant.ranges``).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import onnxruntime as ort

from tpusim.config import InputPreprocessingConfig
from tpusim.errors import DataError
from tpusim.ir import Graph, Shape
from tpusim.quant.histogram import TensorStats, merge, observe

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".tif", ".tiff")


@dataclass(frozen=True, eq=False)
class CalibrationSet:
    inputs: np.ndarray  # (samples, *input_shape[1:]) float32
    source: str
    synthetic: bool


def synthetic_inputs(sample_shape: Shape, samples: int, seed: int) -> CalibrationSet:
    """Seeded standard-normal inputs, i.e. images already normalised per channel."""
    data = np.random.default_rng(seed).standard_normal((samples, *sample_shape)).astype(np.float32)
    return CalibrationSet(data, f"synthetic N(0,1), seed {seed}, {samples} samples", synthetic=True)


def _check_array(data: np.ndarray, where: str, sample_shape: Shape) -> np.ndarray:
    if data.dtype.kind not in "fiu":
        raise DataError(f"{where}: expected a numeric array, got dtype {data.dtype}")
    if data.shape == tuple(sample_shape):
        data = data[None]
    if data.shape[1:] != tuple(sample_shape):
        raise DataError(f"{where}: expected samples of shape {tuple(sample_shape)} (array of shape "
                        f"(N, {', '.join(map(str, sample_shape))})), got {data.shape}")
    if data.shape[0] == 0:
        raise DataError(f"{where}: no samples")
    data = data.astype(np.float32)
    if not np.all(np.isfinite(data)):
        raise DataError(f"{where}: contains NaN or inf")
    return data


def _load_array_file(path: Path, sample_shape: Shape) -> np.ndarray:
    try:
        loaded = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise DataError(f"{path}: not a readable .npy/.npz file ({type(exc).__name__})") from None
    if isinstance(loaded, np.lib.npyio.NpzFile):
        with loaded:
            if not loaded.files:
                raise DataError(f"{path}: the .npz archive holds no arrays")
            arrays = [loaded[name] for name in loaded.files]
        return np.concatenate([_check_array(a, f"{path}", sample_shape) for a in arrays])
    return _check_array(loaded, str(path), sample_shape)


def _load_image_folder(folder: Path, sample_shape: Shape, prep: InputPreprocessingConfig) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)}) in the folder")
    if len(sample_shape) != 3:
        raise DataError(f"{folder}: images need an image model (C, H, W input), but the input is {sample_shape}")
    channels, height, width = sample_shape
    if channels not in (1, 3):
        raise DataError(f"{folder}: images give 1 or 3 channels, but the model wants {channels}")
    mean, std = np.asarray(prep.mean, np.float32), np.asarray(prep.std, np.float32)
    if len(mean) not in (1, channels) or len(std) not in (1, channels):
        raise DataError(f"input_preprocessing: mean/std need 1 or {channels} values")
    samples = []
    for file in files:
        try:
            with Image.open(file) as image:
                image = image.convert("RGB" if channels == 3 else "L").resize((width, height), Image.BILINEAR)
                pixels = np.asarray(image, dtype=np.float32)
        except (UnidentifiedImageError, OSError) as exc:
            raise DataError(f"{file}: not a readable image ({type(exc).__name__})") from None
        pixels = pixels.reshape(height, width, channels).transpose(2, 0, 1) / np.float32(prep.pixel_scale)
        samples.append((pixels - mean.reshape(-1, 1, 1)) / std.reshape(-1, 1, 1))
    return np.stack(samples).astype(np.float32)


def load_calibration_set(path: str | Path | None, sample_shape: Shape, samples: int, seed: int,
                         prep: InputPreprocessingConfig) -> CalibrationSet:
    """``.npy``/``.npz`` of inputs or a folder of images (every sample in it), or (``path=None``) a seeded
    synthetic set of ``samples`` inputs."""
    if path is None:
        return synthetic_inputs(sample_shape, samples, seed)
    path = Path(path)
    if path.is_dir():
        data = _load_image_folder(path, sample_shape, prep)
    elif path.is_file():
        if path.suffix not in (".npy", ".npz"):
            raise DataError(f"{path}: calibration data must be a .npy/.npz file or a folder of images")
        data = _load_array_file(path, sample_shape)
    else:
        raise DataError(f"{path}: no such calibration file or folder")
    return CalibrationSet(data, f"{path} ({len(data)} samples)", synthetic=False)


def graph_tensors(graph: Graph) -> list[str]:
    """Every tensor that gets its own quantization parameters: the input and each layer's output."""
    return [graph.input_name] + [layer.output for layer in graph.layers]


def _session_exposing(model: onnx.ModelProto, tensors: list[str]) -> ort.InferenceSession:
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    present = {o.name for o in exposed.graph.output}
    for name in tensors:
        if name not in present and name not in {i.name for i in exposed.graph.input}:
            exposed.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(exposed.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _fixed_batch(model: onnx.ModelProto) -> int | None:
    dims = model.graph.input[0].type.tensor_type.shape.dim
    return dims[0].dim_value if dims and dims[0].HasField("dim_value") else None


def collect_statistics(model: onnx.ModelProto, graph: Graph, data: CalibrationSet, bins: int,
                       batch_size: int = 8, progress: Callable[[int, int], None] | None = None,
                       tensors: list[str] | None = None) -> dict[str, TensorStats]:
    """Run the FP32 model over the calibration set and return merged statistics per graph tensor
    (or only per tensor of ``tensors``, which must include the graph input).

    ``progress(samples done, samples total)`` is called after every batch."""
    tensors = graph_tensors(graph) if tensors is None else tensors
    session = _session_exposing(model, tensors)
    input_name = session.get_inputs()[0].name
    step = _fixed_batch(model) or batch_size
    output_names = [o.name for o in session.get_outputs()]
    wanted = [name for name in output_names if name in set(tensors)]
    stats: dict[str, TensorStats] = {graph.input_name: None}
    for start in range(0, len(data.inputs), step):
        batch = data.inputs[start : start + step]
        if len(batch) < step and _fixed_batch(model):
            break
        results = dict(zip(output_names, session.run(None, {input_name: batch})))
        results[graph.input_name] = batch
        for name in [graph.input_name] + wanted:
            observed = observe(results[name], bins, name=name)
            stats[name] = observed if stats.get(name) is None else merge(stats[name], observed)
        if progress is not None:
            progress(min(start + step, len(data.inputs)), len(data.inputs))
    missing = [name for name in tensors if stats.get(name) is None]
    if missing:
        raise DataError(f"calibration produced no statistics for {missing[:3]} (is the set smaller than the "
                        "model's fixed batch?)")
    return stats
