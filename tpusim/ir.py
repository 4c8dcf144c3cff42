"""Frozen dataclasses handed between pipeline stages.

The front end produces a :class:`Graph` of :class:`Layer` objects in topological order.
Activations are NCHW (ONNX's native layout); conv weights are OIHW; GEMM weights are
stored as (N, K) = (out_features, in_features), so every matrix layer computes
``y[m, n] = sum_k x[m, k] * W[n, k] + b[n]``.
"""
from __future__ import annotations

import dataclasses
import math
import operator
from dataclasses import dataclass
from typing import Any, Callable, Literal, Mapping

import numpy as np

Shape = tuple[int, ...]

LayerOp = str  # the name an op module registers (tpusim.ops.layer_ops() lists them)

MATRIX_OPS = ("conv", "gemm")


@dataclass(frozen=True)
class Activation:
    """A clamp fused into the layer that produces the tensor (ReLU = clamp at 0, ReLU6 = [0, 6])."""

    kind: Literal["none", "relu", "clip"] = "none"
    lo: float = -math.inf
    hi: float = math.inf

    def apply(self, x: np.ndarray) -> np.ndarray:
        if self.kind == "none":
            return x
        return np.clip(x, self.lo, self.hi)

    @property
    def label(self) -> str:
        if self.kind == "clip" and self.lo == 0.0 and self.hi == 6.0:
            return "relu6"
        return self.kind


NO_ACTIVATION = Activation()


@dataclass(frozen=True)
class ConvAttrs:
    kernel: tuple[int, int]
    strides: tuple[int, int]
    pads: tuple[int, int, int, int]  # top, left, bottom, right
    dilations: tuple[int, int]
    groups: int


@dataclass(frozen=True)
class PoolAttrs:
    kernel: tuple[int, int]
    strides: tuple[int, int]
    pads: tuple[int, int, int, int]  # top, left, bottom, right
    ceil_mode: bool
    count_include_pad: bool


@dataclass(frozen=True)
class GemmShape:
    """The GEMM a matrix layer maps to: M rows streamed, K reduced, N outputs, per group."""

    m: int
    k: int
    n: int
    groups: int = 1

    @property
    def macs(self) -> int:
        return self.m * self.k * self.n * self.groups


