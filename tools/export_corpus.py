"""Regenerate the corpus of real exporter output in ``tests/data/corpus/``.

Every torchvision classification model in ``MODELS`` is built with ``weights=None`` (random
initialisation, nothing is downloaded), its constant-initialised parameters are given a spread of
values (``perturb_constant_parameters``: a trained model has no all-zero biases, and the exporters
treat those specially), it is put in eval mode and exported with batch 1 (``VARIANTS``):

- by the TorchScript exporter: ``torch.onnx.export(model, (x,), f, dynamo=False, opset_version=17)``;
- by the default dynamo exporter: ``torch.onnx.export(model, (x,), f, dynamo=True, opset_version=18,
  external_data=True)`` (weights in ``f + ".data"``, as users get them);
- by the TorchScript exporter at older opsets (resnet18 at 9, mobilenet_v2 at 11);
- and efficientnet_b0 once more with each exporter from torchvision's own initialisation
  (``*_rawinit``), to keep the quirks that come with it on record.

Each exported graph is then stripped of its weights so that it can be committed: every floating
point tensor with more than ``KEEP_MAX_ELEMENTS`` elements (initializers, and the values of
``Constant`` nodes, which become initializers of the same name) keeps its name, dtype and shape but
loses its data, and gets ``doc_string = STRIPPED``. Integer tensors and small float constants
(shape vectors, axes, Reshape targets, Clip bounds, Pad values, Resize scales, ...) keep their real
values. Nothing else changes (nodes, names, attributes, value_info and metadata are the exporter's),
except that the dynamo exporter's per-node ``pkg.torch.onnx.stack_trace`` metadata, which holds
this machine's paths, is dropped. The stripped graph is saved as one file; ``tests/corpus.py``
fills the stripped tensors with seeded values and re-creates the external-data layout. Finally the
script writes ``tests/data/corpus/README.md``: what was exported, how, which exports failed and
why, each file's exporter quirks, and a count of op types across the corpus.

Install what it needs in a separate virtual environment (torch is never a dependency of the
project or of its tests; onnxruntime there is optional and only used for the check below)::

    python3 -m venv /work/torchenv
    /work/torchenv/bin/pip install torch==2.14.1 torchvision==0.29.1 onnx onnxscript onnxruntime

and run it from the repository root (about a minute on two cores)::

    /work/torchenv/bin/python tools/export_corpus.py            # everything, and README.md
    /work/torchenv/bin/python tools/export_corpus.py resnet18   # only the models named (their README rows)

With onnxruntime installed, each stripped file is filled by ``tests/corpus.py`` and run once as a
check (``--no-check`` skips it). After adding or removing a model, update ``CORPUS`` in
``tests/corpus.py``: the script prints the entries it expects there.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import io
import math
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import onnx
from onnx import TensorProto

ROOT = Path(__file__).resolve().parents[1]
OUT_DIR = ROOT / "tests" / "data" / "corpus"
KEEP_MAX_ELEMENTS = 64
STRIPPED = "stripped by tools/export_corpus.py: fill with tests/corpus.py"
FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16}


@dataclass(frozen=True)
class ModelSpec:
    name: str            # torchvision.models builder (or, for task "sequence", a SequenceClassifier's name)
    family: str
    size: int = 224      # input height and width
    kwargs: dict = field(default_factory=dict)
    task: str = "classification"          # "sequence": a SequenceClassifier built here (nn.LSTM / nn.GRU)
    shape: tuple[int, ...] | None = None  # the input shape when it is not (1, 3, size, size)
    exporters: tuple[str, ...] = ("torchscript", "dynamo")  # the variants' exporters this model is exported by

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.shape if self.shape is not None else (1, 3, self.size, self.size)


MODELS = (
    ModelSpec("resnet18", "resnet"),
    ModelSpec("resnet50", "resnet"),
    ModelSpec("mobilenet_v2", "mobilenet"),
    ModelSpec("mobilenet_v3_small", "mobilenet"),
    ModelSpec("mobilenet_v3_large", "mobilenet"),
    ModelSpec("efficientnet_b0", "efficientnet"),
    ModelSpec("regnet_x_400mf", "regnet"),
    ModelSpec("regnet_y_400mf", "regnet"),
    ModelSpec("mnasnet0_5", "mnasnet"),
    ModelSpec("squeezenet1_0", "squeezenet"),
    ModelSpec("shufflenet_v2_x0_5", "shufflenet"),
    ModelSpec("densenet121", "densenet"),
    ModelSpec("googlenet", "inception", kwargs={"aux_logits": False, "init_weights": True}),
    ModelSpec("inception_v3", "inception", size=299, kwargs={"aux_logits": False, "init_weights": True}),
    ModelSpec("vgg11", "vgg"),
    ModelSpec("convnext_tiny", "convnext"),
    ModelSpec("alexnet", "alexnet"),
    # Recurrent sequence models (SequenceClassifier): batch-first (1, 16 steps, 32 features), hidden 64.
    ModelSpec("lstm2", "recurrent", task="sequence", shape=(1, 16, 32),
              kwargs={"cell": "LSTM", "layers": 2, "bidirectional": False}),
    ModelSpec("lstm_bidir", "recurrent", task="sequence", shape=(1, 16, 32),
              kwargs={"cell": "LSTM", "layers": 1, "bidirectional": True}),
    ModelSpec("gru", "recurrent", task="sequence", shape=(1, 16, 32),
              kwargs={"cell": "GRU", "layers": 1, "bidirectional": False}),
    # Transformer encoders, by the default (dynamo) exporter: torchvision's ViT-B/16, and a HuggingFace
    # BertModel (task "encoder": int64 input_ids (1, 32), the last hidden state out) built from a config.
    ModelSpec("vit_b_16", "vit", exporters=("dynamo",)),
    ModelSpec("bert", "bert", task="encoder", shape=(1, 32), exporters=("dynamo",),
              kwargs={"layers": 2, "hidden": 128, "heads": 2, "intermediate": 512}),
)

@dataclass(frozen=True)
class Variant:
    exporter: str                       # "torchscript" (dynamo=False) or "dynamo"
    opset: int
    models: tuple[str, ...] | None      # None: every model in MODELS
    raw_init: bool = False              # export torchvision's own initialisation (see perturb_constant_parameters)


VARIANTS = (
    Variant("torchscript", 17, None),
    Variant("dynamo", 18, None),
    Variant("torchscript", 9, ("resnet18",)),
    Variant("torchscript", 11, ("mobilenet_v2",)),
    # Untrained, constant-initialised parameters as torchvision leaves them: the exporters' quirks
    # that go with them (Identity-shared initializers, Conv without bias) are kept on record here.
    Variant("torchscript", 17, ("efficientnet_b0",), raw_init=True),
    Variant("dynamo", 18, ("efficientnet_b0",), raw_init=True),
)


def file_name(model: str, variant: Variant) -> str:
    short = "ts" if variant.exporter == "torchscript" else "dynamo"
    return f"{model}_{short}{variant.opset}{'_rawinit' if variant.raw_init else ''}.onnx"


def how(variant: Variant, task: str = "classification") -> str:
    init = "torchvision's init as is; " if variant.raw_init else "constant params perturbed; "
    if task == "sequence":
        init = "torch's init; "
    if task == "encoder":
        init = "transformers' `BertModel(BertConfig(...))`, random init, constant params perturbed; "
    if variant.exporter == "torchscript":
        return init + f"`torch.onnx.export(m, (x,), f, dynamo=False, opset_version={variant.opset})`"
    return init + f"`torch.onnx.export(m, (x,), f, dynamo=True, opset_version={variant.opset}, external_data=True)`"


# ---------------------------------------------------------------- stripping

def _numel(tensor: TensorProto) -> int:
    return math.prod(tensor.dims)


def _strip_tensor(tensor: TensorProto) -> None:
    for name in ("raw_data", "float_data", "double_data", "int32_data", "external_data"):
        tensor.ClearField(name)
    tensor.data_location = TensorProto.DEFAULT
    tensor.doc_string = STRIPPED


def _strippable(tensor: TensorProto) -> bool:
    return tensor.data_type in FLOAT_TYPES and _numel(tensor) > KEEP_MAX_ELEMENTS


def strip_graph(graph: onnx.GraphProto) -> tuple[int, int, int]:
    """Strip large float tensors in ``graph`` and its subgraphs; returns (initializers, constants, elements)."""
    n_init = n_const = elements = 0
    for tensor in graph.initializer:
        if _strippable(tensor):
            elements += _numel(tensor)
            _strip_tensor(tensor)
            n_init += 1
    kept = []
    for node in graph.node:
        value = next((a for a in node.attribute if a.name == "value" and a.type == onnx.AttributeProto.TENSOR), None)
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and value is not None and _strippable(value.t):
            tensor = TensorProto()
            tensor.CopyFrom(value.t)
            tensor.name = node.output[0]
            elements += _numel(tensor)
            _strip_tensor(tensor)
            graph.initializer.append(tensor)
            n_const += 1
            continue
        kept.append(node)
        for attr in node.attribute:
            for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
                a, b, c = strip_graph(sub)
                n_init, n_const, elements = n_init + a, n_const + b, elements + c
    if n_const:
        del graph.node[:]
        graph.node.extend(kept)
    return n_init, n_const, elements


def drop_stack_traces(graph: onnx.GraphProto) -> None:
    """Remove the dynamo exporter's per-node ``pkg.torch.onnx.stack_trace`` metadata.

    It holds this machine's file paths and source lines and is a third of a dynamo file's size; the
    other metadata (``namespace``, ``pkg.torch.onnx.class_hierarchy``, ``fx_node``, ``name_scopes``,
    ``pkg.onnxscript.rewriter.rule_name``) is kept as exported.
    """
    for node in graph.node:
        kept = [p for p in node.metadata_props if p.key != "pkg.torch.onnx.stack_trace"]
        if len(kept) != len(node.metadata_props):
            del node.metadata_props[:]
            node.metadata_props.extend(kept)
        for attr in node.attribute:
            for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
                drop_stack_traces(sub)


# ---------------------------------------------------------------- export

def sequence_classifier(cell: str, layers: int, bidirectional: bool, features: int = 32, hidden: int = 64,
                        classes: int = 10):
    """``nn.LSTM``/``nn.GRU`` (batch_first, torch's own initialisation) and a Linear head on the last step.

    The head reads ``y[:, -1:]`` (a Slice) rather than ``y[:, -1]`` (a Gather)."""
    import torch

    class SequenceClassifier(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = getattr(torch.nn, cell)(features, hidden, num_layers=layers, bidirectional=bidirectional,
                                               batch_first=True)
            self.head = torch.nn.Linear(hidden * (2 if bidirectional else 1), classes)

        def forward(self, x):
            y, _ = self.rnn(x)
            return self.head(y[:, -1:].flatten(1))

    return SequenceClassifier()


def bert_encoder(layers: int, hidden: int, heads: int, intermediate: int, vocab: int = 30522, positions: int = 512):
    """HuggingFace ``BertModel`` without the pooler, from a ``BertConfig`` (random initialisation: nothing is
    downloaded), its constant-initialised parameters perturbed like torchvision's."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                        intermediate_size=intermediate, max_position_embeddings=positions)
    model = BertModel(config, add_pooling_layer=False)
    perturb_constant_parameters(model)
    return model


def build(spec: ModelSpec, raw_init: bool = False):
    if spec.task == "sequence":
        return sequence_classifier(**spec.kwargs).eval()
    if spec.task == "encoder":
        return bert_encoder(**spec.kwargs).eval()
    import torchvision.models as tvm

    model = getattr(tvm, spec.name)(weights=None, **spec.kwargs)
    if not raw_init:
        perturb_constant_parameters(model)
    return model.eval()


def perturb_constant_parameters(model, seed: int = 0) -> None:
    """Give every parameter and buffer that its initialiser set to one constant a spread of values.

    Trained weights are never all zeros or all ones, but torchvision's initialisation leaves BatchNorm
    (gamma 1, beta 0, running mean 0, var 1), LayerNorm, conv biases (0) and ConvNeXt's layer scale
    (1e-6) constant. Exported as they are, the graph is not the one a trained model gives: the
    dynamo exporter (onnxscript's RemoveOptionalBiasFromConv) drops the all-zero biases that BN
    folding leaves, and the TorchScript exporter merges identical initializers into one fed through
    Identity nodes. So: BatchNorm gamma U(0.5, 1), beta N(0, 0.1), mean N(0, 0.1), var U(0.5, 1.5);
    any other constant tensor of value c becomes c * U(0.5, 1.5) (c != 0) or N(0, 0.02) (c == 0).
    """
    import torch

    gen = torch.Generator().manual_seed(seed)

    def uniform(t, lo, hi):
        t.copy_(torch.rand(t.shape, generator=gen) * (hi - lo) + lo)

    def normal(t, std):
        t.copy_(torch.randn(t.shape, generator=gen) * std)

    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                if module.weight is not None:
                    uniform(module.weight, 0.5, 1.0)
                    normal(module.bias, 0.1)
                if module.running_mean is not None:
                    normal(module.running_mean, 0.1)
                    uniform(module.running_var, 0.5, 1.5)
                continue
            tensors = list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False))
            for _, t in tensors:
                if not t.is_floating_point() or t.numel() < 2 or t.min() != t.max():
                    continue
                c = float(t.flatten()[0])
                if c == 0.0:
                    normal(t, 0.02)
                else:
                    t.copy_(c * (torch.rand(t.shape, generator=gen) + 0.5))


