"""Per-tensor vs per-channel int8 on real trained weights with real inputs: the README's table.

    python3 benchmarks/real_weights_compare.py [--out results/real-weights] [--eval-views 80] [MODEL ...]

Models (all with their published trained weights; MODEL names one of them, default all):

- ``resnet8``: MLPerf Tiny's CIFAR-10 ResNet-8 (``../shared/mlperf_tiny/pretrainedResnet.tflite``),
- ``vww``: MLPerf Tiny's Visual Wake Words MobileNetV1-0.25 (``vww_96_float.tflite``),
  both converted by tflite2onnx, inputs scaled as their int8 TFLite twins' input grids say (ResNet-8
  takes raw 0-255 pixels: scale 1, zero point -128; VWW takes 0-1: scale 1/255);
- ``efficientnet_lite0``: the ImageNet-trained EfficientNet-Lite0 of the accuracy table (built-in
  workload), ImageNet-normalised inputs.

Inputs are the real photos scikit-learn and matplotlib ship (``tpusim.accuracy.sample_photos``: four
photos), no download: ``quant.calibration_samples`` (32) random crops of 30-70 % of the shorter side
calibrate, and ``--eval-views`` other views (centre, corner and random crops, each also mirrored)
measure agreement with FP32. Each model goes through ``tpusim compare`` (its Python API) with
per-tensor and per-channel weights x percentile and MSE calibration on TPU v1, no FP32 baseline
(``--baseline none``: only fidelity differs between the cells). The two MLPerf Tiny models also run on
the activation ranges their int8 TFLite twins carry (the authors' calibration on CIFAR-10 / VWW): the
float model with a QuantizeLinear/DequantizeLinear pair on each of those grids, weights quantized per
tensor or per channel by tpusim, scored on the same views.

The second table is weight-only and needs no inputs: over every conv/GEMM of each model (BN folded,
as the chip sees it), how far apart the output channels' ranges are (largest over median per-channel
max |w|, and how many channels one tensor-wide scale leaves with fewer than 8 int8 levels) and the
weight SQNR of symmetric int8 per tensor vs per channel; it also covers the generator's ResNet-50 and
MobileNet-v2, to set the generator's spread against trained weights.

The whole run takes about half a minute on two cores (33 s on 2026-12-02; 6-15 minutes before the depthwise
convs had a kernel of their own), most of it EfficientNet-Lite0's integer execution at 224x224.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from tpusim.config import load_config
from tpusim.report.files import atomic_write_csv

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import corpus  # noqa: E402  (tests/corpus.py: where the MLPerf Tiny folder is)

CONFIG = ROOT / "configs" / "tpu_v1.yaml"
CALIBRATION_SAMPLES = load_config(CONFIG).quant.calibration_samples  # the first rows of the input file calibrate
CALIBRATIONS = ("percentile", "mse")
SEED = 0


@dataclass(frozen=True)
class RealModel:
    name: str
    label: str
    source: str  # a .tflite file of the MLPerf Tiny folder, or a built-in workload name
    size: int  # input side in pixels
    preprocess: Callable[[np.ndarray], np.ndarray]  # (N, S, S, 3) uint8 -> (N, 3, S, S) float32
    int8_twin: str | None = None  # the full-int8 TFLite file of the same network, if MLPerf Tiny ships one


def _raw_pixels(pixels: np.ndarray) -> np.ndarray:
    return pixels.astype(np.float32).transpose(0, 3, 1, 2)


def _unit_pixels(pixels: np.ndarray) -> np.ndarray:
    return (pixels.astype(np.float32) / np.float32(255.0)).transpose(0, 3, 1, 2)


def _imagenet(pixels: np.ndarray) -> np.ndarray:
    from tpusim.accuracy import normalise

    return normalise(pixels)


MODELS = (
    RealModel("resnet8", "ResNet-8, CIFAR-10 (MLPerf Tiny)", "pretrainedResnet.tflite", 32, _raw_pixels,
              "pretrainedResnet_quant.tflite"),
    RealModel("vww", "MobileNetV1-0.25, Visual Wake Words (MLPerf Tiny)", "vww_96_float.tflite", 96, _unit_pixels,
              "vww_96_int8.tflite"),
    RealModel("efficientnet_lite0", "EfficientNet-Lite0, ImageNet", "efficientnet_lite0", 224, _imagenet),
)
GENERATED = (("resnet50", "ResNet-50 (generator)"), ("mobilenet_v2", "MobileNet-v2 (generator)"))


# ---- inputs ---------------------------------------------------------------------------------------


def _square(photo: np.ndarray, top: int, left: int, side: int, size: int) -> np.ndarray:
    from PIL import Image

    crop = np.ascontiguousarray(photo[top : top + side, left : left + side])
    return np.asarray(Image.fromarray(crop).resize((size, size), Image.BILINEAR))


def calibration_crops(photos: dict[str, np.ndarray], count: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """Random squares of 30-70 % of the shorter side, photo after photo."""
    items = list(photos.values())
    crops = []
    for index in range(count):
        photo = items[index % len(items)]
        h, w = photo.shape[:2]
        side = int(min(h, w) * rng.uniform(0.3, 0.7))
        crops.append(_square(photo, int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1)), side, size))
    return np.stack(crops)


def evaluation_views(photos: dict[str, np.ndarray], count: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """Per photo: the centre and four corner squares of 87.5 % of the shorter side, then random squares of
    40-90 %; each view also mirrored; cycled over the photos until ``count`` views."""
    per_photo = -(-count // (2 * len(photos)))
    views_by_photo = []
    for photo in photos.values():
        h, w = photo.shape[:2]
        side = int(0.875 * min(h, w))
        places = [((h - side) // 2, (w - side) // 2), (0, 0), (0, w - side), (h - side, 0), (h - side, w - side)]
        squares = [(top, left, side) for top, left in places]
        while len(squares) < per_photo:
            s = int(min(h, w) * rng.uniform(0.4, 0.9))
            squares.append((int(rng.integers(0, h - s + 1)), int(rng.integers(0, w - s + 1)), s))
        views = []
        for top, left, s in squares[:per_photo]:
            view = _square(photo, top, left, s, size)
            views += [view, view[:, ::-1]]
        views_by_photo.append(views)
    interleaved = [view for group in zip(*views_by_photo) for view in group]
    return np.stack(interleaved[:count])


def input_files(model: RealModel, eval_views: int, folder: Path) -> tuple[Path, Path]:
    """Calibration crops then evaluation views, as ``tpusim compare --calib-data`` splits them; and the
    evaluation views alone, for a model that brings its own quantization (nothing to calibrate)."""
    from tpusim.accuracy import sample_photos

    photos = sample_photos()
    rng = np.random.default_rng(SEED)
    crops = calibration_crops(photos, CALIBRATION_SAMPLES, model.size, rng)
    views = model.preprocess(evaluation_views(photos, eval_views, model.size, rng))
    both, alone = folder / f"{model.name}_inputs.npy", folder / f"{model.name}_views.npy"
    np.save(both, np.ascontiguousarray(np.concatenate([model.preprocess(crops), views])))
    np.save(alone, np.ascontiguousarray(views))
    return both, alone


def model_file(model: RealModel, folder: Path) -> str:
    if not model.source.endswith(".tflite"):
        return model.source
    import tflite2onnx

    path = folder / f"{model.name}.onnx"
    tflite2onnx.convert(str(corpus.mlperf_tiny_dir() / model.source), str(path))
    return str(path)


# ---- the authors' own activation ranges ---------------------------------------------------------------

_TFLITE_IO_SUFFIX = "_int8"  # the int8 twin names its graph input and output <float name>_int8


def tflite_activation_grids(path: Path) -> dict[str, tuple[float, int]]:
    """(scale, int8 zero point) of the graph input and of every op output of a full-int8 TFLite file, by the
    float model's tensor name (tflite2onnx keeps TFLite's names; a fused conv + ReLU's output is its ReLU's)."""
    import tflite

    model = tflite.Model.GetRootAsModel(path.read_bytes(), 0)
    graph = model.Subgraphs(0)
    grids = {}
    for index in [graph.Inputs(0)] + [graph.Operators(i).Outputs(0) for i in range(graph.OperatorsLength())]:
        tensor = graph.Tensors(index)
        quantization = tensor.Quantization()
        if quantization is None or quantization.ScaleLength() != 1:
            continue
        name = tensor.Name().decode().removesuffix(_TFLITE_IO_SUFFIX)
        grids[name] = (float(quantization.ScaleAsNumpy()[0]), int(quantization.ZeroPointAsNumpy()[0]))
    return grids


def with_activation_grids(path: str, grids: dict[str, tuple[float, int]], out: Path) -> Path:
    """The float ONNX model with QuantizeLinear -> DequantizeLinear on every tensor ``grids`` names, on the
    same grid as uint8 (int8 zero point + 128); weights stay float, so tpusim quantizes them as its config says."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(path)
    graph = model.graph
    nodes, initializers = [], list(graph.initializer)
    input_name = graph.input[0].name

    def qdq(tensor: str, quantized: str, dequantized: str) -> list:
        """Q/DQ of ``quantized`` on the grid of ``tensor``."""
        scale, zero_point = grids[tensor]
        names = (f"{tensor}__scale", f"{tensor}__zero_point")
        initializers.append(numpy_helper.from_array(np.array(scale, np.float32), names[0]))
        initializers.append(numpy_helper.from_array(np.array(zero_point + 128, np.uint8), names[1]))
        return [helper.make_node("QuantizeLinear", [quantized, *names], [f"{tensor}__q"], name=f"{tensor}__Q"),
                helper.make_node("DequantizeLinear", [f"{tensor}__q", *names], [dequantized], name=f"{tensor}__DQ")]

    # Consumers read the dequantized copy; a graph output keeps its name on the DQ, its producer's is renamed.
    outputs = {value.name for value in graph.output}
    read_as = {name: f"{name}__dq" for name in grids if name not in outputs}
    nodes += qdq(input_name, input_name, read_as[input_name])
    for node in graph.node:
        node.input[:] = [read_as.get(name, name) for name in node.input]
        gridded = [name for name in node.output if name in grids]
        node.output[:] = [f"{name}__float" if name in outputs and name in grids else name for name in node.output]
        nodes.append(node)
        for name in gridded:
            nodes += qdq(name, f"{name}__float", name) if name in outputs else qdq(name, name, read_as[name])
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.initializer[:]
    graph.initializer.extend(initializers)
    onnx.checker.check_model(model)
    onnx.save(model, str(out))
    return out


