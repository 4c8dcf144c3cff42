"""BERT encoders (Devlin et al. 2019) as built-in workloads: ``bert_base`` (12 layers, hidden 768, 12
heads, intermediate 3072, sequence 128, the 30,522-token WordPiece vocabulary) and ``bert_tiny`` (2
layers, hidden 128, 2 heads, intermediate 512: Turc et al. 2019's BERT-Tiny, at sequence 128).

The graph is the one HuggingFace's ``BertModel`` (without the pooler) computes, written as an exporter
writes it at opset 17: the input is ``input_ids`` (int64, [batch, sequence]); word, position and
token-type embeddings are Gathers of their tables (the position and token-type ids are constants, as
they are when a model is exported with ``input_ids`` alone), summed and layer-normalised; each layer
is self-attention (Q, K, V projections, heads split by Reshape + Transpose, ``softmax(Q K^T / sqrt(d))
V``, the scale on Q as torch's scaled_dot_product_attention applies it, heads merged, output
projection, residual, LayerNormalization) and a feed-forward block (GELU in its exact Erf form, as
torch exports ``nn.GELU``; residual; LayerNormalization). The output is the last hidden state
[batch, sequence, hidden].

Weights are seeded and scaled like a trained BERT's rather than its initialisation (whose N(0, 0.02)
matrices leave attention uniform and every residual branch negligible): each projection is
N(0, gain^2 / fan_in) with a log-normal spread of its output channels' scales, the gains chosen so
that attention scores have a std near 2 (peaked attention), value and feed-forward activations near
1, and each residual branch about half the residual stream; biases and LayerNorm shifts N(0, 0.02),
LayerNorm gains around 1, embedding tables N(0, 0.02) (BERT's initializer range).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from tpusim import tensor_ops
from tpusim.ops.erf import erf
from tpusim.ops.layernorm import layer_norm
from tpusim.workloads.builder import BATCH_DIM, IR_VERSION, OPSET, OUTPUT_NAME, GeneratedModel, round_statistic

INPUT_IDS = "input_ids"
INITIALIZER_RANGE = 0.02    # BERT's std of its embedding tables, biases and LayerNorm shifts
# Gains (std x sqrt(fan_in)) of the projections, so activations spread as in a trained BERT.
QK_GAIN = 1.4               # q and k entries of std ~1.4: scores q.k / sqrt(d) of std ~2
VALUE_GAIN = 1.0
BRANCH_GAIN = 0.5           # the output projections that end a residual branch
FFN_GAIN = 1.0
CHANNEL_SPREAD_SIGMA = 0.5  # log-normal sigma of the output channels' weight scales
LN_EPSILON = 1e-12          # BERT's LayerNorm epsilon
SAMPLE_BATCH = 2


@dataclass(frozen=True)
class BertSpec:
    layers: int
    hidden: int
    heads: int
    intermediate: int
    sequence: int
    vocab: int = 30522        # the uncased WordPiece vocabulary
    max_positions: int = 512
    type_vocab: int = 2

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def parameters(self) -> int:
        """Trainable parameters of the encoder (HF ``BertModel`` without the pooler)."""
        h, i = self.hidden, self.intermediate
        embeddings = (self.vocab + self.max_positions + self.type_vocab) * h + 2 * h
        layer = 4 * (h * h + h) + 2 * h + (h * i + i) + (i * h + h) + 2 * h
        return embeddings + self.layers * layer

    def macs(self, batch: int = 1) -> int:
        """Multiply-accumulates of one pass: projections, feed-forward, and both attention products."""
        s, h, i = self.sequence, self.hidden, self.intermediate
        return batch * self.layers * (4 * s * h * h + 2 * s * h * i + 2 * s * s * h)


BERT_BASE = BertSpec(layers=12, hidden=768, heads=12, intermediate=3072, sequence=128)
BERT_TINY = BertSpec(layers=2, hidden=128, heads=2, intermediate=512, sequence=128)


class _Builder:
    """ONNX nodes and initializers, with the numpy value of every tensor on a seeded sample batch."""

    def __init__(self, ids: np.ndarray, seed: int):
        self.rng = np.random.default_rng(seed)
        self.values: dict[str, np.ndarray] = {INPUT_IDS: ids}
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._constants: dict[tuple, str] = {}

    def init(self, name: str, value: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(np.array(value, order="C"), name))  # keeps 0-d scalars 0-d
        self.values[name] = value
        return name

    def const(self, value, dtype=np.float32) -> str:
        array = np.asarray(value, dtype=dtype)
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self._constants:
            self._constants[key] = self.init(f"const_{len(self._constants)}", array)
        return self._constants[key]

    def node(self, op: str, inputs: list[str], out: str, value: np.ndarray, **attrs) -> str:
        self.nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        # float64, as in tpusim.workloads.builder: no BLAS kernel's float32 rounding reaches the weights.
        self.values[out] = value.astype(np.float64) if value.dtype.kind == "f" else value
        return out

    def normal(self, shape, std: float) -> np.ndarray:
        return (self.rng.standard_normal(shape) * std).astype(np.float32)

    def linear(self, x: str, n_out: int, name: str, gain: float) -> str:
        """``x @ W + b`` as torch exports ``nn.Linear`` on a 3-D input: MatMul on the [in, out] weight, Add.
        ``W`` is N(0, gain^2 / in) times a log-normal factor per output channel (mean square 1)."""
        k = self.values[x].shape[-1]
        spread = np.exp(CHANNEL_SPREAD_SIGMA * self.rng.standard_normal(n_out))
        std = float(round_statistic(gain / math.sqrt(k * float(np.mean(self.values[x] ** 2)))))
        weight = (self.normal((k, n_out), std) * (spread / np.sqrt(np.mean(spread**2)))).astype(np.float32)
        bias = self.normal(n_out, INITIALIZER_RANGE)
        w, b = self.init(f"{name}.weight", weight), self.init(f"{name}.bias", bias)
        product = self.node("MatMul", [x, w], f"{name}.matmul", self.values[x] @ weight)
        return self.node("Add", [product, b], name, self.values[product] + bias)

    def layer_norm(self, x: str, name: str) -> str:
        h = self.values[x].shape[-1]
        gamma = (1.0 + self.normal(h, 0.05)).astype(np.float32)
        beta = self.normal(h, INITIALIZER_RANGE)
        g, b = self.init(f"{name}.weight", gamma), self.init(f"{name}.bias", beta)
        y = layer_norm(self.values[x], 2, LN_EPSILON, gamma, beta)
        return self.node("LayerNormalization", [x, g, b], name, y, axis=-1, epsilon=LN_EPSILON)

    def add(self, a: str, b: str, name: str) -> str:
        return self.node("Add", [a, b], name, self.values[a] + self.values[b])

    def reshape(self, x: str, shape: list[int], name: str) -> str:
        value = self.values[x]
        target = [value.shape[i] if d == 0 else d for i, d in enumerate(shape)]
        return self.node("Reshape", [x, self.const(shape, np.int64)], name, value.reshape(target))

    def transpose(self, x: str, perm: list[int], name: str) -> str:
        return self.node("Transpose", [x], name, np.ascontiguousarray(self.values[x].transpose(perm)), perm=perm)

    def gelu(self, x: str, name: str) -> str:
        """torch's exact GELU as its exporters write it at opset 17: x * 0.5 * (1 + erf(x / sqrt 2))."""
        v = self.values[x]
        d = self.node("Div", [x, self.const(math.sqrt(2.0))], f"{name}.div", v / np.float32(math.sqrt(2.0)))
        e = self.node("Erf", [d], f"{name}.erf", erf(self.values[d]))
        a = self.node("Add", [e, self.const(1.0)], f"{name}.add", self.values[e] + np.float32(1.0))
        m = self.node("Mul", [x, a], f"{name}.mul", v * self.values[a])
        return self.node("Mul", [m, self.const(0.5)], name, self.values[m] * np.float32(0.5))