def export_one(spec: ModelSpec, variant: Variant, workdir: Path) -> onnx.ModelProto:
    import torch

    torch.manual_seed(0)
    model = build(spec, variant.raw_init)
    if spec.task == "encoder":  # token ids below the vocabulary
        x = torch.randint(0, model.config.vocab_size, spec.input_shape, dtype=torch.int64)
    else:
        x = torch.randn(*spec.input_shape)
    path = workdir / file_name(spec.name, variant)
    log = io.StringIO()
    with torch.no_grad(), contextlib.redirect_stdout(log):
        if variant.exporter == "torchscript":
            torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=variant.opset)
        else:
            torch.onnx.export(model, (x,), str(path), dynamo=True, opset_version=variant.opset, external_data=True)
    return onnx.load(str(path), load_external_data=True)


def op_types(model: onnx.ModelProto) -> set[str]:
    found: set[str] = set()

    def walk(graph):
        for node in graph.node:
            found.add(node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}")
            for attr in node.attribute:
                for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
                    walk(sub)

    walk(model.graph)
    return found


def check_filled(file: Path) -> str:
    """Fill the stripped file with tests/corpus.py and run it once in ONNX Runtime, if it is installed."""
    try:
        import numpy as np
        import onnxruntime as ort
    except ImportError:
        return "not run (no onnxruntime here)"
    if str(ROOT / "tests") not in sys.path:
        sys.path.insert(0, str(ROOT / "tests"))
    import corpus

    model = corpus.fill_model(onnx.load(str(file)))
    onnx.checker.check_model(model)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    shape = [d if isinstance(d, int) else 1 for d in inp.shape]
    if inp.type == "tensor(int64)":  # token ids
        x = np.random.default_rng(0).integers(0, corpus.index_rows(model), shape)
    else:
        x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    y = sess.run(None, {inp.name: x})[0]
    if not np.isfinite(y).all():
        return "ORT output NOT finite"
    return f"ORT ok, logits std {float(y.std()):.3g}"