def own_grid_rows(model: RealModel, path: str, views: Path, eval_views: int, folder: Path) -> list[dict]:
    """Both weight granularities on the activation ranges MLPerf Tiny's int8 twin carries (its authors'
    calibration on the model's own training data), on the same evaluation views."""
    from tpusim import api

    grids = tflite_activation_grids(corpus.mlperf_tiny_dir() / model.int8_twin)
    gridded = with_activation_grids(path, grids, folder / f"{model.name}_tflite_grids.onnx")
    rows = []
    for weights in ("per-tensor", "per-channel"):
        summary = api.simulate(CONFIG, gridded, overrides={"quant.weights": weights}, calib_data=str(views),
                               eval_samples=eval_views).summary
        if summary["calibration"]["source"] != "none: the quantization came from the model":
            raise RuntimeError(f"{model.name}: the int8 twin left tensors to calibrate: {summary['calibration']['source']}")
        f = summary["fidelity"]
        rows.append({"model": model.label, "weights": weights, "calibration": f"{model.int8_twin} ranges",
                     "top1_agreement": f["top1_agreement"], "top5_agreement": f["top5_agreement"],
                     "output_sqnr_db": round(f["output_sqnr_db"], 3), "cosine": round(f["cosine"], 6),
                     "eval_views": eval_views, "calibration_data": "the int8 twin's activation ranges"})
    return rows


