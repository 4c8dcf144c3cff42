"""Calibration: input data for it, and per-tensor statistics of the FP32 model over that data.

The FP32 model runs in ONNX Runtime with every tensor of the lowered graph exposed as an output;
statistics are collected once (histograms merged exactly across batches), and range choice is then a
pure function of them (``tpusim.quant.ranges``).
"""
from __future__ import annotations

import math
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import onnxruntime as ort

from tpusim.config import InputPreprocessingConfig
from tpusim.errors import CalibrationDataWarning, DataError, ModelError
from tpusim.ir import Graph, Shape
from tpusim.quant.histogram import NonFiniteError, TensorStats, merge, observe

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".tif", ".tiff")


@dataclass(frozen=True, eq=False)
class CalibrationSet:
    inputs: np.ndarray  # (samples, *input_shape[1:]) float32 (int64 for a model that takes token ids)
    source: str
    synthetic: bool
    warnings: tuple[str, ...] = ()  # what weakens this data (few samples, converted images), one line each


_DRAW_SAMPLES = 8  # synthetic samples drawn at a time: the float64 draws of a whole set would be twice its size


def synthetic_inputs(sample_shape: Shape, samples: int, seed: int) -> CalibrationSet:
    """Seeded standard-normal inputs, i.e. images already normalised per channel: the generator's
    ``standard_normal((samples, *sample_shape))`` in float32, drawn ``_DRAW_SAMPLES`` samples at a time
    (the generator's stream does not depend on how it is cut)."""
    rng = np.random.default_rng(seed)
    data = np.empty((samples, *sample_shape), np.float32)
    for start in range(0, samples, _DRAW_SAMPLES):
        chunk = data[start : start + _DRAW_SAMPLES]
        chunk[...] = rng.standard_normal(chunk.shape)
    return CalibrationSet(data, f"synthetic N(0,1), seed {seed}, {samples} samples", synthetic=True)


def synthetic_ids(sample_shape: Shape, samples: int, seed: int, rows: int) -> CalibrationSet:
    """Seeded token ids, uniform over the ``rows`` rows of the embedding table they index (int64)."""
    data = np.random.default_rng(seed).integers(0, rows, (samples, *sample_shape), dtype=np.int64)
    return CalibrationSet(data, f"synthetic token ids uniform in [0, {rows}), seed {seed}, {samples} samples",
                          synthetic=True)


def _check_ids(data: np.ndarray, where: str, sample_shape: Shape, rows: int) -> np.ndarray:
    """Token ids for a model whose input indexes an embedding table of ``rows`` rows: integers in [0, rows)."""
    if data.dtype.kind not in "iu":
        raise DataError(f"{where}: dtype {data.dtype}: the model's input is token ids; expected an integer array "
                        f"(int64) of ids in [0, {rows})")
    if data.shape == tuple(sample_shape):
        data = data[None]
    if data.shape[1:] != tuple(sample_shape) or data.shape[0] == 0:
        raise DataError(f"{where}: expected samples of shape {tuple(sample_shape)} (array of shape "
                        f"(N, {', '.join(map(str, sample_shape))})), got {data.shape}")
    if data.min() < 0 or data.max() >= rows:
        raise DataError(f"{where}: token ids from {data.min()} to {data.max()}: the embedding table has {rows} rows "
                        f"(ids in [0, {rows}))")
    return data.astype(np.int64)


def _check_array(data: np.ndarray, where: str, sample_shape: Shape, index_rows: int | None = None) -> np.ndarray:
    if index_rows is not None:
        return _check_ids(data, where, sample_shape, index_rows)
    if data.dtype.kind not in "fiu":
        raise DataError(f"{where}: expected a numeric array, got dtype {data.dtype}")
    if data.dtype.kind in "iu":
        raise DataError(f"{where}: dtype {data.dtype}: expected float inputs, preprocessed as the model takes them "
                        "(for raw 8-bit pixels use a folder of images, which input_preprocessing scales and normalises)")
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


def _load_array_file(path: Path, sample_shape: Shape, index_rows: int | None = None) -> np.ndarray:
    try:
        loaded = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise DataError(f"{path}: not a readable .npy/.npz file ({type(exc).__name__})") from None
    if isinstance(loaded, np.lib.npyio.NpzFile):
        with loaded:
            if not loaded.files:
                raise DataError(f"{path}: the .npz archive holds no arrays")
            arrays = [loaded[name] for name in loaded.files]
        return np.concatenate([_check_array(a, f"{path}", sample_shape, index_rows) for a in arrays])
    return _check_array(loaded, str(path), sample_shape, index_rows)