def _attention(b: _Builder, x: str, spec: BertSpec, prefix: str) -> str:
    heads, d = spec.heads, spec.head_dim
    split = [0, spec.sequence, heads, d]
    q = b.transpose(b.reshape(b.linear(x, spec.hidden, f"{prefix}.query", QK_GAIN), split, f"{prefix}.query.view"),
                    [0, 2, 1, 3], f"{prefix}.query.heads")
    k = b.transpose(b.reshape(b.linear(x, spec.hidden, f"{prefix}.key", QK_GAIN), split, f"{prefix}.key.view"),
                    [0, 2, 3, 1], f"{prefix}.key.heads_t")
    v = b.transpose(b.reshape(b.linear(x, spec.hidden, f"{prefix}.value", VALUE_GAIN), split, f"{prefix}.value.view"),
                    [0, 2, 1, 3], f"{prefix}.value.heads")
    scale = np.float32(1.0 / math.sqrt(d))
    q = b.node("Mul", [q, b.const(scale)], f"{prefix}.query.scaled", b.values[q] * scale)
    scores = b.node("MatMul", [q, k], f"{prefix}.scores", b.values[q] @ b.values[k])
    probs = b.node("Softmax", [scores], f"{prefix}.probs", tensor_ops.softmax(b.values[scores], axis=-1), axis=-1)
    context = b.node("MatMul", [probs, v], f"{prefix}.context", b.values[probs] @ b.values[v])
    merged = b.reshape(b.transpose(context, [0, 2, 1, 3], f"{prefix}.context.tokens"), [0, spec.sequence, spec.hidden],
                       f"{prefix}.context.view")
    return merged