# ---- weight-only statistics --------------------------------------------------------------------------


# A channel whose max |w| is below this fraction of its layer's keeps fewer than 8 of int8's 127 levels per
# side when one scale serves the whole tensor.
STARVED_FRACTION = 8 / 127
# Below this fraction a channel is dead (trained to zero; VWW's pointwise convs hold many, ~1e-30 after BN
# folding): it quantizes to 0 under either granularity and says nothing about the choice.
DEAD_FRACTION = 1e-6


@dataclass(frozen=True)
class WeightStats:
    kind: str  # "depthwise" or "other conv/GEMM"
    layers: int
    dead_channel_pct: float  # channels below DEAD_FRACTION of their layer's largest, % of all channels
    median_spread: float  # median over layers of (largest / median) per-channel max |w| of the live channels
    starved_channel_pct: float  # live channels below STARVED_FRACTION of their layer's largest, % of live channels
    median_sqnr_tensor_db: float
    median_sqnr_channel_db: float
    worst_sqnr_tensor_db: float


def _int8_sqnr_db(weight: np.ndarray, per_channel: bool) -> float:
    """Symmetric int8 in [-127, 127], scale max |w| / 127 over the tensor or each output channel (axis 0)."""
    w = weight.reshape(weight.shape[0], -1).astype(np.float64)
    peak = np.abs(w).max(axis=1, keepdims=True) if per_channel else np.abs(w).max(keepdims=True)
    scale = np.where(peak > 0, peak / 127.0, 1.0)
    error = w - np.clip(np.round(w / scale), -127, 127) * scale
    return float(10 * np.log10(np.sum(w**2) / max(np.sum(error**2), np.finfo(float).tiny)))