_CHANNEL_MODES = {1: "L", 3: "RGB"}


def _load_image_folder(folder: Path, sample_shape: Shape,
                       prep: InputPreprocessingConfig) -> tuple[np.ndarray, list[str]]:
    """The images as model inputs, and a line for each way they had to be changed to fit the model."""
    from PIL import Image, UnidentifiedImageError

    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)}) in the folder")
    if len(sample_shape) != 3:
        raise DataError(f"{folder}: images need an image model (C, H, W input), but the input is {sample_shape}")
    channels, height, width = sample_shape
    if channels not in _CHANNEL_MODES:
        raise DataError(f"{folder}: images give 1 or 3 channels, but the model wants {channels}")
    mean, std = np.asarray(prep.mean, np.float32), np.asarray(prep.std, np.float32)
    if len(mean) not in (1, channels) or len(std) not in (1, channels):
        raise DataError(f"input_preprocessing: mean/std need 1 or {channels} values")
    target = _CHANNEL_MODES[channels]
    converted: dict[str, int] = {}
    resized: dict[tuple[int, int], int] = {}
    samples = []
    for file in files:
        try:
            with Image.open(file) as image:
                if image.mode != target and image.mode not in (("RGBA", "P", "CMYK", "YCbCr") if target == "RGB" else ()):
                    converted[image.mode] = converted.get(image.mode, 0) + 1
                if image.size != (width, height):
                    resized[image.size] = resized.get(image.size, 0) + 1
                image = image.convert(target).resize((width, height), Image.BILINEAR)
                pixels = np.asarray(image, dtype=np.float32)
        except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError) as exc:
            raise DataError(f"{file}: not a readable image ({type(exc).__name__})") from None
        pixels = pixels.reshape(height, width, channels).transpose(2, 0, 1) / np.float32(prep.pixel_scale)
        samples.append((pixels - mean.reshape(-1, 1, 1)) / std.reshape(-1, 1, 1))
    notes = []
    if converted:
        modes = ", ".join(f"{count} {mode}" for mode, count in sorted(converted.items()))
        notes.append(f"{folder}: {sum(converted.values())} of {len(files)} images are not {target} ({modes}) and were "
                     f"converted to the model's {channels} channel{'s' if channels > 1 else ''}")
    if resized:
        sizes = ", ".join(f"{count} of {w}x{h}" for (w, h), count in sorted(resized.items()))
        notes.append(f"{folder}: {sum(resized.values())} of {len(files)} images resized to the model's {width}x{height} "
                     f"({sizes})")
    return np.stack(samples).astype(np.float32), notes


def load_calibration_set(path: str | Path | None, sample_shape: Shape, samples: int, seed: int,
                         prep: InputPreprocessingConfig, hold_out: bool = True,
                         index_rows: int | None = None) -> CalibrationSet:
    """``.npy``/``.npz`` of inputs or a folder of images (every sample in it), or (``path=None``) a seeded
    synthetic set of ``samples`` inputs.

    Real data that tpusim accepts but that weakens the result is noted in ``warnings`` and warned about
    (:class:`~tpusim.errors.CalibrationDataWarning`, one line each): a single sample; no more samples
    than ``samples``, so that none is left to hold out for fidelity; images converted to the model's
    channels or resized to its size. Integer arrays (raw pixels) are refused. ``hold_out=False`` (the data
    only evaluates, as for a model that brings its own quantization) drops the hold-out warning.

    ``index_rows``: the model's input is token ids below this (an embedding table's rows): the synthetic
    set is uniform ids, and an array must hold integer ids in range (int64 ``.npy``)."""
    if path is None:
        if index_rows is not None:
            return synthetic_ids(sample_shape, samples, seed, index_rows)
        return synthetic_inputs(sample_shape, samples, seed)
    path = Path(path)
    notes: list[str] = []
    if path.is_dir() and index_rows is not None:
        raise DataError(f"{path}: the model's input is token ids: calibration data must be an int64 .npy/.npz of "
                        "ids, not a folder of images")
    if path.is_dir():
        data, notes = _load_image_folder(path, sample_shape, prep)
    elif path.is_file():
        if path.suffix not in (".npy", ".npz"):
            raise DataError(f"{path}: calibration data must be a .npy/.npz file or a folder of images")
        data = _load_array_file(path, sample_shape, index_rows)
    else:
        raise DataError(f"{path}: no such calibration file or folder")
    if len(data) == 1:
        notes.append(f"{path}: a single sample: the ranges are those of one input, and fidelity is measured on "
                     "that same sample" if hold_out else f"{path}: a single sample: fidelity is measured on one input")
    elif len(data) <= samples and hold_out:
        notes.append(f"{path}: {len(data)} samples, not more than quant.calibration_samples ({samples}): all of them "
                     "calibrate, so fidelity is measured on calibration samples, not held-out ones (pass more "
                     "samples, or lower quant.calibration_samples)")
    for note in notes:
        warnings.warn(note, CalibrationDataWarning, stacklevel=2)
    return CalibrationSet(data, f"{path} ({len(data)} samples)", synthetic=False, warnings=tuple(notes))


