"""Calibration: input data for it, and per-tensor statistics of the FP32 model over that data.

The FP32 model runs in ONNX Runtime with every tensor of the lowered graph exposed as an output;
statistics are collected once (histograms merged exactly across batches), and range choice is then a
pure function of them (``tpusim.quant.ranges``).
"""
from __future__ import annotations

import math
import mmap
import os
import re
import threading
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
from tpusim.frontend.external_weights import weights_in_place
from tpusim.ir import Graph, Shape
from tpusim.quant.histogram import NonFiniteError, TensorStats, observe, observe_merged

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".tif", ".tiff")


class Samples:
    """Model inputs that are read (or drawn) a slice at a time, when a calibration or evaluation run reaches
    them: a set of any size is never held whole, so memory does not grow with the number of samples.

    It reads like a float32 array of ``shape`` (``len``, ``shape``, ``dtype``, ``np.asarray``): indexing
    with a slice returns those samples as a new array. :meth:`part` is a subset that is itself read
    lazily. ``read(start, stop)`` returns samples ``start .. stop - 1`` as a float32 array."""

    def __init__(self, count: int, sample_shape: Shape, read: Callable[[int, int], np.ndarray]):
        self._count, self.sample_shape, self._read = count, tuple(sample_shape), read
        self.dtype = np.dtype(np.float32)

    @classmethod
    def of(cls, array: np.ndarray) -> "Samples":
        array = np.asarray(array, np.float32)
        return cls(len(array), array.shape[1:], lambda start, stop: array[start:stop])

    def __len__(self) -> int:
        return self._count

    @property
    def shape(self) -> tuple[int, ...]:
        return (self._count, *self.sample_shape)

    def __getitem__(self, index: slice | int) -> np.ndarray:
        if isinstance(index, slice):
            start, stop, step = index.indices(self._count)
            if step != 1:
                raise IndexError("samples are read in contiguous slices")
            return self._read(start, max(start, stop))
        position = index + self._count if index < 0 else index
        if not 0 <= position < self._count:
            raise IndexError(f"sample {index} of {self._count}")
        return self._read(position, position + 1)[0]

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        whole = self._read(0, self._count)
        return whole if dtype is None else whole.astype(dtype, copy=False)

    def part(self, start: int, stop: int) -> "Samples":
        """Samples ``start .. stop - 1`` (clipped to the set), read when they are used."""
        start, stop, _ = slice(start, stop).indices(self._count)
        stop = max(start, stop)
        return Samples(stop - start, self.sample_shape, lambda a, b: self._read(start + a, start + b))


@dataclass(frozen=True, eq=False)
class CalibrationSet:
    inputs: Samples | np.ndarray  # (samples, *input_shape[1:]): float32 Samples, or int64 token ids held whole
    source: str
    synthetic: bool
    warnings: tuple[str, ...] = ()  # what weakens this data (few samples, converted images), one line each

    def part(self, start: int, stop: int) -> "CalibrationSet":
        """The same set restricted to samples ``start .. stop - 1``."""
        inputs = self.inputs.part(start, stop) if isinstance(self.inputs, Samples) else self.inputs[start:stop]
        return CalibrationSet(inputs, self.source, self.synthetic, self.warnings)


_DRAW_SAMPLES = 8  # synthetic samples drawn at a time: the float64 draws of a whole set would be twice its size


class _NormalDraws:
    """Reads of the seeded generator's standard-normal stream as float32 samples. The stream does not depend
    on how it is cut, so a read continues from where the last one stopped, or draws again from the seed."""

    def __init__(self, seed: int, sample_shape: Shape):
        self.seed, self.sample_shape = seed, tuple(sample_shape)
        self._rng, self._next = np.random.default_rng(seed), 0
        self._lock = threading.Lock()

    def __call__(self, start: int, stop: int) -> np.ndarray:
        out = np.empty((stop - start, *self.sample_shape), np.float32)
        with self._lock:
            if start < self._next:
                self._rng, self._next = np.random.default_rng(self.seed), 0
            while self._next < start:  # samples before ``start`` are drawn and dropped
                skipped = min(_DRAW_SAMPLES, start - self._next)
                self._rng.standard_normal((skipped, *self.sample_shape))
                self._next += skipped
            for first in range(0, len(out), _DRAW_SAMPLES):
                chunk = out[first : first + _DRAW_SAMPLES]
                chunk[...] = self._rng.standard_normal(chunk.shape)
            self._next = stop
        return out


