"""Real exporter output for the tests, without torch: the corpus in ``tests/data/corpus/``.

The corpus files are torchvision models exported by ``torch.onnx.export`` (TorchScript and dynamo
exporters) with their large float tensors stripped (``tools/export_corpus.py`` made them; the
folder's README.md lists them). This module puts weights back and makes the other kinds of real
model users bring:

- ``load_model(name, seed)``: a corpus graph with every stripped tensor filled with seeded values
  chosen by the tensor's role (which node and input index consume it), so that the network computes
  finite, non-degenerate activations through 50+ layers (each layer's output second moment near 1);
- ``fill_model(model, seed)``: the same for any model with stripped tensors;
- ``save_with_external_data(model, path)``: the dynamo exporter's layout, ``path`` plus
  ``path.name + ".data"``;
- ``saved_model(name, seed)``: the path of ``load_model(name, seed)`` in that layout, written once per
  machine (a cache in the temporary folder, keyed by what the fill reads);
- ``mlperf_tiny_onnx(name, out_dir)``: an MLPerf Tiny ``.tflite`` model with real weights, converted
  by tflite2onnx;
- ``ort_qdq_copy(model, ...)``: ONNX Runtime's ``quantize_static`` QDQ model of a float model.

Tests import it as ``import corpus`` (``tests/`` is on pytest's pythonpath).
"""
from __future__ import annotations

import functools
import hashlib
import math
import os
import re
import shutil
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto

CORPUS_DIR = Path(__file__).resolve().parent / "data" / "corpus"
STRIPPED = "stripped by tools/export_corpus.py: fill with tests/corpus.py"


@dataclass(frozen=True)
class Entry:
    name: str                     # file stem: <torchvision model>_<ts|dynamo><opset>[_rawinit]
    file: str                     # in tests/data/corpus/
    family: str                   # resnet, mobilenet, efficientnet, regnet, ...
    exporter: str                 # "torchscript" (dynamo=False) or "dynamo" (dynamo=True)
    opset: int
    input_shape: tuple[int, ...]  # NCHW (sequence models: batch, steps, features), batch 1
    external_data: bool           # the exporter wrote the weights to <file>.data
    task: str = "classification"  # "classification": (1, 1000) logits; "sequence": nn.LSTM/nn.GRU + Linear head;
                                  # "encoder": int64 token ids in, the last hidden state out (HF BertModel)

    @property
    def path(self) -> Path:
        return CORPUS_DIR / self.file

    @property
    def model(self) -> str:
        """The torchvision builder's name."""
        return re.sub(r"_(ts|dynamo)\d+(_rawinit)?$", "", self.name)

    @property
    def raw_init(self) -> bool:
        """Exported from torchvision's own initialisation (constant BN/bias parameters left as they are)."""
        return self.name.endswith("_rawinit")


_S = (1, 3, 224, 224)
_L = (1, 3, 299, 299)
_SEQ = (1, 16, 32)
CORPUS: tuple[Entry, ...] = (
    Entry("resnet18_ts17", "resnet18_ts17.onnx", "resnet", "torchscript", 17, _S, False),
    Entry("resnet50_ts17", "resnet50_ts17.onnx", "resnet", "torchscript", 17, _S, False),
    Entry("mobilenet_v2_ts17", "mobilenet_v2_ts17.onnx", "mobilenet", "torchscript", 17, _S, False),
    Entry("mobilenet_v3_small_ts17", "mobilenet_v3_small_ts17.onnx", "mobilenet", "torchscript", 17, _S, False),
    Entry("mobilenet_v3_large_ts17", "mobilenet_v3_large_ts17.onnx", "mobilenet", "torchscript", 17, _S, False),
    Entry("efficientnet_b0_ts17", "efficientnet_b0_ts17.onnx", "efficientnet", "torchscript", 17, _S, False),
    Entry("regnet_x_400mf_ts17", "regnet_x_400mf_ts17.onnx", "regnet", "torchscript", 17, _S, False),
    Entry("regnet_y_400mf_ts17", "regnet_y_400mf_ts17.onnx", "regnet", "torchscript", 17, _S, False),
    Entry("mnasnet0_5_ts17", "mnasnet0_5_ts17.onnx", "mnasnet", "torchscript", 17, _S, False),
    Entry("squeezenet1_0_ts17", "squeezenet1_0_ts17.onnx", "squeezenet", "torchscript", 17, _S, False),
    Entry("shufflenet_v2_x0_5_ts17", "shufflenet_v2_x0_5_ts17.onnx", "shufflenet", "torchscript", 17, _S, False),
    Entry("densenet121_ts17", "densenet121_ts17.onnx", "densenet", "torchscript", 17, _S, False),
    Entry("googlenet_ts17", "googlenet_ts17.onnx", "inception", "torchscript", 17, _S, False),
    Entry("inception_v3_ts17", "inception_v3_ts17.onnx", "inception", "torchscript", 17, _L, False),
    Entry("vgg11_ts17", "vgg11_ts17.onnx", "vgg", "torchscript", 17, _S, False),
    Entry("convnext_tiny_ts17", "convnext_tiny_ts17.onnx", "convnext", "torchscript", 17, _S, False),
    Entry("alexnet_ts17", "alexnet_ts17.onnx", "alexnet", "torchscript", 17, _S, False),
    Entry("resnet18_dynamo18", "resnet18_dynamo18.onnx", "resnet", "dynamo", 18, _S, True),
    Entry("resnet50_dynamo18", "resnet50_dynamo18.onnx", "resnet", "dynamo", 18, _S, True),
    Entry("mobilenet_v2_dynamo18", "mobilenet_v2_dynamo18.onnx", "mobilenet", "dynamo", 18, _S, True),
    Entry("mobilenet_v3_small_dynamo18", "mobilenet_v3_small_dynamo18.onnx", "mobilenet", "dynamo", 18, _S, True),
    Entry("mobilenet_v3_large_dynamo18", "mobilenet_v3_large_dynamo18.onnx", "mobilenet", "dynamo", 18, _S, True),
    Entry("efficientnet_b0_dynamo18", "efficientnet_b0_dynamo18.onnx", "efficientnet", "dynamo", 18, _S, True),
    Entry("regnet_x_400mf_dynamo18", "regnet_x_400mf_dynamo18.onnx", "regnet", "dynamo", 18, _S, True),
    Entry("regnet_y_400mf_dynamo18", "regnet_y_400mf_dynamo18.onnx", "regnet", "dynamo", 18, _S, True),
    Entry("mnasnet0_5_dynamo18", "mnasnet0_5_dynamo18.onnx", "mnasnet", "dynamo", 18, _S, True),
    Entry("squeezenet1_0_dynamo18", "squeezenet1_0_dynamo18.onnx", "squeezenet", "dynamo", 18, _S, True),
    Entry("shufflenet_v2_x0_5_dynamo18", "shufflenet_v2_x0_5_dynamo18.onnx", "shufflenet", "dynamo", 18, _S, True),
    Entry("densenet121_dynamo18", "densenet121_dynamo18.onnx", "densenet", "dynamo", 18, _S, True),
    Entry("googlenet_dynamo18", "googlenet_dynamo18.onnx", "inception", "dynamo", 18, _S, True),
    Entry("inception_v3_dynamo18", "inception_v3_dynamo18.onnx", "inception", "dynamo", 18, _L, True),
    Entry("vgg11_dynamo18", "vgg11_dynamo18.onnx", "vgg", "dynamo", 18, _S, True),
    Entry("convnext_tiny_dynamo18", "convnext_tiny_dynamo18.onnx", "convnext", "dynamo", 18, _S, True),
    Entry("alexnet_dynamo18", "alexnet_dynamo18.onnx", "alexnet", "dynamo", 18, _S, True),
    Entry("resnet18_ts9", "resnet18_ts9.onnx", "resnet", "torchscript", 9, _S, False),
    Entry("mobilenet_v2_ts11", "mobilenet_v2_ts11.onnx", "mobilenet", "torchscript", 11, _S, False),
    # torchvision's initialisation exported as is: Identity-shared initializers, Conv without bias
    Entry("efficientnet_b0_ts17_rawinit", "efficientnet_b0_ts17_rawinit.onnx", "efficientnet", "torchscript", 17, _S,
          False),
    Entry("efficientnet_b0_dynamo18_rawinit", "efficientnet_b0_dynamo18_rawinit.onnx", "efficientnet", "dynamo", 18,
          _S, True),
    # nn.LSTM (2 stacked; bidirectional) and nn.GRU, batch_first, 16 steps of 32 features, hidden 64, a Linear head
    Entry("lstm2_ts17", "lstm2_ts17.onnx", "recurrent", "torchscript", 17, _SEQ, False, "sequence"),
    Entry("lstm_bidir_ts17", "lstm_bidir_ts17.onnx", "recurrent", "torchscript", 17, _SEQ, False, "sequence"),
    Entry("gru_ts17", "gru_ts17.onnx", "recurrent", "torchscript", 17, _SEQ, False, "sequence"),
    Entry("lstm2_dynamo18", "lstm2_dynamo18.onnx", "recurrent", "dynamo", 18, _SEQ, True, "sequence"),
    Entry("lstm_bidir_dynamo18", "lstm_bidir_dynamo18.onnx", "recurrent", "dynamo", 18, _SEQ, True, "sequence"),
    Entry("gru_dynamo18", "gru_dynamo18.onnx", "recurrent", "dynamo", 18, _SEQ, True, "sequence"),
    # Transformer encoders by the default (dynamo) exporter: torchvision's ViT-B/16, and a HuggingFace BertModel
    # (2 layers, hidden 128, 2 heads) that takes int64 input_ids (1, 32) and gives its last hidden state (1, 32, 128)
    Entry("vit_b_16_dynamo18", "vit_b_16_dynamo18.onnx", "vit", "dynamo", 18, _S, True),
    Entry("bert_dynamo18", "bert_dynamo18.onnx", "bert", "dynamo", 18, (1, 32), True, "encoder"),
)
BY_NAME = {e.name: e for e in CORPUS}