def versions() -> dict[str, str]:
    import torch
    import torchvision

    import onnxscript

    try:
        import transformers

        transformers_version = transformers.__version__
    except ImportError:
        transformers_version = "not installed"
    return {"torch": torch.__version__, "torchvision": torchvision.__version__,
            "onnx": onnx.__version__, "onnxscript": onnxscript.__version__, "transformers": transformers_version}


def quirks(model: onnx.ModelProto) -> str:
    """What in this graph a front end has to look past (counted, so the README cannot drift)."""
    g = model.graph
    inits = {t.name for t in g.initializer}
    ops = collections.Counter(n.op_type for n in g.node)
    notes = []
    if ops["Constant"]:
        notes.append(f"{ops['Constant']} Constant nodes")
    shared = sum(1 for n in g.node if n.op_type == "Identity" and n.input[0] in inits)
    if shared:
        notes.append(f"{shared} Identity on initializers")
    no_bias = sum(1 for n in g.node if n.op_type == "Conv" and (len(n.input) < 3 or not n.input[2]))
    if no_bias:
        notes.append(f"{no_bias}/{ops['Conv']} Conv without bias")
    shape_ops = sum(ops[o] for o in ("Shape", "Gather", "Unsqueeze", "ConstantOfShape", "Expand") if o in ops)
    if ops["Shape"]:
        notes.append(f"shape arithmetic at run time ({shape_ops} Shape/Gather/... nodes)")
    if ops["BatchNormalization"]:
        notes.append(f"{ops['BatchNormalization']} BatchNormalization not folded")
    elif ops["Conv"]:
        notes.append("BatchNorm folded into Conv")
    if g.value_info:
        notes.append(f"value_info for {len(g.value_info)} values")
    notes.append(f"IR {model.ir_version}")
    return "; ".join(notes)