@dataclass(frozen=True, eq=False)
class Layer:
    name: str
    op: LayerOp
    inputs: tuple[str, ...]
    output: str
    input_shapes: tuple[Shape, ...]
    output_shape: Shape
    activation: Activation = NO_ACTIVATION
    weight: np.ndarray | None = None
    bias: np.ndarray | None = None
    conv: ConvAttrs | None = None
    pool: PoolAttrs | None = None
    axis: int = 1
    attrs: tuple[tuple[str, object], ...] = ()  # an op's own parameters (name, value), for ops with no field here

    def attr(self, name: str, default: object = None) -> object:
        return dict(self.attrs).get(name, default)

    @property
    def is_matrix(self) -> bool:
        return self.op in MATRIX_OPS

    @property
    def gemm(self) -> GemmShape:
        """GEMM view of a conv/gemm layer; per group for grouped and depthwise convs."""
        if self.op == "conv":
            assert self.conv is not None and self.weight is not None
            batch, _, h_out, w_out = self.output_shape
            c_out, c_in_per_group, kh, kw = self.weight.shape
            g = self.conv.groups
            return GemmShape(m=batch * h_out * w_out, k=c_in_per_group * kh * kw, n=c_out // g, groups=g)
        if self.op == "gemm":
            assert self.weight is not None
            n, k = self.weight.shape
            return GemmShape(m=int(np.prod(self.output_shape[:-1])), k=k, n=n)
        raise ValueError(f"layer {self.name!r} ({self.op}) is not a matrix layer")

    @property
    def macs(self) -> int:
        return self.gemm.macs if self.is_matrix else 0

    @property
    def weight_count(self) -> int:
        return 0 if self.weight is None else int(self.weight.size)


@dataclass(frozen=True, eq=False)
class Graph:
    """A lowered model: one input tensor, layers in topological order, named outputs."""

    name: str
    input_name: str
    input_shape: Shape
    outputs: tuple[str, ...]
    layers: tuple[Layer, ...]
    # A QDQ model's own activation grids (tensor name -> tpusim.quant.arithmetic.QParams); None for a
    # float model, which is calibrated instead.
    model_grids: Mapping[str, Any] | None = None
    # Whether the model file keeps weights in external data files (ONNX Runtime is then given the model
    # loaded with them); None for a model lowered from memory, whose file, if any, was not read.
    external_data: bool | None = None

    @property
    def batch(self) -> int:
        return self.input_shape[0]

    @property
    def matrix_layers(self) -> tuple[Layer, ...]:
        return tuple(layer for layer in self.layers if layer.is_matrix)

    @property
    def macs(self) -> int:
        return sum(layer.macs for layer in self.layers)

    def producer(self, tensor: str) -> Layer | None:
        for layer in self.layers:
            if layer.output == tensor:
                return layer
        return None

    def shape_of(self, tensor: str) -> Shape:
        if tensor == self.input_name:
            return self.input_shape
        layer = self.producer(tensor)
        if layer is None:
            raise KeyError(tensor)
        return layer.output_shape


_FIELD_GETTERS: dict[type, Callable[[Any], tuple]] = {}


def field_values(instance: Any) -> tuple:
    """The fields of a dataclass of numbers, in order: ``dataclasses.astuple`` without its deep copy of
    every value (which took a tenth of a ResNet-50 run's timing and energy, adding up layers)."""
    cls = type(instance)
    getter = _FIELD_GETTERS.get(cls)
    if getter is None:
        names = [f.name for f in dataclasses.fields(cls)]
        # (attrgetter of one name returns the value itself, not a 1-tuple)
        getter = operator.attrgetter(*names) if len(names) > 1 else lambda value: (getattr(value, names[0]),)
        _FIELD_GETTERS[cls] = getter
    return getter(instance)


@dataclass(frozen=True)
class CycleBreakdown:
    """Cycles in the TPU v1 paper's categories (Jouppi et al. 2017, Table 3).

    ``active + weight_stall + weight_shift + non_matrix == total``;
    ``useful_mac + unused_mac == active``; ``raw_stall``, ``input_stall`` and ``ub_stall`` (the MXU
    waiting for a unified-buffer port) are parts of ``non_matrix``.
    """

    total: int = 0
    active: int = 0
    weight_stall: int = 0
    weight_shift: int = 0
    non_matrix: int = 0
    useful_mac: int = 0
    unused_mac: int = 0
    raw_stall: int = 0
    input_stall: int = 0
    ub_stall: int = 0

    def __add__(self, other: "CycleBreakdown") -> "CycleBreakdown":
        return CycleBreakdown(*(a + b for a, b in zip(field_values(self), field_values(other))))


@dataclass(frozen=True)
class LayerCounts:
    """Event counts of one layer on the chip: what energy is computed from and reports explain.

    Bytes are counted at the interface named; ops are element operations.
    """

    macs: int = 0                 # useful multiply-accumulates
    mac_slots: int = 0            # active cycles x rows x cols (PE-cycles the array was streaming)
    weight_dram_bytes: int = 0    # weights read from (or written by the host into) the weight memory
    weight_fifo_bytes: int = 0    # bytes written to (and later read from) the weight FIFO
    weight_shift_bytes: int = 0   # byte-hops of weights shifting down the array's registers
    ub_read_bytes: int = 0        # unified buffer reads (activations into the array, residual operands)
    ub_write_bytes: int = 0       # unified buffer writes (layer outputs)
    spill_bytes: int = 0          # activation bytes spilled to / refilled from host memory
    acc_read_bytes: int = 0       # accumulator reads (accumulate-in-place and drain)
    acc_write_bytes: int = 0      # accumulator writes
    requant_ops: int = 0          # int32 -> int8 rescales (multiply, shift, round, clamp each)
    requant_scale_bytes: int = 0  # per-channel multiplier/shift vectors fetched
    activation_ops: int = 0       # nonlinearity / elementwise ops in the activation unit
    pool_ops: int = 0             # compare/add ops of pooling
    host_in_bytes: int = 0        # PCIe host -> unified buffer
    host_out_bytes: int = 0       # PCIe unified buffer -> host
    host_weight_bytes: int = 0    # PCIe host -> weight memory (an operand computed on chip made the array's
                                  # weights; its write into the weight memory is in weight_dram_bytes too)