def entry(name: str) -> Entry:
    try:
        return BY_NAME[name]
    except KeyError:
        raise KeyError(f"{name!r} is not in the corpus; known: {', '.join(BY_NAME)}") from None


# ---------------------------------------------------------------- filling stripped tensors

_FLOAT_NP = {TensorProto.FLOAT: np.float32, TensorProto.DOUBLE: np.float64, TensorProto.FLOAT16: np.float16}
# Ops an initializer may pass through before the node that gives it its role.
_PASS_THROUGH = {"Identity", "Cast", "CastLike", "Transpose", "Reshape", "Unsqueeze", "Squeeze", "Flatten"}
# Ops a residual branch may end with (walking back from an Add) that do not change its scale's meaning.
_LINEAR_WALK = _PASS_THROUGH | {"Dropout"}
_MATRIX_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
RESIDUAL_BRANCH_SCALE = 0.5   # trained nets have small last-BN gammas in residual branches


def is_stripped(tensor: TensorProto) -> bool:
    """A float tensor with a shape but no data (what tools/export_corpus.py leaves)."""
    if tensor.data_type not in _FLOAT_NP and tensor.data_type != TensorProto.BFLOAT16:
        return False
    if tensor.data_location == TensorProto.EXTERNAL or math.prod(tensor.dims) == 0:
        return False
    return not (tensor.raw_data or tensor.float_data or tensor.double_data or tensor.int32_data)


def _attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _subgraphs(graph: onnx.GraphProto):
    yield graph
    for node in graph.node:
        for a in node.attribute:
            for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                yield from _subgraphs(sub)


class _Roles:
    """Consumers and producers of every value in one graph, and the role of each initializer."""

    def __init__(self, graph: onnx.GraphProto):
        self.graph = graph
        self.init = {t.name: t for t in graph.initializer}
        self.consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
        self.producer: dict[str, onnx.NodeProto] = {}
        for node in graph.node:
            for i, name in enumerate(node.input):
                if name:
                    self.consumers.setdefault(name, []).append((node, i))
            for name in node.output:
                self.producer[name] = node

    def origin(self, name: str) -> str | None:
        """The initializer or Constant output that ``name`` is (through Identity, Reshape, ...), if any."""
        for _ in range(8):
            if name in self.init:
                return name
            node = self.producer.get(name)
            if node is None:
                return None
            if node.op_type == "Constant":
                return name
            if node.op_type not in _PASS_THROUGH:
                return None
            name = node.input[0]
        return None

    def is_constant(self, name: str) -> bool:
        return self.origin(name) is not None

    def role(self, name: str, shape: list[int], depth: int = 0):
        """(op_type, input index, node, shape as that node sees it) of the first real consumer."""
        for node, index in self.consumers.get(name, []):
            if node.op_type in _PASS_THROUGH and index == 0 and depth < 8:
                seen = shape
                if node.op_type == "Transpose":
                    perm = _attr(node, "perm", list(reversed(range(len(shape)))))
                    seen = [shape[p] for p in perm]
                found = self.role(node.output[0], seen, depth + 1)
                if found is not None:
                    return found
                continue
            return node.op_type, index, node, shape
        return None

    def ancestors(self, name: str) -> set[str]:
        seen, stack = set(), [name]
        while stack:
            node = self.producer.get(stack.pop())
            if node is None:
                continue
            for i in node.input:
                if i and i not in seen:
                    seen.add(i)
                    stack.append(i)
        return seen

    def branch_params(self, name: str) -> list[str]:
        """Walking back from a residual Add's input: the parameters that set that branch's scale."""
        for _ in range(16):
            node = self.producer.get(name)
            if node is None:
                return []
            op = node.op_type
            consts = [self.origin(n) for n in node.input if n and self.is_constant(n)]
            if op == "BatchNormalization":
                return [self.origin(n) for n in node.input[1:3] if n and self.is_constant(n)]
            if op in _MATRIX_OPS or op == "Mul":
                return consts
            if op == "Add" and consts:                          # a bias: keep walking
                name = next(n for n in node.input if n and not self.is_constant(n))
                continue
            if op in _LINEAR_WALK:
                name = node.input[0]
                continue
            return []
        return []

    def residual_scaled(self) -> set[str]:
        """Parameters of residual branches: for x + f(x) (x an ancestor of f(x)), those ending f."""
        scaled: set[str] = set()
        for node in self.graph.node:
            if node.op_type not in ("Add", "Sum"):
                continue
            dynamic = [n for n in node.input if n and not self.is_constant(n)]
            if len(dynamic) < 2:
                continue
            for i, a in enumerate(dynamic):
                ancestors = self.ancestors(a)
                if any(b in ancestors for j, b in enumerate(dynamic) if j != i):   # a = f(b): a is the branch
                    scaled.update(self.branch_params(a))
        return scaled


