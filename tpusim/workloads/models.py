"""Generators for the built-in workloads.

The CNN topologies follow torchvision exactly (layer order, strides, channel counts, which convs
carry a BN), so parameter and MAC counts equal the published ones; only the weights are synthetic.
Each generator takes a seed and returns a :class:`GeneratedModel`.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

from tpusim.workloads import GENERATOR_VERSION
from tpusim.workloads.builder import (
    DEPTHWISE_GAMMA_SIGMA,
    GAMMA_SIGMA,
    GeneratedModel,
    GraphBuilder,
    synthetic_images,
)

IMAGENET_CLASSES = 1000
# Images used for BN statistics: enough pixels per channel even at ResNet's 7x7 last stage,
# few enough that ResNet-50 builds in seconds.
IMAGENET_SAMPLE_BATCH = 2
LOGIT_STD = 2.0  # a confident but not saturated classifier
MLP_WIDTH = 2048
# Trained ResNets end each residual branch with a small BN gain (torchvision even offers zero-init),
# so a block perturbs its input rather than replacing it. With unit gains a random deep ResNet is
# chaotic: any perturbation, int8 rounding included, grows block by block, which no trained net does.
RESIDUAL_GAMMA = 0.25
MLP_LAYERS = 5
MLP_SAMPLE_BATCH = 16
TINY_SAMPLE_BATCH = 8
TINY_CLASSES = 10


def _streams(seed: int) -> tuple[int, np.random.Generator]:
    """Separate seeds for weights and sample data, so changing one model's data draw cannot shift its weights."""
    sequence = np.random.SeedSequence(seed)
    weight_seq, data_seq = sequence.spawn(2)
    return int(weight_seq.generate_state(1)[0]), np.random.default_rng(data_seq)


def _conv_bn(
    b: GraphBuilder, x: str, out_channels: int, kernel: int, *, conv: str, bn: str, stride: int = 1, groups: int = 1,
    gamma_scale: float = 1.0,
) -> str:
    y = b.conv(x, out_channels, kernel, name=conv, stride=stride, groups=groups)
    return b.batch_norm(y, name=bn, gamma_sigma=DEPTHWISE_GAMMA_SIGMA if groups > 1 else GAMMA_SIGMA,
                        gamma_scale=gamma_scale)


def _classifier_head(b: GraphBuilder, x: str, classes: int) -> str:
    return b.gemm(b.flatten(b.global_avgpool(x)), classes, name="fc", target_std=LOGIT_STD)


# ---- ResNet (torchvision.models.resnet) -------------------------------------------------------


def _basic_block(b: GraphBuilder, x: str, planes: int, stride: int, prefix: str) -> str:
    in_channels = b.value(x).shape[1]
    y = b.relu(_conv_bn(b, x, planes, 3, conv=f"{prefix}.conv1", bn=f"{prefix}.bn1", stride=stride))
    y = _conv_bn(b, y, planes, 3, conv=f"{prefix}.conv2", bn=f"{prefix}.bn2", gamma_scale=RESIDUAL_GAMMA)
    shortcut = x
    if stride != 1 or in_channels != planes:
        shortcut = _conv_bn(b, x, planes, 1, conv=f"{prefix}.downsample.0", bn=f"{prefix}.downsample.1", stride=stride)
    return b.relu(b.add(y, shortcut))


def _bottleneck(b: GraphBuilder, x: str, planes: int, stride: int, prefix: str) -> str:
    """ResNet v1.5: the stride sits on the 3x3 conv, not the first 1x1."""
    in_channels = b.value(x).shape[1]
    out_channels = planes * 4
    y = b.relu(_conv_bn(b, x, planes, 1, conv=f"{prefix}.conv1", bn=f"{prefix}.bn1"))
    y = b.relu(_conv_bn(b, y, planes, 3, conv=f"{prefix}.conv2", bn=f"{prefix}.bn2", stride=stride))
    y = _conv_bn(b, y, out_channels, 1, conv=f"{prefix}.conv3", bn=f"{prefix}.bn3", gamma_scale=RESIDUAL_GAMMA)
    shortcut = x
    if stride != 1 or in_channels != out_channels:
        shortcut = _conv_bn(
            b, x, out_channels, 1, conv=f"{prefix}.downsample.0", bn=f"{prefix}.downsample.1", stride=stride
        )
    return b.relu(b.add(y, shortcut))


Block = Callable[[GraphBuilder, str, int, int, str], str]  # (builder, input, planes, stride, prefix) -> output


def _resnet(seed: int, name: str, block: Block, blocks_per_stage: tuple[int, ...], doc: str) -> GeneratedModel:
    weight_seed, data_rng = _streams(seed)
    b = GraphBuilder(synthetic_images(data_rng, IMAGENET_SAMPLE_BATCH, 3, 224), weight_seed)
    x = b.relu(_conv_bn(b, "input", 64, 7, conv="conv1", bn="bn1", stride=2))
    x = b.maxpool(x, kernel=3, stride=2, pad=1)
    for stage, (planes, blocks) in enumerate(zip((64, 128, 256, 512), blocks_per_stage), start=1):
        for index in range(blocks):
            stride = 2 if stage > 1 and index == 0 else 1
            x = block(b, x, planes, stride, f"layer{stage}.{index}")
    out = _classifier_head(b, x, IMAGENET_CLASSES)
    return b.finish(out, graph_name=name, doc=doc, seed=seed, generator_version=GENERATOR_VERSION)