def graph_tensors(graph: Graph) -> list[str]:
    """Every tensor that gets its own quantization parameters: the input and each layer's output."""
    return [graph.input_name] + [layer.output for layer in graph.layers]


def _session_exposing(model: onnx.ModelProto, tensors: list[str]) -> ort.InferenceSession:
    """A session of ``model`` with ``tensors`` as extra outputs. The outputs are added to ``model`` only
    while it is serialised: a copy of the model (its weights) would double what calibration holds."""
    outputs = model.graph.output
    present = {o.name for o in outputs} | {i.name for i in model.graph.input}
    added = [name for name in tensors if name not in present]
    outputs.extend(onnx.helper.make_empty_tensor_value_info(name) for name in added)
    try:
        serialized = model.SerializeToString()
    finally:
        del outputs[len(outputs) - len(added):]
    options = ort.SessionOptions()
    options.log_severity_level = 3
    # Between runs tpusim computes (histograms, integer layers): ONNX Runtime's threads must not spin on the
    # cores meanwhile. Its memory pattern (a planned block for a run's tensors) would be kept beside the
    # arena that serves the same tensors (ResNet-50: 66 MB more, and no faster).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.enable_mem_pattern = False
    return ort.InferenceSession(serialized, options, providers=["CPUExecutionProvider"])


def _fixed_batch(model: onnx.ModelProto) -> int | None:
    dims = model.graph.input[0].type.tensor_type.shape.dim
    return dims[0].dim_value if dims and dims[0].HasField("dim_value") else None


def _check_finite_parameters(graph: Graph) -> None:
    """NaN or inf in a layer's weights or bias (after batch norm folding) cannot be quantized: say which."""
    for layer in graph.layers:
        for what, values in (("weights", layer.weight), ("bias", layer.bias)):
            if values is not None and not np.all(np.isfinite(values)):
                raise ModelError(f"model {graph.name!r}: layer {layer.name!r}: NaN or inf in its {what} "
                                 "(after folding batch norm)")


# What one ONNX Runtime run returns at most (every exposed tensor of its samples), in bytes: the run
# holds it twice (ONNX Runtime's buffers and the arrays they are copied to), and calibration holds nothing
# else that grows with the data. Batches are cut to fit, down to one sample.
_RUN_BYTES = 64 * 2**20