def _fan_in(op: str, index: int, node: onnx.NodeProto, shape: list[int]) -> int:
    if op in ("Conv", "ConvTranspose"):
        return max(1, math.prod(shape[1:]))
    if op == "Gemm":
        trans = _attr(node, "transB" if index == 1 else "transA", 0)
        if index == 1:
            return shape[1] if trans else shape[0]
        return shape[0] if trans else shape[-1]
    if op == "MatMul":
        return shape[-2] if index == 1 and len(shape) >= 2 else shape[-1]
    return max(1, shape[-1] if shape else 1)


def _unit_rows(z: np.ndarray, role, shape: list[int]) -> np.ndarray:
    """N(0, 1) draws reshaped to ``shape``, each output unit's fan-in rescaled to a sum of squares of fan_in.

    The weights into one output are then a random direction of exactly the expected length, so a
    layer's gain does not vary by chance (a depthwise 3x3 channel's would by +-50%).
    """
    w = z.reshape(shape)
    if role is None or list(role[3]) != shape or len(shape) < 2:
        return w
    op, index, node = role[0], role[1], role[2]
    if op == "Conv" and index == 1:
        axes = tuple(range(1, len(shape)))                     # [M, C/g, k...]
    elif op == "Gemm" and index == 1:
        axes = (1,) if _attr(node, "transB", 0) else (0,)
    elif op == "MatMul" and index == 1:
        axes = (len(shape) - 2,)
    else:
        return w
    fan_in = math.prod(shape[a] for a in axes)
    if fan_in < 2:
        return w
    if axes[0] == 0 or axes == (len(shape) - 2,):              # fan-in on rows: [..., K, N]
        m = w.reshape(-1, shape[-2], shape[-1]) if len(shape) > 2 else w.reshape(1, *shape)
        norm = np.sqrt(np.einsum("bkn,bkn->bn", m, m, dtype=np.float64) / fan_in)
        m /= np.maximum(norm, 1e-6).astype(np.float32)[:, None, :]
    else:                                                      # fan-in on the trailing axes: [M, ...]
        m = w.reshape(shape[0], -1)
        norm = np.sqrt(np.einsum("mk,mk->m", m, m, dtype=np.float64) / fan_in)
        m /= np.maximum(norm, 1e-6).astype(np.float32)[:, None]
    return w


def _fixed_values(tensor: TensorProto, role, rng: np.random.Generator) -> np.ndarray | None:
    """Values of a stripped tensor whose distribution is fixed by its role; None for matrix weights."""
    shape = list(tensor.dims)
    n = math.prod(shape)
    op, index = (role[0], role[1]) if role is not None else (None, -1)
    if op in _MATRIX_OPS and index in (0, 1):
        return None                                            # scaled by _Propagation
    normal = lambda std: rng.standard_normal(n, dtype=np.float32) * np.float32(std)  # noqa: E731
    uniform = lambda lo, hi: rng.uniform(lo, hi, n).astype(np.float32)                # noqa: E731
    if op in _MATRIX_OPS:
        values = normal(0.02)                                                         # bias
    elif op == "BatchNormalization":
        values = {1: lambda: uniform(0.5, 1.0), 2: lambda: normal(0.1), 3: lambda: normal(0.1),
                  4: lambda: uniform(0.5, 1.5)}.get(index, lambda: normal(0.1))()
    elif op in ("LayerNormalization", "GroupNormalization", "InstanceNormalization"):
        values = uniform(0.9, 1.1) if index == 1 else normal(0.02)
    elif op == "Mul":
        values = uniform(0.5, 1.0)                                                    # a learned scale
    elif op == "Div":
        values = uniform(0.5, 1.5)
    elif op == "Gather" and index == 0:
        values = normal(0.02)                                                         # an embedding table (BERT's)
    elif op == "PRelu":
        values = uniform(0.1, 0.3)
    elif op in ("Add", "Sub"):
        values = normal(0.02)                                                         # a bias
    else:
        values = normal(0.1)
    return values.reshape(shape)


_RECURRENT = ("LSTM", "GRU", "RNN")
# What PyTorch's exporters put between an nn.LSTM parameter or state and the LSTM node (the gate reordering,
# the initial state expanded to the batch).
_RECURRENT_PATH = _PASS_THROUGH | {"Slice", "Split", "Concat", "Expand"}


def _recurrent_use(roles: "_Roles", name: str, depth: int = 0):
    """(node, input index) of the LSTM/GRU/RNN node that ``name`` feeds, through data movement only."""
    for node, index in roles.consumers.get(name, []):
        if node.op_type in _RECURRENT:
            return node, index
        if node.op_type in _RECURRENT_PATH and depth < 6 and (index == 0 or node.op_type == "Concat"):
            found = _recurrent_use(roles, node.output[0], depth + 1)
            if found is not None:
                return found
    return None