def resnet50(seed: int) -> GeneratedModel:
    return _resnet(
        seed, "resnet50", _bottleneck, (3, 4, 6, 3), "ResNet-50 v1.5 (torchvision topology), synthetic weights"
    )


def resnet18(seed: int) -> GeneratedModel:
    return _resnet(seed, "resnet18", _basic_block, (2, 2, 2, 2), "ResNet-18 (torchvision topology), synthetic weights")


# ---- MobileNet-v2 (torchvision.models.mobilenetv2, width 1.0) ------------------------------------

# (expansion t, output channels c, repeats n, first stride s), from the MobileNet-v2 paper, Table 2.
MOBILENET_V2_STAGES = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


def _relu6(b: GraphBuilder, x: str) -> str:
    return b.clip(x, 0.0, 6.0)


def _inverted_residual(b: GraphBuilder, x: str, out_channels: int, stride: int, expansion: int, index: int) -> str:
    in_channels = b.value(x).shape[1]
    hidden = in_channels * expansion
    prefix = f"features.{index}.conv"
    y, layer = x, 0
    if expansion != 1:
        y = _relu6(b, _conv_bn(b, y, hidden, 1, conv=f"{prefix}.0.0", bn=f"{prefix}.0.1"))
        layer = 1
    y = _relu6(b, _conv_bn(b, y, hidden, 3, conv=f"{prefix}.{layer}.0", bn=f"{prefix}.{layer}.1", stride=stride, groups=hidden))
    residual = stride == 1 and in_channels == out_channels
    y = _conv_bn(b, y, out_channels, 1, conv=f"{prefix}.{layer + 1}", bn=f"{prefix}.{layer + 2}",
                 gamma_scale=RESIDUAL_GAMMA if residual else 1.0)
    return b.add(x, y) if residual else y


def mobilenet_v2(seed: int) -> GeneratedModel:
    weight_seed, data_rng = _streams(seed)
    b = GraphBuilder(synthetic_images(data_rng, IMAGENET_SAMPLE_BATCH, 3, 224), weight_seed)
    x = _relu6(b, _conv_bn(b, "input", 32, 3, conv="features.0.0", bn="features.0.1", stride=2))
    index = 1
    for expansion, channels, repeats, first_stride in MOBILENET_V2_STAGES:
        for repeat in range(repeats):
            x = _inverted_residual(b, x, channels, first_stride if repeat == 0 else 1, expansion, index)
            index += 1
    x = _relu6(b, _conv_bn(b, x, 1280, 1, conv=f"features.{index}.0", bn=f"features.{index}.1"))
    out = _classifier_head(b, x, IMAGENET_CLASSES)
    doc = "MobileNet-v2 1.0 (torchvision topology, ReLU6 as Clip), synthetic weights"
    return b.finish(out, graph_name="mobilenet_v2", doc=doc, seed=seed, generator_version=GENERATOR_VERSION)


# ---- small test workloads ----------------------------------------------------------------------


def tiny_cnn(seed: int) -> GeneratedModel:
    """A 32x32 CNN of a few thousand parameters that uses every op the front end lowers."""
    weight_seed, data_rng = _streams(seed)
    b = GraphBuilder(synthetic_images(data_rng, TINY_SAMPLE_BATCH, 3, 32), weight_seed)
    x = b.relu(_conv_bn(b, "input", 16, 3, conv="stem.conv", bn="stem.bn"))  # 16x32x32
    x = b.maxpool(x, kernel=2, stride=2, pad=0)  # 16x16x16
    y = b.clip(_conv_bn(b, x, 16, 3, conv="block.dw", bn="block.dw_bn", groups=16), 0.0, 6.0)
    y = _conv_bn(b, y, 16, 1, conv="block.pw", bn="block.pw_bn")
    x = b.relu(b.add(x, y))
    x = b.relu(_conv_bn(b, x, 32, 3, conv="down.conv", bn="down.bn", stride=2))  # 32x8x8
    left = b.relu(_conv_bn(b, x, 16, 1, conv="left.conv", bn="left.bn"))
    right = b.avgpool(x, kernel=3, stride=1, pad=1)
    right = b.relu(_conv_bn(b, right, 16, 1, conv="right.conv", bn="right.bn"))
    x = b.concat([left, right])  # 32x8x8
    out = b.softmax(_classifier_head(b, x, TINY_CLASSES))
    doc = "Tiny CNN exercising every lowered op, synthetic weights"
    return b.finish(out, graph_name="tiny_cnn", doc=doc, seed=seed, generator_version=GENERATOR_VERSION)


def mlp(seed: int) -> GeneratedModel:
    """MLP0 of the TPU v1 paper (Jouppi et al. 2017, Table 1): 5 fully connected 2048-wide ReLU layers."""
    weight_seed, data_rng = _streams(seed)
    sample = data_rng.standard_normal((MLP_SAMPLE_BATCH, MLP_WIDTH)).astype(np.float32)
    b = GraphBuilder(sample, weight_seed)
    x = "input"
    for layer in range(MLP_LAYERS):
        x = b.relu(b.gemm(x, MLP_WIDTH, name=f"fc{layer}", target_std=1.0))
    doc = "TPU v1 paper MLP0: 5 x Gemm 2048x2048 + ReLU, synthetic weights"
    return b.finish(x, graph_name="mlp", doc=doc, seed=seed, generator_version=GENERATOR_VERSION)