def _samples_per_run(graph: Graph, tensors: list[str], batch_size: int) -> int:
    """Samples per ONNX Runtime run: ``batch_size``, or fewer when their exposed tensors pass ``_RUN_BYTES``.

    ONNX Runtime computes a sample's tensors the same whatever else is in its batch for every built-in
    workload but the LSTM (its recurrent kernel batches the samples' GEMMs), and the histograms of
    batches merge exactly: a smaller batch gives the same statistics there. The LSTM is small and keeps
    its batches of ``batch_size``."""
    exposed = set(tensors)
    per_sample = sum(4 * math.prod(layer.output_shape) for layer in graph.layers if layer.output in exposed)
    per_sample //= graph.batch
    return max(1, min(batch_size, _RUN_BYTES // max(per_sample, 1)))


class FloatModel:
    """The FP32 model as ONNX Runtime runs it, with graph tensors exposed as outputs: what calibration
    observes, and the reference that fidelity measures the integer run against.

    ``tensors`` (default: every graph tensor, :func:`graph_tensors`) must include the graph input. A
    layer without inputs computes a constant (a materialised embedding); the tensor may not exist in
    ``model``, so it is evaluated once here instead."""

    def __init__(self, model: onnx.ModelProto, graph: Graph, tensors: list[str] | None = None):
        tensors = graph_tensors(graph) if tensors is None else tensors
        self.graph = graph
        self.constants = {layer.output: layer for layer in graph.layers if not layer.inputs and layer.output in tensors}
        self.tensors = [name for name in tensors if name not in self.constants]
        self.session = _session_exposing(model, self.tensors)
        self.fixed_batch = _fixed_batch(model)
        self._input_name = self.session.get_inputs()[0].name
        self.output_names = [o.name for o in self.session.get_outputs()]
        self._constant_values: dict[str, np.ndarray] | None = None

    @property
    def covers_graph(self) -> bool:
        """Every graph tensor is exposed (or constant): the model can stand in for the FP32 reference."""
        return set(self.tensors) | set(self.constants) >= set(graph_tensors(self.graph))

    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """The exposed tensors (and the model's outputs) of one run on ``batch``, with the graph input."""
        results = dict(zip(self.output_names, self.session.run(None, {self._input_name: batch})))
        results[self.graph.input_name] = batch
        return results

    def constant_values(self) -> dict[str, np.ndarray]:
        if self._constant_values is None:
            from tpusim.frontend.reference import run_layer

            self._constant_values = {name: run_layer(layer, []) for name, layer in self.constants.items()}
        return self._constant_values

    def reference(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """Every graph tensor on ``batch``, as :func:`tpusim.frontend.reference.run_reference` with
        ``keep_all`` gives it, computed by ONNX Runtime."""
        return {**self.run(batch), **self.constant_values()}


def collect_statistics(model: onnx.ModelProto, graph: Graph, data: CalibrationSet, bins: int,
                       batch_size: int = 8, progress: Callable[[int, int], None] | None = None,
                       tensors: list[str] | None = None, float_model: FloatModel | None = None) -> dict[str, TensorStats]:
    """Run the FP32 model over the calibration set and return merged statistics per graph tensor
    (or only per tensor of ``tensors``, which must include the graph input).

    The data run through ONNX Runtime in batches of ``batch_size`` samples (the model's fixed batch if it
    has one; fewer for a large model, see :func:`_samples_per_run`); each tensor of a batch is observed,
    merged and dropped, so memory does not grow with the number of samples. ``float_model``: a session of
    ``model`` exposing ``tensors`` already made (the caller reuses it as the fidelity reference).
    ``progress(samples done, samples total)`` is called after every batch."""
    _check_finite_parameters(graph)
    float_model = FloatModel(model, graph, tensors) if float_model is None else float_model
    tensors = float_model.tensors
    step = float_model.fixed_batch or _samples_per_run(graph, tensors, batch_size)
    exposed = set(tensors)
    wanted = [name for name in float_model.output_names if name in exposed]
    returned = set(wanted)
    in_order = [graph.input_name] + [name for name in tensors[1:] if name in returned]
    stats: dict[str, TensorStats | None] = dict.fromkeys([graph.input_name] + wanted)
    # The histogram kernels release the GIL: a run's tensors are observed on every core at once.
    with ThreadPoolExecutor(os.cpu_count() or 1) as observers:
        for start in range(0, len(data.inputs), step):
            batch = data.inputs[start : start + step]
            if len(batch) < step and float_model.fixed_batch:
                break
            results = float_model.run(batch)
            observing = [observers.submit(observe, results[name], bins, name=name) for name in in_order]
            for name, future in zip(in_order, observing):
                try:
                    observed = future.result()
                except NonFiniteError:
                    raise ModelError(f"model {graph.name!r}: tensor {name!r} is NaN or inf when the FP32 model runs "
                                     f"on the calibration data ({data.source}): weights or values beyond float32's "
                                     "range?") from None
                stats[name] = observed if stats[name] is None else merge(stats[name], observed)
            del results, observing  # this run's tensors, freed before the next run
            if progress is not None:
                progress(min(start + step, len(data.inputs)), len(data.inputs))
    if stats.get(graph.input_name) is not None:
        for name, values in float_model.constant_values().items():
            stats[name] = observe(values, bins, name=name)
    tensors = tensors + list(float_model.constants)
    missing = [name for name in tensors if stats.get(name) is None]
    if missing:
        raise DataError(f"calibration produced no statistics for {missing[:3]} (is the set smaller than the "
                        "model's fixed batch?)")
    return stats