def synthetic_inputs(sample_shape: Shape, samples: int, seed: int) -> CalibrationSet:
    """Seeded standard-normal inputs, i.e. images already normalised per channel: the generator's
    ``standard_normal((samples, *sample_shape))`` in float32, drawn ``_DRAW_SAMPLES`` samples at a time
    as they are read."""
    return CalibrationSet(Samples(samples, sample_shape, _NormalDraws(seed, sample_shape)),
                          f"synthetic N(0,1), seed {seed}, {samples} samples", synthetic=True)


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


_SCAN_BYTES = 32 * 2**20  # what checking an array file for NaN and inf reads at a time


class _NpyReads:
    """Samples of a .npy file's C-ordered array, read from the file when they are used (not memory-mapped:
    mapped pages that were read count as the process's memory until the map closes)."""

    def __init__(self, path: Path, offset: int, dtype: np.dtype, sample_shape: Shape):
        self.path, self.offset, self.file_dtype, self.sample_shape = path, offset, dtype, tuple(sample_shape)
        self.values_per_sample = math.prod(self.sample_shape)

    def __call__(self, start: int, stop: int) -> np.ndarray:
        count = (stop - start) * self.values_per_sample
        with open(self.path, "rb") as file:
            file.seek(self.offset + start * self.values_per_sample * self.file_dtype.itemsize)
            values = np.fromfile(file, dtype=self.file_dtype, count=count)
        if values.size != count:
            raise DataError(f"{self.path}: the file ends before its last sample (truncated?)")
        return values.reshape(stop - start, *self.sample_shape).astype(np.float32, copy=False)


def _npy_samples(path: Path, mapped: np.memmap, sample_shape: Shape) -> Samples:
    """A float .npy as Samples, checked as :func:`_check_array` checks an array, a slice at a time."""
    where = str(path)
    if mapped.dtype.kind not in "fiu":
        raise DataError(f"{where}: expected a numeric array, got dtype {mapped.dtype}")
    if mapped.dtype.kind in "iu":
        raise DataError(f"{where}: dtype {mapped.dtype}: expected float inputs, preprocessed as the model takes "
                        "them (for raw 8-bit pixels use a folder of images, which input_preprocessing scales and "
                        "normalises)")
    shape = (1, *mapped.shape) if mapped.shape == tuple(sample_shape) else mapped.shape
    if shape[1:] != tuple(sample_shape):
        raise DataError(f"{where}: expected samples of shape {tuple(sample_shape)} (array of shape "
                        f"(N, {', '.join(map(str, sample_shape))})), got {mapped.shape}")
    if shape[0] == 0:
        raise DataError(f"{where}: no samples")
    reads = _NpyReads(path, mapped.offset, mapped.dtype, sample_shape)
    step = max(1, _SCAN_BYTES // (reads.values_per_sample * max(mapped.dtype.itemsize, 4)))
    for first in range(0, shape[0], step):
        if not np.all(np.isfinite(reads(first, min(first + step, shape[0])))):
            raise DataError(f"{where}: contains NaN or inf")
    return Samples(shape[0], sample_shape, reads)


def _load_array_file(path: Path, sample_shape: Shape, index_rows: int | None = None) -> Samples | np.ndarray:
    """A .npy of float inputs is read a slice at a time (:class:`Samples`); token ids, a Fortran-ordered
    array and an .npz archive (its members are compressed whole) are loaded."""
    try:
        loaded = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise DataError(f"{path}: not a readable .npy/.npz file ({type(exc).__name__})") from None
    if isinstance(loaded, np.lib.npyio.NpzFile):
        with loaded:
            if not loaded.files:
                raise DataError(f"{path}: the .npz archive holds no arrays")
            arrays = np.concatenate([_check_array(loaded[name], f"{path}", sample_shape, index_rows)
                                     for name in loaded.files])
        return arrays if index_rows is not None else Samples.of(arrays)
    if index_rows is None and loaded.flags.c_contiguous:
        return _npy_samples(path, loaded, sample_shape)
    checked = _check_array(np.array(loaded), str(path), sample_shape, index_rows)
    return checked if index_rows is not None else Samples.of(checked)


_CHANNEL_MODES = {1: "L", 3: "RGB"}


class _ImageReads:
    """A folder's images as model inputs, decoded and normalised when they are used."""

    def __init__(self, files: list[Path], sample_shape: Shape, prep: InputPreprocessingConfig):
        self.files, (self.channels, self.height, self.width) = files, sample_shape
        self.pixel_scale = np.float32(prep.pixel_scale)
        self.mean = np.asarray(prep.mean, np.float32).reshape(-1, 1, 1)
        self.std = np.asarray(prep.std, np.float32).reshape(-1, 1, 1)

    def __call__(self, start: int, stop: int) -> np.ndarray:
        from PIL import Image, UnidentifiedImageError

        out = np.empty((stop - start, self.channels, self.height, self.width), np.float32)
        for row, file in enumerate(self.files[start:stop]):
            try:
                with Image.open(file) as image:
                    image = image.convert(_CHANNEL_MODES[self.channels]).resize((self.width, self.height),
                                                                                Image.BILINEAR)
                    pixels = np.asarray(image, dtype=np.float32)
            except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError) as exc:
                raise DataError(f"{file}: not a readable image ({type(exc).__name__})") from None
            pixels = pixels.reshape(self.height, self.width, self.channels).transpose(2, 0, 1) / self.pixel_scale
            out[row] = (pixels - self.mean) / self.std
        return out


