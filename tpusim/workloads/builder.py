"""Build an ONNX graph and run it in numpy at the same time.

Synthetic weights only look like a trained network's if the batch-norm statistics match the
activations that actually reach each BN; running the graph while it is built gives those
activations for free. Every op appends one ONNX node and computes its output on a small seeded
sample batch.

That forward pass runs in float64 (the weights it multiplies are the model's float32 ones), and only
the parameters drawn from its statistics go into the model, as float32. In float32 the statistics carried
the rounding of whichever BLAS kernel the CPU picked (OpenBLAS's Haswell, SkylakeX and Prescott
kernels gave three different ResNet-50 files), so the built-in models, and every figure measured on
them, differed between machines. Float64 kernels still differ in their last bits (about 1e-14 after a
few thousand-term sums), so every parameter taken from a statistic is rounded to
STATISTIC_BITS significant bits (:func:`round_statistic`) before it is used: a difference that small
moves it only with a probability of about 1e-10.
"""
from __future__ import annotations

import itertools
import math
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from tpusim import tensor_ops
from tpusim.ir import ConvAttrs, PoolAttrs

OPSET = 17
# IR 8 is the version onnx released with opset 17; every onnxruntime from 1.12 on reads it.
IR_VERSION = 8
BATCH_DIM = "batch"
INPUT_NAME = "input"
OUTPUT_NAME = "output"
BN_EPSILON = 1e-5  # PyTorch's default, so folded weights match an exported torchvision model

# Trained conv layers have per-output-channel weight ranges spread over one to two orders of
# magnitude; a log-normal factor per channel reproduces that. Small layers draw too few channels
# for the tails to show, so the log-spread is widened until max/min reaches the floor.
CHANNEL_SCALE_SIGMA = 0.9
MIN_CHANNEL_SPREAD = 30.0
# After BN folding the per-channel factor cancels against the running variance; what remains
# is gamma's spread. Moderate for ordinary convs (per-tensor int8 works on ResNet), wide for
# depthwise convs (per-tensor int8 collapses on MobileNet-v2).
GAMMA_SIGMA = 0.4
DEPTHWISE_GAMMA_SIGMA = 1.0
BETA_STD = 0.1
# Running statistics are estimates over a dataset, never the exact statistics of one batch.
STAT_JITTER = 0.05
GEMM_BIAS_STD = 0.05
# Significant bits kept of a parameter computed from the sample batch's statistics: 2^-12 (0.02 %) is
# far below the jitter above, and some 10^10 times the float64 rounding that differs between BLAS kernels.
STATISTIC_BITS = 12


class Tensor(str):
    """A tensor's name as the builder hands it out: the builder keeps the tensor's sample value (float64, for
    the layers after it) while the model code holds this name, and lets it go once the code drops it. Kept
    to the end, every value of ResNet-50's forward pass held 0.7 GB."""


@dataclass(frozen=True)
class GeneratedModel:
    """A generated ONNX model with the seeded batch its statistics were taken on."""

    model: onnx.ModelProto
    sample_input: np.ndarray
    sample_output: np.ndarray  # numpy forward pass of sample_input (float64, as float32), for checking a runtime
    activation_std: Mapping[str, float]  # std of every tensor over sample_input


def round_statistic(value: np.ndarray | float) -> np.ndarray:
    """``value`` rounded to STATISTIC_BITS significant bits (zero stays zero)."""
    mantissa, exponent = np.frexp(np.asarray(value, dtype=np.float64))
    return np.ldexp(np.round(mantissa * 2.0**STATISTIC_BITS), exponent - STATISTIC_BITS)