def _recurrent_values(tensor: TensorProto, roles: "_Roles", rng: np.random.Generator) -> np.ndarray | None:
    """A recurrent node's W, R, B: U(-1/sqrt(H), 1/sqrt(H)), as torch initialises nn.LSTM/nn.GRU; its
    initial states: zeros, what PyTorch exports for ``rnn(x)``. None for any other tensor."""
    use = _recurrent_use(roles, tensor.name)
    if use is None:
        return None
    node, index = use
    shape = list(tensor.dims)
    if index >= 4:
        return np.zeros(shape, np.float32)
    hidden = int(_attr(node, "hidden_size", 0)) or max(1, shape[-1])
    bound = 1.0 / math.sqrt(hidden)
    return rng.uniform(-bound, bound, math.prod(shape)).astype(np.float32).reshape(shape)


# Gauss-Hermite nodes for E[f(y)], y ~ N(mu, sd^2).
_Z, _W = np.polynomial.hermite_e.hermegauss(64)
_W = _W / _W.sum()
_erf = np.vectorize(math.erf, otypes=[float])


def _sigmoid(y):
    return 1.0 / (1.0 + np.exp(-np.clip(y, -60, 60)))


def _softplus(y):
    return np.logaddexp(0.0, y)


def _unary(node: onnx.NodeProto, const):
    """numpy function of an elementwise unary op, or None."""
    op = node.op_type
    a = lambda name, d: _attr(node, name, d)  # noqa: E731
    if op == "Relu":
        return lambda y: np.maximum(y, 0.0)
    if op == "LeakyRelu":
        alpha = a("alpha", 0.01)
        return lambda y: np.where(y > 0, y, alpha * y)
    if op == "PRelu":
        slope = const(node.input[1])
        s = float(np.mean(slope)) if slope is not None else 0.25
        return lambda y: np.where(y > 0, y, s * y)
    if op == "Clip":
        lo, hi = a("min", -np.inf), a("max", np.inf)
        if len(node.input) > 1 and node.input[1] and const(node.input[1]) is not None:
            lo = float(const(node.input[1]))
        if len(node.input) > 2 and node.input[2] and const(node.input[2]) is not None:
            hi = float(const(node.input[2]))
        return lambda y: np.clip(y, lo, hi)
    if op == "Sigmoid":
        return _sigmoid
    if op == "HardSigmoid":
        alpha, beta = a("alpha", 0.2), a("beta", 0.5)
        return lambda y: np.clip(alpha * y + beta, 0.0, 1.0)
    if op == "HardSwish":
        return lambda y: y * np.clip(y / 6.0 + 0.5, 0.0, 1.0)
    if op == "Gelu":
        return lambda y: 0.5 * y * (1.0 + _erf(y / math.sqrt(2.0)))
    if op == "Elu":
        alpha = a("alpha", 1.0)
        return lambda y: np.where(y > 0, y, alpha * np.expm1(np.minimum(y, 0)))
    if op == "Selu":
        alpha, gamma = a("alpha", 1.67326), a("gamma", 1.0507)
        return lambda y: gamma * np.where(y > 0, y, alpha * np.expm1(np.minimum(y, 0)))
    simple = {"Tanh": np.tanh, "Erf": _erf, "Softplus": _softplus, "Softsign": lambda y: y / (1 + np.abs(y)),
              "Mish": lambda y: y * np.tanh(_softplus(y)), "Exp": lambda y: np.exp(np.clip(y, -60, 30)),
              "Abs": np.abs, "Neg": np.negative, "Sqrt": lambda y: np.sqrt(np.abs(y)), "Sin": np.sin,
              "Cos": np.cos, "Floor": np.floor, "Ceil": np.ceil, "Round": np.round}
    return simple.get(op)


_BINARY = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply,
           "Div": lambda x, y: x / np.where(np.abs(y) < 1e-6, 1e-6, y), "Max": np.maximum, "Min": np.minimum,
           "Pow": lambda x, y: np.power(np.abs(x), y)}


@dataclass
class _Stat:
    """Mean and second moment of a value, and how it is an elementwise function of a Gaussian source."""
    mu: float
    s2: float
    base: tuple = ()          # (source name, mean, sd) of the Gaussian source
    fn: object = None         # value = fn(source); None for the source itself

    @staticmethod
    def source(name: str, mu: float, s2: float) -> "_Stat":
        s2 = float(min(max(s2, 1e-12), 1e12))
        mu = float(np.clip(mu, -1e6, 1e6))
        return _Stat(mu, s2, (name, mu, math.sqrt(max(s2 - mu * mu, 0.0))), None)

    def apply(self, f) -> "_Stat":
        inner = self.fn
        fn = f if inner is None else (lambda y: f(inner(y)))
        return _Stat.from_fn(self.base, fn)

    @staticmethod
    def from_fn(base: tuple, fn) -> "_Stat":
        v = fn(base[1] + base[2] * _Z)
        return _Stat(float(_W @ v), float(_W @ (v * v)), base, fn)

    def values(self, y):
        return y if self.fn is None else self.fn(y)