def _load_image_folder(folder: Path, sample_shape: Shape,
                       prep: InputPreprocessingConfig) -> tuple[Samples, list[str]]:
    """The images as model inputs (decoded when used; their headers are read now), and a line for each way
    they had to be changed to fit the model."""
    from PIL import Image, UnidentifiedImageError

    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)}) in the folder")
    if len(sample_shape) != 3:
        raise DataError(f"{folder}: images need an image model (C, H, W input), but the input is {sample_shape}")
    channels, height, width = sample_shape
    if channels not in _CHANNEL_MODES:
        raise DataError(f"{folder}: images give 1 or 3 channels, but the model wants {channels}")
    if len(prep.mean) not in (1, channels) or len(prep.std) not in (1, channels):
        raise DataError(f"input_preprocessing: mean/std need 1 or {channels} values")
    target = _CHANNEL_MODES[channels]
    converted: dict[str, int] = {}
    resized: dict[tuple[int, int], int] = {}
    for file in files:
        try:
            with Image.open(file) as image:
                if image.mode != target and image.mode not in (("RGBA", "P", "CMYK", "YCbCr") if target == "RGB" else ()):
                    converted[image.mode] = converted.get(image.mode, 0) + 1
                if image.size != (width, height):
                    resized[image.size] = resized.get(image.size, 0) + 1
        except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError) as exc:
            raise DataError(f"{file}: not a readable image ({type(exc).__name__})") from None
    notes = []
    if converted:
        modes = ", ".join(f"{count} {mode}" for mode, count in sorted(converted.items()))
        notes.append(f"{folder}: {sum(converted.values())} of {len(files)} images are not {target} ({modes}) and were "
                     f"converted to the model's {channels} channel{'s' if channels > 1 else ''}")
    if resized:
        sizes = ", ".join(f"{count} of {w}x{h}" for (w, h), count in sorted(resized.items()))
        notes.append(f"{folder}: {sum(resized.values())} of {len(files)} images resized to the model's {width}x{height} "
                     f"({sizes})")
    return Samples(len(files), sample_shape, _ImageReads(files, sample_shape, prep)), notes


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


@dataclass(frozen=True)
class ModelFile:
    """An ONNX model file: ONNX Runtime gets its bytes, read when a session is made, and reads its weights
    from the file or its external data files itself where it can (:func:`model_for_onnxruntime`)."""

    path: Path