def table_line(r: dict, v: str) -> str:
    return (f"| {r['file'] if r['ok'] else '(failed)'} | {r['model']} | {r['exporter']} | {r['opset']} | "
            f"{'x'.join(map(str, r['input_shape']))} | {r.get('kb', '')} | {how(r['variant'], r.get('task', 'classification'))} | "
            f"{v} | {r.get('quirks', '') + '; ' if r['ok'] else ''}{r['status']} |")


TABLE_HEADER = "| file | model | exporter | opset | input shape | KB | how it was made | versions | quirks / status |"


def merged_table(rows: list[dict], v: str) -> list[str]:
    """The README's table with the rows of the models just exported replacing (or joining) their old rows."""
    path = OUT_DIR / "README.md"
    old = path.read_text().splitlines() if path.exists() else []
    kept: list[str] = []
    if TABLE_HEADER in old:
        for line in old[old.index(TABLE_HEADER) + 2 :]:
            if not line.startswith("| "):
                break
            kept.append(line)
    fresh = {r["file"]: table_line(r, v) for r in rows}
    table = [fresh.pop(line.split(" | ")[0][2:], line) for line in kept]
    return table + list(fresh.values())


def write_readme(rows: list[dict], ops: dict[str, set[str]], vers: dict[str, str], table: list[str] | None = None) -> None:
    """README.md from ``rows``; with ``table`` (:func:`merged_table`), that table, and the op counts of
    every file on disk."""
    v = f"torch {vers['torch']}, torchvision {vers['torchvision']}"
    if table is None:
        table = [table_line(r, v) for r in rows]
    else:
        ops = {f.name: op_types(onnx.load(str(f))) for f in sorted(OUT_DIR.glob("*.onnx"))}
    cells = [line.split(" | ") for line in table]
    failed = [c for c in cells if c[0] == "| (failed)"]
    lines = [
        "# Corpus of real exporter output (weights stripped)",
        "",
        "Written by `tools/export_corpus.py`; run it with torch installed to regenerate every file here (its",
        "docstring says how). Each `.onnx` file is a graph exactly as `torch.onnx.export` wrote it, except",
        f"that every floating-point tensor with more than {KEEP_MAX_ELEMENTS} elements (initializers, and the values",
        "of `Constant` nodes, which become initializers of the same name) keeps its name, dtype and shape but",
        f"has no data (`doc_string`: \"{STRIPPED}\"), and that the dynamo",
        "exporter's per-node `pkg.torch.onnx.stack_trace` metadata (this machine's paths) is dropped.",
        "Integer tensors and small float constants (shape vectors, axes, Reshape targets, Clip bounds,",
        "biases and BatchNorm parameters of layers with <= 64 channels) keep their exported values.",
        "",
        "The models are torchvision classification models built with `weights=None` (random",
        "initialisation: there is no download), `model.eval()`, batch 1 (`x = torch.randn(1, 3, H, W)`),",
        f"exported with {v}, onnx {vers['onnx']}, onnxscript {vers['onnxscript']}. googlenet and inception_v3",
        "are built with `aux_logits=False, init_weights=True`. Before export, the parameters that",
        "torchvision initialises to one constant (BatchNorm gamma/beta/running stats, conv biases,",
        "ConvNeXt's layer scale) get a spread of values (`perturb_constant_parameters`), because",
        "the exporters treat constant tensors in ways a trained model never triggers: the dynamo",
        "exporter's optimiser drops the all-zero biases that BatchNorm folding leaves, and the TorchScript",
        "exporter shares identical initializers through Identity nodes. The two `*_rawinit` files keep",
        "those quirks on record (efficientnet_b0 exported from torchvision's initialisation as is).",
        "",
        "The `recurrent` family is not torchvision: `sequence_classifier` builds `nn.LSTM` (2 stacked layers;",
        "1 bidirectional layer) or `nn.GRU` with `batch_first=True`, 32 features, hidden 64 and torch's own",
        "initialisation, and a `Linear(…, 10)` head on `y[:, -1:]`, run on `x = torch.randn(1, 16, 32)`.",
        "`corpus.load_model` fills their W, R and B with U(-1/sqrt(64), 1/sqrt(64)), as torch initialises them,",
        "and their initial states with the zeros PyTorch exports.",
        "",
        "Two transformer encoders come from the default (dynamo) exporter only: torchvision's `vit_b_16`",
        "(as the CNNs), and `bert` (family `bert`, task `encoder`): transformers "
        f"{vers.get('transformers', '?')}'s `BertModel(BertConfig(vocab_size=30522,",
        "hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=512),",
        "add_pooling_layer=False)`, random initialisation (nothing downloaded, `HF_HUB_OFFLINE=1`), constant",
        "parameters perturbed, exported with `x = torch.randint(0, 30522, (1, 32))` as its `input_ids` (int64); its",
        "output is the last hidden state (1, 32, 128). `corpus.load_model` fills embedding tables with N(0, 0.02).",
        "",
        "The dynamo exporter writes its weights to `<file>.onnx.data`; the committed copy is one file and",
        "`corpus.save_with_external_data` re-creates that layout (every tensor over 256 bytes in one data",
        "file named after the model, as onnx_ir saves it).",
        "",
        "## Using it in tests",
        "",
        "Never load these files directly: `tests/corpus.py` does it (`import corpus`).",
        "",
        "- `corpus.CORPUS`: one entry per file (name, file, family, exporter, opset, input_shape, external_data).",
        "- `corpus.load_model(name, seed=0)`: the graph with every stripped tensor filled with seeded values",
        "  chosen by the role of the node input that consumes it: Conv/Gemm/MatMul weights zero-mean",
        "  normal at the scale that keeps each layer's output second moment near 1 (He's sqrt(2/fan_in)",
        "  after a ReLU; estimated in one walk of the graph and checked on one input with ONNX Runtime),",
        "  BatchNorm scale U(0.5, 1), bias and mean N(0, 0.1), var U(0.5, 1.5), LayerNorm scale U(0.9, 1.1),",
        "  biases N(0, 0.02), residual branches scaled by 0.5. Logits come out finite with a std near 1.",
        "- `corpus.save_with_external_data(model, path)`: `path` + `path.name + \".data\"`, the dynamo layout.",
        "- `corpus.ort_qdq_copy(model, out, per_channel, activation_type, symmetric_activations)`: ONNX",
        "  Runtime's `quantize_static` QDQ model, calibrated on seeded N(0, 1) inputs.",
        "- `corpus.mlperf_tiny_onnx(name, out_dir)`: the MLPerf Tiny models in `../shared/mlperf_tiny`,",
        "  real weights, converted with tflite2onnx (`pretrainedResnet`, `vww_96_float`; the KWS float file",
        "  is hybrid, with int8 conv weights, and tflite2onnx writes an invalid graph for it). Skips the",
        "  test when the folder or tflite2onnx is absent.",
        "",
        "## Files",
        "",
        f"{len(table) - len(failed)} exports succeeded, {len(failed)} failed"
        + (": " + ", ".join(f"{c[1]} ({c[2]} opset {c[3]})" for c in failed) if failed else "")
        + ".",
        "",
        TABLE_HEADER,
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    lines += table
    counts = collections.Counter(op for s in ops.values() for op in s)
    lines += ["", f"## Op types across the corpus (number of the {len(ops)} files using each)", "",
              "| op type | files |", "| --- | --- |"]
    lines += [f"| {op} | {n} |" for op, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]
    (OUT_DIR / "README.md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", help="only these model names (default: all); their README rows are "
                        "replaced or added, the other rows kept")
    parser.add_argument("--no-check", action="store_true", help="do not fill and run the stripped files")
    args = parser.parse_args(argv)
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    vers = versions()
    rows, ops = [], {}
    for variant in VARIANTS:
        for spec in MODELS:
            if variant.models is not None and spec.name not in variant.models:
                continue
            if variant.exporter not in spec.exporters:
                continue
            if args.models and spec.name not in args.models:
                continue
            file = file_name(spec.name, variant)
            row = {"file": file, "model": spec.name, "family": spec.family, "exporter": variant.exporter,
                   "opset": variant.opset, "input_shape": spec.input_shape, "ok": False,
                   "variant": variant, "task": spec.task}
            t0 = time.time()
            try:
                with tempfile.TemporaryDirectory() as tmp:
                    model = export_one(spec, variant, Path(tmp))
                n_init, n_const, elements = strip_graph(model.graph)
                drop_stack_traces(model.graph)
                onnx.save_model(model, str(OUT_DIR / file))
                row.update(ok=True, kb=round((OUT_DIR / file).stat().st_size / 1024), quirks=quirks(model))
                ops[file] = op_types(model)
                status = f"ok; stripped {n_init} initializers" + (f" + {n_const} Constant values" if n_const else "") \
                    + f" ({elements / 1e6:.2f} M values)"
                if not args.no_check:
                    status += "; " + check_filled(OUT_DIR / file)
                row["status"] = status
            except Exception as exc:  # record the failure and move on
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200].replace("|", "/")
                row["status"] = f"FAILED: {type(exc).__name__}: {first}"
                traceback.print_exc()
            print(f"{file}: {row['status']} ({time.time() - t0:.1f} s)", flush=True)
            rows.append(row)
    if args.models:   # their rows replace (or join) the README's table
        write_readme(rows, ops, vers, table=merged_table(rows, f"torch {vers['torch']}, torchvision {vers['torchvision']}"))
    else:
        write_readme(rows, ops, vers)
        print("\nCORPUS entries for tests/corpus.py:")
        for r in rows:
            if r["ok"]:
                print(f"    Entry({r['file'][:-5]!r}, {r['file']!r}, {r['family']!r}, {r['exporter']!r}, {r['opset']}, "
                      f"{r['input_shape']}, {r['exporter'] == 'dynamo'}),")
    return 0


if __name__ == "__main__":
    sys.exit(main())