class _Propagation:
    """Walk the graph once, estimating each value's mean and second moment for N(0, 1) inputs.

    Matrix weights are drawn as each Conv/Gemm/MatMul is reached, with std sqrt(1 / (fan_in * E[x^2]))
    so that the layer's output has a second moment near 1: for an input that is ReLU of a unit
    pre-activation (E[x^2] = 1/2) that is He's sqrt(2 / fan_in); after SiLU, HardSwish, GELU, an SE
    gate, a linear bottleneck or a residual sum it is the gain that keeps the scale.
    """

    def __init__(self, graph: onnx.GraphProto, roles: _Roles, values: dict, weights: dict, scaled: set,
                 shapes: dict | None = None):
        self.g, self.roles, self.values, self.weights, self.scaled = graph, roles, values, weights, scaled
        self.shapes = shapes or {}
        self.stats: dict[str, _Stat] = {}
        self.drawn: list[tuple[str, onnx.NodeProto]] = []    # (weight, its layer) in graph order
        self._const_cache: dict[str, np.ndarray | None] = {}

    def inside_fraction(self, node: onnx.NodeProto, kernel: list[int]) -> float:
        """Mean share of a Conv's taps that fall inside the input (zero padding reduces the output)."""
        shape = self.shapes.get(node.input[0])
        if node.op_type != "Conv" or not shape or len(shape) != len(kernel) + 2 or not all(shape[2:]):
            return 1.0
        n_sp = len(kernel)
        strides = _attr(node, "strides", [1] * n_sp)
        dilations = _attr(node, "dilations", [1] * n_sp)
        pads = list(_attr(node, "pads", [0] * 2 * n_sp))
        auto = _attr(node, "auto_pad", b"NOTSET")
        auto = auto.decode() if isinstance(auto, bytes) else auto
        frac = 1.0
        for i, (n, k, st, d) in enumerate(zip(shape[2:], kernel, strides, dilations)):
            span = (k - 1) * d + 1
            if auto in ("SAME_UPPER", "SAME_LOWER"):
                out = -(-n // st)
                total = max(0, (out - 1) * st + span - n)
                begin = total // 2 if auto == "SAME_UPPER" else total - total // 2
            elif auto == "VALID":
                out, begin = (n - span) // st + 1, 0
            else:
                begin, end = pads[i], pads[i + n_sp]
                out = (n + begin + end - span) // st + 1
            if out <= 0:
                return 1.0
            o = np.arange(out)[:, None] * st - begin + np.arange(k)[None, :] * d
            frac *= float(np.mean((o >= 0) & (o < n)))
        return max(frac, 1e-3)

    def const(self, name: str):
        origin = self.roles.origin(name) if name else None
        if origin is None or origin in self.weights:
            return None
        if origin in self._const_cache:
            return self._const_cache[origin]
        value = self.values.get(origin)
        if value is not None and value.size > 1 << 16:
            return value                                      # a big weight: do not cache a float64 copy
        if value is None and origin in self.roles.init:
            t = self.roles.init[origin]
            if not is_stripped(t) and t.data_location != TensorProto.EXTERNAL:
                value = onnx.numpy_helper.to_array(t)
        elif value is None:
            node = self.roles.producer[origin]
            attr = next((x for x in node.attribute), None)
            if attr is not None:
                value = np.asarray(onnx.helper.get_attribute_value(attr))
                if isinstance(value.flat[0] if value.size else 0, onnx.TensorProto):
                    value = onnx.numpy_helper.to_array(value.flat[0])
        if value is not None and not np.issubdtype(np.asarray(value).dtype, np.number):
            value = None
        self._const_cache[origin] = None if value is None else np.asarray(value, dtype=np.float64)
        return self._const_cache[origin]

    def stat(self, name: str) -> _Stat | None:
        if not name:
            return None
        if name not in self.stats:
            c = self.const(name)
            if c is not None:
                return None
            self.stats[name] = _Stat.source(name, 0.0, 1.0)    # a graph input or an unknown value
        return self.stats[name]

    def run(self) -> None:
        for node in self.g.node:
            if node.op_type == "Constant" or all(self.roles.origin(o) is not None for o in node.output if o):
                continue                                        # a constant, not an activation
            try:
                outs = self._node(node)
            except Exception:   # an estimate only: never let it stop the fill
                outs = None
            if outs is None:
                first = next((self.stats.get(i) for i in node.input if i and i in self.stats), None)
                outs = first if first is not None else _Stat.source("?", 0.0, 1.0)
            for o in node.output:
                if o:
                    self.stats[o] = outs

    def _matrix(self, node: onnx.NodeProto) -> _Stat | None:
        op = node.op_type
        w_index = 1
        constant = self.roles.is_constant
        if op in ("Gemm", "MatMul") and constant(node.input[0]) and not constant(node.input[1]):
            w_index = 0
        w_name = self.roles.origin(node.input[w_index])
        x = self.stat(node.input[1 - w_index])
        if w_name is None or x is None:
            return self.stat(node.input[1]) if op == "MatMul" else None
        x2 = min(max(x.s2, 1e-8), 1e8)
        alpha2 = float(_attr(node, "alpha", 1.0)) ** 2 if op == "Gemm" else 1.0
        if w_name in self.weights:                            # stripped: draw it now
            tensor, z = self.weights.pop(w_name)
            shape = list(tensor.dims)
            role = self.roles.role(w_name, shape)
            fan_in = _fan_in(*role) if role else max(1, math.prod(shape[1:]))
            inside = self.inside_fraction(node, shape[2:])
            std = math.sqrt(1.0 / (fan_in * inside * x2 * max(alpha2, 1e-12)))
            if w_name in self.scaled:
                std *= RESIDUAL_BRANCH_SCALE
            w = _unit_rows(z, role, shape)
            w *= np.float32(std)
            self.values[w_name] = w
            self.drawn.append((w_name, node))
            per_output = fan_in * std * std                   # expected sum of squares into one output
        else:
            w = self.const(node.input[w_index])
            if w is None:
                return None
            shape = list(w.shape)
            fan_in = _fan_in(op, w_index, node, shape)
            inside = self.inside_fraction(node, shape[2:])
            per_output = float(np.sum(w * w)) / max(1.0, w.size / fan_in)
        s2 = per_output * inside * alpha2 * x.s2
        mu = 0.0
        if len(node.input) > 2 and node.input[2]:
            b = self.const(node.input[2])
            if b is not None:
                s2 += float(np.mean(b * b))
                mu = float(np.mean(b))
        return _Stat.source(node.output[0], mu, s2)

    def _node(self, node: onnx.NodeProto) -> _Stat | None:
        op = node.op_type
        if op in _MATRIX_OPS:
            return self._matrix(node)
        if op == "BatchNormalization":
            x = self.stat(node.input[0])
            g, b, m, v = (self.const(n) for n in node.input[1:5])
            if x is None or any(p is None for p in (g, b, m, v)):
                return None
            k = g / np.sqrt(v + float(_attr(node, "epsilon", 1e-5)))
            var = max(x.s2 - x.mu * x.mu, 0.0)
            mean_c = k * (x.mu - m) + b
            return _Stat.source(node.output[0], float(np.mean(mean_c)), float(np.mean(k * k * var + mean_c * mean_c)))
        if op in ("LayerNormalization", "GroupNormalization", "InstanceNormalization"):
            g = self.const(node.input[1]) if len(node.input) > 1 else None
            b = self.const(node.input[2]) if len(node.input) > 2 and node.input[2] else None
            g2 = float(np.mean(g * g)) if g is not None else 1.0
            mb, b2 = (float(np.mean(b)), float(np.mean(b * b))) if b is not None else (0.0, 0.0)
            return _Stat.source(node.output[0], mb, g2 + b2)
        f = _unary(node, self.const)
        if f is not None:
            x = self.stat(node.input[0])
            return None if x is None else x.apply(f)
        if op in _BINARY:
            return self._binary(node, _BINARY[op])
        if op in ("Sum", "Mean"):
            xs = [self.stat(n) for n in node.input if n]
            xs = [x for x in xs if x is not None]
            if not xs:
                return None
            mu, s2 = sum(x.mu for x in xs), sum(x.s2 for x in xs) + sum(
                2 * a.mu * b.mu for i, a in enumerate(xs) for b in xs[i + 1:])
            if op == "Mean":
                mu, s2 = mu / len(xs), s2 / len(xs) ** 2
            return _Stat.source(node.output[0], mu, s2)
        if op == "Concat":
            xs = [self.stat(n) for n in node.input if n]
            xs = [x for x in xs if x is not None]
            if not xs:
                return None
            return _Stat.source(node.output[0], float(np.mean([x.mu for x in xs])), float(np.mean([x.s2 for x in xs])))
        if op in ("GlobalAveragePool", "AveragePool", "ReduceMean", "GlobalMaxPool", "MaxPool", "ReduceMax",
                  "LpPool", "GlobalLpPool"):
            x = self.stat(node.input[0])
            return None if x is None else _Stat.source(node.output[0], x.mu, x.s2)
        return None                                             # shape-preserving or unknown: pass through

    def _binary(self, node: onnx.NodeProto, f) -> _Stat | None:
        a_name, b_name = node.input[0], node.input[1]
        a, b = self.stat(a_name), self.stat(b_name)
        ca, cb = self.const(a_name), self.const(b_name)
        if a is not None and b is not None:
            if a.base and b.base and a.base[0] == b.base[0]:   # both functions of one source (SiLU, GELU...)
                fa, fb = a.values, b.values
                return _Stat.from_fn(a.base, lambda y: f(fa(y), fb(y)))
            op = node.op_type
            if op == "Add":
                return _Stat.source(node.output[0], a.mu + b.mu, a.s2 + b.s2 + 2 * a.mu * b.mu)
            if op == "Sub":
                return _Stat.source(node.output[0], a.mu - b.mu, a.s2 + b.s2 - 2 * a.mu * b.mu)
            if op == "Mul":
                return _Stat.source(node.output[0], a.mu * b.mu, a.s2 * b.s2)
            return a
        x, c, x_first = (a, cb, True) if a is not None else (b, ca, False)
        if x is None or c is None:
            return None
        if c.size == 1:
            cv = float(c.reshape(-1)[0])
            return x.apply((lambda y: f(y, cv)) if x_first else (lambda y: f(cv, y)))
        if node.op_type in ("Add", "Sub", "Mul", "Div"):         # a per-channel constant
            cm = c if x_first else c
            if node.op_type == "Mul":
                return _Stat.source(node.output[0], x.mu * float(np.mean(cm)), x.s2 * float(np.mean(cm * cm)))
            if node.op_type == "Div" and x_first:
                inv = 1.0 / np.where(np.abs(cm) < 1e-6, 1e-6, cm)
                return _Stat.source(node.output[0], x.mu * float(np.mean(inv)), x.s2 * float(np.mean(inv * inv)))
            sign = -1.0 if node.op_type == "Sub" and x_first else 1.0
            mc, c2 = float(np.mean(cm)) * sign, float(np.mean(cm * cm))
            if node.op_type == "Sub" and not x_first:
                return _Stat.source(node.output[0], mc - x.mu, c2 + x.s2 - 2 * mc * x.mu)
            return _Stat.source(node.output[0], x.mu + mc, x.s2 + c2 + 2 * x.mu * mc)
        return None


def _shapes(model: onnx.ModelProto) -> dict[str, list[int]]:
    """Static shapes of the main graph's values (onnx shape inference), {} where it cannot."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:
        return {}
    shapes = {}
    for v in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        t = v.type.tensor_type
        if t.HasField("shape"):
            shapes[v.name] = [d.dim_value if d.HasField("dim_value") else 0 for d in t.shape.dim]
    return shapes


CALIBRATION_TOLERANCE = 2.0   # a layer's output second moment may be off its target by this factor
_MAX_CALIBRATION_RUNS = 400


def _quantized_factor(f: float) -> float:
    """``f`` rounded to a sixteenth of an octave, so run-to-run float noise cannot change the weights."""
    return float(2.0 ** (round(math.log2(f) * 16) / 16))


def calibrate(model: onnx.ModelProto, values: dict, drawn: list, scaled: set, seed: int = 0) -> dict[str, float]:
    """LSUV-style check with ONNX Runtime on one seeded N(0, 1) input: rescale drawn weights in place.

    The analytic estimate is right on average but a random draw is not average: through SiLU,
    HardSwish and squeeze-excitation gates the error compounds (the scale grows where the
    nonlinearity's gain grows with it). In graph order, every layer whose output second moment is
    off its target (1, or RESIDUAL_BRANCH_SCALE^2 at the end of a residual branch) by more than
    CALIBRATION_TOLERANCE has its weights rescaled to hit the target; layers that do not depend on
    a layer rescaled in a run are checked in the same run. Returns {weight: factor} (applied).
    """
    import onnxruntime as ort

    layers = [(w, node.output[0]) for w, node in drawn]
    if not layers:
        return {}
    names = {w for w, _ in layers}
    calib = onnx.ModelProto()
    calib.CopyFrom(model)   # the caller's tensors still have no data: only the graph is copied
    g = calib.graph
    kept = [t for t in g.initializer if t.name not in names]
    inputs = {t.name: t for t in g.initializer if t.name in names}
    del g.initializer[:]
    g.initializer.extend(kept)
    for t in g.initializer:
        if t.name in values and is_stripped(t):
            t.raw_data = values[t.name].astype(_FLOAT_NP.get(t.data_type, np.float32), copy=False).tobytes()
    for name, t in inputs.items():
        g.input.append(onnx.helper.make_tensor_value_info(name, t.data_type, list(t.dims)))
    present = {o.name for o in g.output}
    for _, out in layers:
        if out not in present:
            g.output.append(onnx.ValueInfoProto(name=out))
            present.add(out)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.log_severity_level = 3
    session = ort.InferenceSession(calib.SerializeToString(), options, providers=["CPUExecutionProvider"])
    data_input = next(i for i in session.get_inputs() if i.name not in names)
    shape = [d if isinstance(d, int) and d > 0 else 1 for d in data_input.shape]
    x = np.random.default_rng([seed, 0xC0FFEE]).standard_normal(shape, dtype=np.float32)
    if data_input.type == "tensor(int64)":  # token ids
        x = np.random.default_rng([seed, 0xC0FFEE]).integers(0, index_rows(model), shape)
    fetch = [out for _, out in layers]

    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for i in node.input:
            consumers.setdefault(i, []).append(node)

    def downstream(value: str) -> set[str]:
        seen, stack = set(), [value]
        while stack:
            for node in consumers.get(stack.pop(), []):
                for o in node.output:
                    if o not in seen:
                        seen.add(o)
                        stack.append(o)
        return seen

    factors = {w: 1.0 for w, _ in layers}
    # rescaled only when a factor changes: multiplying every weight on every run was most of a VGG's fill
    feeds = {data_input.name: x, **{w: values[w] for w in names}}
    done_upto = 0
    for _ in range(_MAX_CALIBRATION_RUNS):
        results = dict(zip(fetch, session.run(fetch, feeds)))
        stale: set[str] = set()
        changed = False
        for i, (w, out) in enumerate(layers):
            if i < done_upto or out in stale:
                continue
            y = results[out].astype(np.float64)
            s2 = float(np.mean(y * y))
            target = RESIDUAL_BRANCH_SCALE ** 2 if w in scaled else 1.0
            if not np.isfinite(s2) or s2 <= 0:
                continue
            if target / CALIBRATION_TOLERANCE <= s2 <= target * CALIBRATION_TOLERANCE:
                if not stale and i == done_upto:
                    done_upto = i + 1
                continue
            factors[w] = _quantized_factor(factors[w] * math.sqrt(target / s2))
            feeds[w] = values[w] if factors[w] == 1.0 else values[w] * np.float32(factors[w])
            stale |= downstream(out)
            changed = True
        if not changed:
            break
    for w, f in factors.items():
        if f != 1.0:
            values[w] *= np.float32(f)
    return factors


def fill_model(model: onnx.ModelProto, seed: int = 0, calibrated: bool = True,
               factors: dict[str, float] | None = None) -> onnx.ModelProto:
    """Fill every stripped tensor of ``model`` in place (see ``load_model``); returns ``model``.

    With ``calibrated`` (and onnxruntime importable), ``calibrate`` then checks the layers' output
    scales on one seeded input and rescales the weights of those that drifted. ``factors``, if given,
    is a cache of those rescalings: used when it is not empty, filled in when it is.
    """
    for graph in _subgraphs(model.graph):
        stripped = [t for t in graph.initializer if is_stripped(t)]
        if not stripped:
            continue
        roles = _Roles(graph)
        scaled = roles.residual_scaled()
        values: dict[str, np.ndarray] = {}
        weights: dict[str, tuple[TensorProto, np.ndarray]] = {}
        for tensor in stripped:
            rng = np.random.default_rng([seed, zlib.crc32(tensor.name.encode())])
            v = _recurrent_values(tensor, roles, rng)
            if v is None:
                v = _fixed_values(tensor, roles.role(tensor.name, list(tensor.dims)), rng)
            if v is None:
                weights[tensor.name] = (tensor, rng.standard_normal(math.prod(tensor.dims), dtype=np.float32))
            else:
                values[tensor.name] = v * np.float32(RESIDUAL_BRANCH_SCALE) if tensor.name in scaled else v
        walk = _Propagation(graph, roles, values, weights, scaled, _shapes(model) if graph is model.graph else None)
        walk.run()
        for name, (tensor, z) in weights.items():               # not reached by the walk: plain He
            role = roles.role(name, list(tensor.dims))
            fan_in = _fan_in(*role) if role else max(1, math.prod(tensor.dims[1:]))
            values[name] = (z * np.float32(math.sqrt(2.0 / fan_in))).reshape(list(tensor.dims))
        if calibrated and graph is model.graph:
            if factors:
                for w, f in factors.items():
                    if f != 1.0 and w in values:
                        values[w] *= np.float32(f)
            else:
                try:
                    found = calibrate(model, values, walk.drawn, scaled, seed)
                except ImportError:
                    found = {}
                if factors is not None:
                    factors.update(found)
        for tensor in stripped:
            v = values[tensor.name]
            if tensor.data_type == TensorProto.BFLOAT16:
                raw = (v.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16).tobytes()
            else:
                raw = v.astype(_FLOAT_NP[tensor.data_type], copy=False).tobytes()
            tensor.raw_data = raw
            tensor.doc_string = ""
    return model


@functools.lru_cache(maxsize=None)
def _stripped_bytes(name: str) -> bytes:
    return entry(name).path.read_bytes()


def load_model(name: str, seed: int = 0) -> onnx.ModelProto:
    """Corpus model ``name`` (an ``Entry.name``) with its stripped tensors filled from ``seed``.

    Roles come from the node and input index that consume each tensor (through Identity, Cast,
    Transpose, Reshape, ...). Conv/Gemm/MatMul weights are N(0, sqrt(g / fan_in)) with the gain g
    set, layer by layer, so that the layer's output keeps a second moment near 1 for N(0, 1) inputs
    (``_Propagation`` estimates each value's moments in one walk of the graph): g = 2 (He) after
    a ReLU, more after SiLU, HardSwish or an SE gate, 1 after a linear layer; then ``calibrate``
    runs the model once or a few times in ONNX Runtime on a seeded N(0, 1) input and rescales, by
    powers of 2^(1/16), the layers whose output drifted more than 2x off (LSUV-style; the factors
    are cached per name and seed). Logits come out finite with a std near 1. BatchNorm scale is
    U(0.5, 1), bias and mean N(0, 0.1), var U(0.5, 1.5); LayerNorm scale U(0.9, 1.1); biases
    N(0, 0.02); Mul operands (layer scales) U(0.5, 1). The parameters ending the branch f of each
    residual ``x + f(x)`` are scaled by ``RESIDUAL_BRANCH_SCALE``, as trained nets have small gammas
    there. An LSTM/GRU's W, R and B (also through the Slice/Concat the dynamo exporter reorders the
    gates with) are U(-1/sqrt(H), 1/sqrt(H)), as torch initialises them, and its initial states zero.
    The random draws depend only on (seed, tensor name). Tensors the exporter wrote (integers, small
    float constants) keep their real values.
    """
    model = onnx.load_model_from_string(_stripped_bytes(name))
    return fill_model(model, seed, factors=_CALIBRATION_FACTORS.setdefault((name, seed), {}))


_CALIBRATION_FACTORS: dict[tuple[str, int], dict[str, float]] = {}   # calibrate() once per (name, seed)


def index_rows(model: onnx.ModelProto) -> int:
    """Rows of the smallest table a Gather looks up at the graph input: token ids must lie below it."""
    inits = {t.name: t for t in model.graph.initializer}
    value = next(v.name for v in model.graph.input if v.name not in inits)
    return min(inits[n.input[0]].dims[0] for n in model.graph.node
               if n.op_type == "Gather" and len(n.input) > 1 and n.input[1] == value and n.input[0] in inits)


def sample_input(entry: "Entry", seed: int) -> np.ndarray:
    """A seeded input for ``entry``: N(0, 1) floats, or token ids below the vocabulary for an encoder."""
    rng = np.random.default_rng(seed)
    if entry.task == "encoder":
        rows = index_rows(onnx.load_model_from_string(_stripped_bytes(entry.name)))
        return rng.integers(0, rows, entry.input_shape).astype(np.int64)
    return rng.standard_normal(entry.input_shape).astype(np.float32)


def input_shape(model: onnx.ModelProto) -> list[int]:
    """The first graph input's shape (symbolic dimensions as 1)."""
    inits = {t.name for t in model.graph.initializer}
    value = next(v for v in model.graph.input if v.name not in inits)
    return [d.dim_value if d.HasField("dim_value") else 1 for d in value.type.tensor_type.shape.dim]


def save_with_external_data(model: onnx.ModelProto, path) -> Path:
    """Write ``path`` and ``path.name + ".data"`` as torch's dynamo exporter lays them out.

    Every initializer of more than 256 bytes goes to one file beside the model, named after it,
    as onnx_ir (which the exporter saves with) does; smaller ones stay inline. ``model`` is not
    changed (it is copied first: onnx.save_model moves the data of the model it saves).
    """
    path = Path(path)
    data = path.with_name(path.name + ".data")
    if data.exists():
        data.unlink()                       # onnx appends to an existing data file
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    onnx.save_model(copy, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data.name,
                    size_threshold=sys.getsizeof(b"") + 257)   # onnx compares getsizeof(raw_data)
    return path


# Filled corpus files, kept between test sessions: filling VGG-11 (133 M seeded draws, then ONNX Runtime
# checks) takes seconds, reading the file back a fraction of one.
SAVED_DIR = Path(tempfile.gettempdir()) / "tpusim-test-corpus"
_UNUSED_KEY_LIFETIME_S = 24 * 3600   # another checkout's (or a just-edited filler's) files live this long unused


def _fill_key(name: str, seed: int) -> str:
    """Hash of everything a fill reads: the stripped file, this module's code, the libraries it draws and
    calibrates with, the seed."""
    import onnxruntime

    digest = hashlib.sha256()
    for part in (_stripped_bytes(name), Path(__file__).read_bytes(), np.__version__.encode(),
                 onnx.__version__.encode(), onnxruntime.__version__.encode(), str(seed).encode()):
        digest.update(hashlib.sha256(part).digest())
    return digest.hexdigest()[:20]


def saved_model(name: str, seed: int = 0) -> Path:
    """The path of ``load_model(name, seed)`` saved as its exporter lays it out (external data for dynamo),
    filled and written once per machine: ``SAVED_DIR/<name>/<key>/``, ``<key>`` hashing what the fill
    reads (``_fill_key``), so an edit to the filler or a new library fills again. Read it, never write
    beside it. Folders of other keys unused for a day are removed."""
    e = entry(name)
    folder = SAVED_DIR / name
    key = _fill_key(name, seed)
    path = folder / key / e.file
    if not path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=folder))
        try:
            model = load_model(name, seed)
            if e.external_data:
                save_with_external_data(model, staging / e.file)
            else:
                onnx.save(model, str(staging / e.file))
            del model
            try:
                staging.rename(folder / key)        # whole or not at all, for a concurrent session
            except OSError:
                if not path.is_file():             # not another session's rename that came first
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    now = time.time()
    os.utime(folder / key, (now, now))
    for other in folder.iterdir():
        try:
            unused_s = now - other.stat().st_mtime
        except FileNotFoundError:                   # another session removed it
            continue
        if other.name != key and unused_s > _UNUSED_KEY_LIFETIME_S:
            shutil.rmtree(other, ignore_errors=True)
    return path