def synthetic_images(rng: np.random.Generator, batch: int, channels: int, size: int) -> np.ndarray:
    """Spatially correlated noise, normalised per channel like an ImageNet-preprocessed input.

    White noise would give 3x3 convs nothing to correlate; a sum of upsampled octaves has
    smooth regions and edges, closer to what a real first layer sees.
    """
    image = np.zeros((batch, channels, size, size))
    for block, weight in ((8, 1.0), (4, 0.6), (2, 0.4), (1, 0.3)):
        coarse = rng.standard_normal((batch, channels, -(-size // block), -(-size // block)))
        image += weight * np.repeat(np.repeat(coarse, block, axis=2), block, axis=3)[:, :, :size, :size]
    image -= image.mean(axis=(0, 2, 3), keepdims=True)
    image /= image.std(axis=(0, 2, 3), keepdims=True)
    return image.astype(np.float32)


class GraphBuilder:
    """Accumulates ONNX nodes and initializers; each method returns its output tensor's name.

    Tensor names double as node names, and parameter names follow torchvision's state dict
    (``layer1.0.conv1.weight``, ``layer1.0.bn1.running_var``) so a reader can line the graph
    up against the reference model.
    """

    def __init__(self, sample_input: np.ndarray, seed: int) -> None:
        self._rng = np.random.default_rng(seed)
        self._sample_input = sample_input.astype(np.float32)
        self._values: dict[str, np.ndarray] = {INPUT_NAME: self._sample_input.astype(np.float64)}
        self._stds: dict[str, float] = {INPUT_NAME: float(self._values[INPUT_NAME].std())}
        self._nodes: list[onnx.NodeProto] = []
        self._initializers: list[TensorProto] = []
        self._constants: dict[float, str] = {}
        self._counter = itertools.count()

    def value(self, name: str) -> np.ndarray:
        return self._values[name]

    # ---- parameterised layers -------------------------------------------------------------

    def conv(self, x: str, out_channels: int, kernel: int, *, name: str, stride: int = 1, groups: int = 1) -> str:
        """Bias-free square conv with 'same'-style padding (kernel // 2), as in torchvision."""
        x_value = self._values[x]
        in_per_group = x_value.shape[1] // groups
        weight = self._channel_scaled_normal((out_channels, in_per_group, kernel, kernel), gain=2.0)
        pad = kernel // 2
        attrs = ConvAttrs((kernel, kernel), (stride, stride), (pad, pad, pad, pad), (1, 1), groups)
        weight_name = self._initializer(f"{name}.weight", weight)
        self._nodes.append(
            helper.make_node(
                "Conv",
                [x, weight_name],
                [name],
                name=name,
                kernel_shape=[kernel, kernel],
                strides=[stride, stride],
                pads=[pad, pad, pad, pad],
                dilations=[1, 1],
                group=groups,
            )
        )
        return self._store(name, tensor_ops.conv2d(x_value, weight, None, attrs))

    def batch_norm(self, x: str, *, name: str, gamma_sigma: float, gamma_scale: float = 1.0) -> str:
        """Inference BN whose running statistics are (jittered) statistics of its actual input;
        ``gamma_scale`` shrinks the gain of a residual branch's last BN, as trained ResNets have it."""
        x_value = self._values[x]
        channels = x_value.shape[1]
        mean = x_value.mean(axis=(0, 2, 3), dtype=np.float64)
        var = x_value.var(axis=(0, 2, 3), dtype=np.float64)
        running_mean = mean + STAT_JITTER * np.sqrt(var) * self._rng.standard_normal(channels)
        running_var = var * np.exp(2.0 * STAT_JITTER * self._rng.standard_normal(channels))
        gamma = gamma_scale * np.exp(gamma_sigma * self._rng.standard_normal(channels))
        beta = BETA_STD * self._rng.standard_normal(channels)
        running_mean, running_var = round_statistic(running_mean), round_statistic(running_var)
        params = [p.astype(np.float32) for p in (gamma, beta, running_mean, running_var)]
        names = [
            self._initializer(f"{name}.{suffix}", p)
            for suffix, p in zip(("weight", "bias", "running_mean", "running_var"), params)
        ]
        self._nodes.append(
            helper.make_node("BatchNormalization", [x, *names], [name], name=name, epsilon=BN_EPSILON)
        )
        gamma32, beta32, mean32, var32 = (p.reshape(1, -1, 1, 1) for p in params)
        y = (x_value - mean32) / np.sqrt(var32 + np.float32(BN_EPSILON)) * gamma32 + beta32
        return self._store(name, y)

    def gemm(self, x: str, out_features: int, *, name: str, target_std: float) -> str:
        """Fully connected layer, weight stored (out, in) with transB=1 as torch exports it.

        Without a BN behind it nothing renormalises the output, so the weight is rescaled to
        give the sample batch an output std of target_std.
        """
        x_value = self._values[x]
        weight = self._channel_scaled_normal((out_features, x_value.shape[1]), gain=1.0)
        weight *= np.float32(round_statistic(target_std / float((x_value @ weight.T).std())))
        bias = (GEMM_BIAS_STD * target_std * self._rng.standard_normal(out_features)).astype(np.float32)
        weight_name = self._initializer(f"{name}.weight", weight)
        bias_name = self._initializer(f"{name}.bias", bias)
        self._nodes.append(helper.make_node("Gemm", [x, weight_name, bias_name], [name], name=name, transB=1))
        return self._store(name, x_value @ weight.T + bias)

    # ---- parameter-free ops -----------------------------------------------------------------

    def relu(self, x: str) -> str:
        return self._simple("Relu", [x], np.maximum(self._values[x], np.float32(0)))

    def clip(self, x: str, lo: float, hi: float) -> str:
        """Opset >= 11 Clip: the bounds are scalar inputs, shared between nodes."""
        y = np.clip(self._values[x], np.float32(lo), np.float32(hi))
        return self._simple("Clip", [x, self._constant(lo), self._constant(hi)], y)

    def add(self, a: str, b: str) -> str:
        return self._simple("Add", [a, b], self._values[a] + self._values[b])

    def concat(self, xs: Sequence[str]) -> str:
        y = np.concatenate([self._values[x] for x in xs], axis=1)
        return self._simple("Concat", list(xs), y, axis=1)

    def maxpool(self, x: str, kernel: int, stride: int, pad: int) -> str:
        attrs = PoolAttrs((kernel, kernel), (stride, stride), (pad, pad, pad, pad), False, False)
        y = tensor_ops.maxpool(self._values[x], attrs)
        return self._simple("MaxPool", [x], y, kernel_shape=[kernel] * 2, strides=[stride] * 2, pads=[pad] * 4)

    def avgpool(self, x: str, kernel: int, stride: int, pad: int) -> str:
        """AveragePool excluding padding from the divisor (ONNX's default count_include_pad=0)."""
        attrs = PoolAttrs((kernel, kernel), (stride, stride), (pad, pad, pad, pad), False, False)
        y = tensor_ops.avgpool(self._values[x], attrs)
        return self._simple(
            "AveragePool", [x], y, kernel_shape=[kernel] * 2, strides=[stride] * 2, pads=[pad] * 4, count_include_pad=0
        )

    def global_avgpool(self, x: str) -> str:
        return self._simple("GlobalAveragePool", [x], self._values[x].mean(axis=(2, 3), keepdims=True))

    def flatten(self, x: str) -> str:
        x_value = self._values[x]
        return self._simple("Flatten", [x], x_value.reshape(x_value.shape[0], -1), axis=1)

    def softmax(self, x: str) -> str:
        return self._simple("Softmax", [x], tensor_ops.softmax(self._values[x], axis=1), axis=1)

    # ---- output ---------------------------------------------------------------------------

    def finish(self, output: str, *, graph_name: str, doc: str, seed: int, generator_version: int) -> GeneratedModel:
        """Rename ``output`` to OUTPUT_NAME and wrap everything in a ModelProto."""
        producer = next(node for node in self._nodes if output in node.output)
        producer.output[list(producer.output).index(output)] = OUTPUT_NAME
        out_value = self._values[output]
        graph = helper.make_graph(
            self._nodes,
            graph_name,
            [_value_info(INPUT_NAME, self._sample_input.shape)],
            [_value_info(OUTPUT_NAME, out_value.shape)],
            initializer=self._initializers,
            doc_string=doc,
        )
        model = helper.make_model(
            graph,
            opset_imports=[helper.make_opsetid("", OPSET)],
            ir_version=IR_VERSION,
            producer_name="tpusim.workloads",
            producer_version=str(generator_version),
            doc_string=doc,
        )
        helper.set_model_props(model, {"seed": str(seed), "generator_version": str(generator_version)})
        stds = {name: std for name, std in self._stds.items() if name != output}
        stds[OUTPUT_NAME] = self._stds[output]
        return GeneratedModel(model, self._sample_input, out_value.astype(np.float32), stds)

    # ---- internals --------------------------------------------------------------------------

    def _channel_scaled_normal(self, shape: tuple[int, ...], gain: float) -> np.ndarray:
        """He-style normal weights times a log-normal factor per output channel (axis 0)."""
        fan_in = math.prod(shape[1:])
        weight = self._rng.standard_normal(shape) * math.sqrt(gain / fan_in)
        factors = self._channel_factors(shape[0])
        return (weight * factors.reshape(-1, *([1] * (len(shape) - 1)))).astype(np.float32)

    def _channel_factors(self, channels: int) -> np.ndarray:
        """Log-normal factors with mean square 1 (so the layer keeps He variance overall)."""
        z = self._rng.standard_normal(channels)
        span = float(z.max() - z.min())
        sigma = max(CHANNEL_SCALE_SIGMA, math.log(MIN_CHANNEL_SPREAD) / span) if span > 0 else 0.0
        factors = np.exp(sigma * z)
        return factors / np.sqrt(np.mean(factors**2))

    def _initializer(self, name: str, array: np.ndarray) -> str:
        self._initializers.append(numpy_helper.from_array(np.asarray(array, dtype=np.float32, order="C"), name))
        return name

    def _constant(self, value: float) -> str:
        if value not in self._constants:
            self._constants[value] = self._initializer(f"const_{value:g}", np.array(value, dtype=np.float32))
        return self._constants[value]

    def _simple(self, op_type: str, inputs: list[str], y: np.ndarray, **attrs: object) -> str:
        name = f"{op_type.lower()}_{next(self._counter)}"
        self._nodes.append(helper.make_node(op_type, inputs, [name], name=name, **attrs))
        return self._store(name, y)

    def _store(self, name: str, y: np.ndarray) -> Tensor:
        if name in self._stds:
            raise ValueError(f"tensor name {name!r} used twice")
        self._values[name] = y.astype(np.float64, copy=False)
        self._stds[name] = float(self._values[name].std())
        tensor = Tensor(name)
        weakref.finalize(tensor, self._values.pop, name, None)
        return tensor


def _value_info(name: str, sample_shape: tuple[int, ...]) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, [BATCH_DIM, *sample_shape[1:]])