def weight_stats(onnx_model, where: str) -> list[WeightStats]:
    """Per kind of matrix layer of the lowered graph (BN folded into the weights, as the chip sees them)."""
    from tpusim.frontend import lower_model

    graph = lower_model(onnx_model, where, batch=1)
    by_kind: dict[str, list[tuple[int, int, float, int, float, float]]] = {}
    for layer in graph.layers:
        if layer.weight is None or layer.op not in ("conv", "gemm"):
            continue
        weight = np.asarray(layer.weight, np.float64)
        peaks = np.abs(weight.reshape(weight.shape[0], -1)).max(axis=1)
        live = peaks[peaks >= DEAD_FRACTION * peaks.max()]
        depthwise = layer.conv is not None and layer.conv.groups > 1 and weight.shape[1] == 1
        by_kind.setdefault("depthwise" if depthwise else "other conv/GEMM", []).append((
            len(peaks), len(live), float(live.max() / np.median(live)), int(np.sum(live < STARVED_FRACTION * live.max())),
            _int8_sqnr_db(weight, False), _int8_sqnr_db(weight, True)))
    stats = []
    for kind in ("other conv/GEMM", "depthwise"):
        rows = np.array(by_kind.get(kind, []))
        if len(rows):
            channels, live = rows[:, 0].sum(), rows[:, 1].sum()
            stats.append(WeightStats(kind, len(rows), float(100 * (channels - live) / channels),
                                     float(np.median(rows[:, 2])), float(100 * rows[:, 3].sum() / live),
                                     float(np.median(rows[:, 4])), float(np.median(rows[:, 5])), float(rows[:, 4].min())))
    return stats


def _onnx_model(source: str):
    import onnx

    from tpusim.workloads import build_model

    return onnx.load(source) if source.endswith(".onnx") else build_model(source)


def weight_table(sources: list[tuple[str, str]]) -> str:
    lines = ["| model | layers | dead channels | largest / median live channel range (median layer) | live "
             "channels left < 8 levels per tensor | weight SQNR per-tensor / per-channel (median layer, dB) | worst "
             "layer per-tensor (dB) |", "|---|---|---:|---:|---:|---:|---:|"]
    for label, source in sources:
        for s in weight_stats(_onnx_model(source), label):
            lines.append(f"| {label} | {s.layers} {s.kind} | {s.dead_channel_pct:.1f} % | {s.median_spread:.1f} | "
                         f"{s.starved_channel_pct:.1f} % | "
                         f"{s.median_sqnr_tensor_db:.1f} / {s.median_sqnr_channel_db:.1f} | "
                         f"{s.worst_sqnr_tensor_db:.1f} |")
    return "\n".join(lines)


# ---- the compare grid -----------------------------------------------------------------------------------


COLUMNS = ("model", "weights", "calibration", "top1_agreement", "top5_agreement", "output_sqnr_db", "cosine",
           "eval_views", "calibration_data")


def compare_rows(model: RealModel, path: str, inputs: Path, eval_views: int) -> list[dict]:
    from tpusim.compare import CompareRequest, compare

    request = CompareRequest(config=CONFIG, model=path, calibrations=CALIBRATIONS, baseline=None,
                             calib_data=str(inputs), eval_samples=eval_views, progress=False)
    return [{"model": model.label, **{k: row[k] for k in COLUMNS[1:-2]}, "eval_views": eval_views,
             "calibration_data": f"{CALIBRATION_SAMPLES} photo crops"} for row in compare(request)]


def compare_table(rows: list[dict]) -> str:
    lines = ["| model | weights | calibration | top-1 agreement with FP32 | top-5 | output SQNR (dB) |",
             "|---|---|---|---:|---:|---:|"]
    for r in rows:
        views = r["eval_views"]
        lines.append(f"| {r['model']} | {r['weights']} | {r['calibration']} | "
                     f"{round(r['top1_agreement'] * views)}/{views} | {round(r['top5_agreement'] * views)}/{views} | "
                     f"{r['output_sqnr_db']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="*", help=f"any of {', '.join(m.name for m in MODELS)} (default all)")
    parser.add_argument("--eval-views", type=int, default=80, help="photo views that measure fidelity (default 80)")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "real-weights")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.models) - {m.name for m in MODELS})
    if unknown:
        parser.error(f"unknown model {', '.join(unknown)} (expected {', '.join(m.name for m in MODELS)})")
    chosen = [m for m in MODELS if not args.models or m.name in args.models]
    start = time.perf_counter()

    def say(message: str) -> None:
        print(f"[{time.perf_counter() - start:7.1f} s] {message}", file=sys.stderr, flush=True)

    rows: list[dict] = []
    sources: list[tuple[str, str]] = []
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for model in chosen:
            path = model_file(model, Path(tmp))
            sources.append((model.label, path))
            say(f"{model.label}: {len(CALIBRATIONS) * 2} compare cells on {args.eval_views} photo views")
            both, views = input_files(model, args.eval_views, Path(tmp))
            rows += compare_rows(model, path, both, args.eval_views)
            if model.int8_twin is not None:
                say(f"{model.label}: both granularities on the ranges of {model.int8_twin}")
                rows += own_grid_rows(model, path, views, args.eval_views, Path(tmp))
        say("weight statistics")
        weights = weight_table(sources + [(label, name) for name, label in GENERATED])
    atomic_write_csv(args.out / "real_weights_compare.csv", COLUMNS, rows)
    print(compare_table(rows) + "\n\n" + weights)
    say("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