# ---------------------------------------------------------------- MLPerf Tiny via tflite2onnx

# Models of ../shared/mlperf_tiny that tflite2onnx converts. Not kws_ref_model_float32: it is
# hybrid (int8 conv weights, float depthwise/FC) and tflite2onnx writes a graph with int8 Conv
# weights that ONNX rejects; the *_quant/*_int8 files are full-int8 TFLite, not float models.
MLPERF_TINY_CONVERTIBLE = ("pretrainedResnet", "vww_96_float")


def mlperf_tiny_dir() -> Path:
    beside = Path(__file__).resolve().parents[2] / "shared" / "mlperf_tiny"
    return beside if beside.is_dir() else Path("/work/shared/mlperf_tiny")


def mlperf_tiny_onnx(name: str, out_dir) -> Path:
    """Convert ``<shared>/mlperf_tiny/<name>.tflite`` with tflite2onnx; returns ``out_dir/<name>.onnx``.

    Skips the calling test when the shared folder, the file, or the tflite2onnx package is absent.
    """
    import pytest

    if name not in MLPERF_TINY_CONVERTIBLE:
        raise ValueError(f"{name!r}: tflite2onnx converts only {', '.join(MLPERF_TINY_CONVERTIBLE)} "
                         "(kws_ref_model_float32 is a hybrid int8/float file and does not convert)")
    src = mlperf_tiny_dir() / f"{name}.tflite"
    if not src.is_file():
        pytest.skip(f"{src} is absent (the shared MLPerf Tiny folder is not beside the repository)")
    tflite2onnx = pytest.importorskip("tflite2onnx", reason="tflite2onnx is not installed")
    out = Path(out_dir) / f"{name}.onnx"
    out.parent.mkdir(parents=True, exist_ok=True)
    tflite2onnx.convert(str(src), str(out))
    return out