def _session_exposing(model: onnx.ModelProto | ModelFile, tensors: list[str],
                      present: set[str] | None = None) -> ort.InferenceSession:
    """A session of ``model`` with ``tensors`` as extra outputs (but those in ``present``: the model's inputs
    and outputs; read from a ModelProto when not given).

    A ModelProto gets the outputs only while it is serialised: a copy of the model (its weights) would
    double what calibration holds. A model file's bytes get them appended as a second ``graph`` field: a
    protobuf parser merges repeated occurrences of a message field, appending their repeated fields, so
    ONNX Runtime reads one graph with the extra outputs and no copy is parsed here. Where ONNX Runtime can
    read external data of a model given as bytes, the file's large weights stay in it
    (:func:`tpusim.frontend.external_weights.weights_in_place`): ResNet-50's session 0.32-0.41 -> 0.12-0.16 s,
    the run's peak 110 MiB less. Else the bytes are copied once, from a memory map of the file, with the field
    after them (reading the file, then appending, would copy them twice: BERT-base, 440 MB more memory to
    fault in)."""
    if present is None:
        if not isinstance(model, onnx.ModelProto):
            raise TypeError("a model file needs the names of its inputs and outputs (present)")
        present = {o.name for o in model.graph.output} | {i.name for i in model.graph.input}
    added = [onnx.helper.make_empty_tensor_value_info(name) for name in tensors if name not in present]
    if isinstance(model, onnx.ModelProto):
        outputs = model.graph.output
        outputs.extend(added)
        try:
            serialized = model.SerializeToString()
        finally:
            del outputs[len(outputs) - len(added):]
    else:
        appended = onnx.ModelProto()
        appended.graph.output.extend(added)
        # A file's external data files are beside the name it was given (a symlink's beside the link, as onnx.load
        # finds them); its weights left in place are read from the file itself, which a link may not be beside.
        folder = str(Path(model.path).absolute().parent) if _READS_EXTERNAL_DATA_OF_BYTES else None
        if folder is not None:
            # The weights stay in the file, ONNX Runtime reads them from there (ResNet-50's session
            # 0.32-0.41 -> 0.12-0.16 s; the same tensors, bit for bit)
            stored = Path(model.path).resolve()
            in_place = weights_in_place(stored, appended.SerializeToString())
            if in_place is not None:
                try:
                    return ort.InferenceSession(in_place, _session_options(str(stored.parent)),
                                                providers=["CPUExecutionProvider"])
                except Exception:  # (anything ONNX Runtime refuses there gets the whole bytes, and its own error)
                    pass
        with open(model.path, "rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            serialized = b"".join((mapped, appended.SerializeToString()))
        # (a file with external data files: ONNX Runtime reads those from the file's folder)
        return ort.InferenceSession(serialized, _session_options(folder), providers=["CPUExecutionProvider"])
    return ort.InferenceSession(serialized, _session_options(), providers=["CPUExecutionProvider"])


def _session_options(external_data_folder: str | None = None) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    # Between runs tpusim computes (histograms, integer layers): ONNX Runtime's threads must not spin on the
    # cores meanwhile, so they stop spinning as each run ends. Within a run they spin between its parallel
    # sections (ResNet-50: 36.7 against 41.0 ms a run put to sleep in each). Its memory pattern (a planned
    # block for a run's tensors) would be kept beside the arena that serves the same tensors (ResNet-50:
    # 66 MB more, and no faster).
    options.add_session_config_entry("session.intra_op.allow_spinning", "1")
    options.add_session_config_entry("session.force_spinning_stop", "1")
    options.enable_mem_pattern = False
    if external_data_folder is not None:
        options.add_session_config_entry("session.model_external_initializers_file_folder_path", external_data_folder)
    return options


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text)[:2])


# A model given as bytes finds its external data in a folder named by a session option from ONNX Runtime 1.21 on
# (its pull request 23557); before, a relative location would be looked up from the working directory.
_READS_EXTERNAL_DATA_OF_BYTES = _version(ort.__version__) >= (1, 21)


# An ``external_data`` entry with the key "location" (field 1, 8 bytes): a tensor whose weights are in a file
# beside the model. A stray match only costs the slower path that loads the files.
_EXTERNAL_DATA_KEY = b"\n\x08location"