def build_bert(spec: BertSpec, seed: int, name: str) -> GeneratedModel:
    sequence = np.random.SeedSequence(seed)
    weight_seed, data_seed = (int(s.generate_state(1)[0]) for s in sequence.spawn(2))
    ids = np.random.default_rng(data_seed).integers(0, spec.vocab, (SAMPLE_BATCH, spec.sequence), dtype=np.int64)
    b = _Builder(ids, weight_seed)
    h = spec.hidden
    word = b.init("embeddings.word_embeddings.weight", b.normal((spec.vocab, h), INITIALIZER_RANGE))
    position = b.init("embeddings.position_embeddings.weight", b.normal((spec.max_positions, h), INITIALIZER_RANGE))
    token_type = b.init("embeddings.token_type_embeddings.weight", b.normal((spec.type_vocab, h), INITIALIZER_RANGE))
    x = b.node("Gather", [word, INPUT_IDS], "embeddings.word", b.values[word][ids], axis=0)
    positions = np.arange(spec.sequence, dtype=np.int64)
    pos = b.node("Gather", [position, b.const(positions, np.int64)], "embeddings.position",
                 b.values[position][positions], axis=0)
    types = np.zeros(spec.sequence, dtype=np.int64)
    typ = b.node("Gather", [token_type, b.const(types, np.int64)], "embeddings.token_type",
                 b.values[token_type][types], axis=0)
    x = b.add(b.add(x, typ, "embeddings.sum_types"), pos, "embeddings.sum")
    x = b.layer_norm(x, "embeddings.LayerNorm")
    for i in range(spec.layers):
        prefix = f"encoder.layer.{i}"
        attended = b.linear(_attention(b, x, spec, f"{prefix}.attention.self"), h, f"{prefix}.attention.output.dense",
                            BRANCH_GAIN)
        x = b.layer_norm(b.add(attended, x, f"{prefix}.attention.residual"), f"{prefix}.attention.output.LayerNorm")
        hidden = b.gelu(b.linear(x, spec.intermediate, f"{prefix}.intermediate.dense", FFN_GAIN),
                        f"{prefix}.intermediate.gelu")
        out = b.linear(hidden, h, f"{prefix}.output.dense", BRANCH_GAIN)
        x = b.layer_norm(b.add(out, x, f"{prefix}.output.residual"), f"{prefix}.output.LayerNorm")
    b.nodes[-1].output[0] = OUTPUT_NAME
    output = b.values[x]
    doc = (f"BERT encoder ({spec.layers} layers, hidden {h}, {spec.heads} heads, intermediate {spec.intermediate}, "
           f"sequence {spec.sequence}), HuggingFace BertModel topology without the pooler, synthetic weights")
    graph = helper.make_graph(
        b.nodes, name, [helper.make_tensor_value_info(INPUT_IDS, TensorProto.INT64, [BATCH_DIM, spec.sequence])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, [BATCH_DIM, spec.sequence, h])],
        initializer=b.inits, doc_string=doc)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION,
                              producer_name="tpusim.workloads", doc_string=doc)
    helper.set_model_props(model, {"seed": str(seed)})
    stds = {n: float(v.std()) for n, v in b.values.items() if v.dtype.kind == "f" and v.ndim == 3}
    stds[OUTPUT_NAME] = float(output.std())
    return GeneratedModel(model, ids, output.astype(np.float32), stds)


def bert_base(seed: int) -> GeneratedModel:
    return build_bert(BERT_BASE, seed, "bert_base")


def bert_tiny(seed: int) -> GeneratedModel:
    return build_bert(BERT_TINY, seed, "bert_tiny")