# ---------------------------------------------------------------- ONNX Runtime QDQ

def ort_qdq_copy(model: onnx.ModelProto, out_path, per_channel: bool, activation_type: str = "uint8",
                 symmetric_activations: bool = False, samples: int = 8, seed: int = 0) -> Path:
    """ONNX Runtime's ``quantize_static`` (QDQ, int8 weights) of ``model``, written to ``out_path``.

    Calibrated on ``samples`` seeded N(0, 1) inputs of the model's input shape, after ORT's
    ``quant_pre_process`` (shape inference and basic optimisation), as ORT recommends.
    """
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    act = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}[activation_type]
    shape = input_shape(model)
    inits = {t.name for t in model.graph.initializer}
    input_name = next(v.name for v in model.graph.input if v.name not in inits)
    rng = np.random.default_rng(seed)
    batches = [rng.standard_normal(shape, dtype=np.float32) for _ in range(samples)]

    class Reader(CalibrationDataReader):
        def __init__(self):
            self._it = iter(batches)

        def get_next(self):
            x = next(self._it, None)
            return None if x is None else {input_name: x}

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        fp32, pre = Path(tmp) / "fp32.onnx", Path(tmp) / "pre.onnx"
        onnx.save_model(model, str(fp32))
        quant_pre_process(str(fp32), str(pre))
        quantize_static(str(pre), str(out_path), Reader(), quant_format=QuantFormat.QDQ, per_channel=per_channel,
                        activation_type=act, weight_type=QuantType.QInt8,
                        extra_options={"ActivationSymmetric": symmetric_activations})
    return out_path