def model_for_onnxruntime(path: str | Path, external_data: bool | None = None) -> onnx.ModelProto | ModelFile:
    """The model at ``path`` as :class:`FloatModel` takes it: the file, unless its weights are in external
    data files and this ONNX Runtime cannot read those of a model given as bytes (then loaded with them, as
    a ModelProto; ViT-B/16's 346 MB: its session 1.67 s against 0.26 s from the file). ``external_data``:
    whether they are, as the lowering of that file found (:attr:`tpusim.ir.Graph.external_data`); where not
    known (None) the file (lowered already, so not empty) is searched for an external-data entry in a memory
    map, not read (BERT-base's 436 MB: 0.3 s)."""
    if _READS_EXTERNAL_DATA_OF_BYTES:
        return ModelFile(Path(path))
    if external_data is None:
        with open(path, "rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            external_data = mapped.find(_EXTERNAL_DATA_KEY) != -1
    return onnx.load(str(path)) if external_data else ModelFile(Path(path))


def _check_finite_parameters(graph: Graph) -> None:
    """NaN or inf in a layer's weights or bias (after batch norm folding) cannot be quantized: say which."""
    for layer in graph.layers:
        for what, values in (("weights", layer.weight), ("bias", layer.bias)):
            # a NaN or inf reaches the extremes: two passes without a temporary (BERT-base: 110 M weights)
            if values is not None and values.size and not (np.isfinite(values.min()) and np.isfinite(values.max())):
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

    def __init__(self, model: onnx.ModelProto | ModelFile, graph: Graph, tensors: list[str] | None = None):
        tensors = graph_tensors(graph) if tensors is None else tensors
        self.graph = graph
        self.constants = {layer.output: layer for layer in graph.layers if not layer.inputs and layer.output in tensors}
        self.tensors = [name for name in tensors if name not in self.constants]
        # A model file is not parsed here: the graph's input and outputs keep their ONNX names. Should
        # the model have another output among the tensors, ONNX Runtime returns it twice, the same values.
        present = None if isinstance(model, onnx.ModelProto) else {graph.input_name, *graph.outputs}
        self.session = _session_exposing(model, self.tensors, present)
        shape = self.session.get_inputs()[0].shape
        self.fixed_batch = shape[0] if shape and isinstance(shape[0], int) and shape[0] > 0 else None
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


def collect_statistics(model: onnx.ModelProto | ModelFile | None, graph: Graph, data: CalibrationSet, bins: int,
                       batch_size: int = 8, progress: Callable[[int, int], None] | None = None,
                       tensors: list[str] | None = None, float_model: FloatModel | None = None) -> dict[str, TensorStats]:
    """Run the FP32 model over the calibration set and return merged statistics per graph tensor
    (or only per tensor of ``tensors``, which must include the graph input).

    The data run through ONNX Runtime in batches of ``batch_size`` samples (the model's fixed batch if it
    has one; fewer for a large model, see :func:`_samples_per_run`); each tensor of a batch is observed,
    merged and dropped, so memory does not grow with the number of samples. ``float_model``: a session of
    ``model`` exposing ``tensors`` already made (the caller reuses it as the fidelity reference; ``model``
    may then be None).
    ``progress(samples done, samples total)`` is called after every batch."""
    _check_finite_parameters(graph)
    float_model = FloatModel(model, graph, tensors) if float_model is None else float_model
    del model  # ONNX Runtime has its own copy; a caller that passed the model without keeping it frees it now
    tensors = float_model.tensors
    step = float_model.fixed_batch or _samples_per_run(graph, tensors, batch_size)
    exposed = set(tensors)
    wanted = [name for name in float_model.output_names if name in exposed]
    returned = set(wanted)
    in_order = [graph.input_name] + [name for name in tensors[1:] if name in returned]
    stats: dict[str, TensorStats | None] = dict.fromkeys([graph.input_name] + wanted)
    workers = os.cpu_count() or 1
    # The histogram kernels release the GIL: a run's tensors are observed on every core at once, each core taking
    # every workers-th tensor in one task (a task per tensor, 74 for ResNet-50, handed the GIL between the threads
    # and the caller about as often: the observing took 0.48 against 0.37 s of its calibration).
    shares = [in_order[first::workers] for first in range(workers)]

    def observed(share: list[str], results: dict[str, np.ndarray]) -> list[TensorStats | NonFiniteError]:
        seen: list[TensorStats | NonFiniteError] = []
        for name in share:
            try:
                seen.append(observe(results[name], bins, name=name) if stats[name] is None
                            else observe_merged(stats[name], results[name], name=name))
            except NonFiniteError as exc:
                seen.append(exc)
        return seen

    with ThreadPoolExecutor(workers) as observers:
        for start in range(0, len(data.inputs), step):
            batch = data.inputs[start : start + step]
            if len(batch) < step and float_model.fixed_batch:
                break
            results = float_model.run(batch)
            observing = [observers.submit(observed, share, results) for share in shares]
            outcomes = dict(zip([name for share in shares for name in share],
                                [seen for future in observing for seen in future.result()]))
            for name in in_order:  # the first tensor in the graph's order that is NaN or inf is the one named
                if isinstance(outcomes[name], NonFiniteError):
                    raise ModelError(f"model {graph.name!r}: tensor {name!r} is NaN or inf when the FP32 model runs "
                                     f"on the calibration data ({data.source}): weights or values beyond float32's "
                                     "range?")
                stats[name] = outcomes[name]
            del results, observing, outcomes  # this run's tensors, freed before the next run
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
