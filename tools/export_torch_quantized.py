"""Write real PyTorch-quantized ONNX files into ``tests/data/torch_quantized/`` and its README.md.

The issue: a model quantized by PyTorch and exported to ONNX runs in tpusim on its own integers. This
script makes such files the ways PyTorch users make them, records exactly what PyTorch wrote (op
types, where the integer weights are, per-channel axes, uint8/int8, biases, where ReLU went) and
which ways fail to export and why:

- **eager** post-training static quantization (``torch.ao.quantization``: ``fuse_modules``,
  ``qconfig``, ``prepare``, calibration, ``convert``) with the x86, fbgemm and qnnpack qconfigs, and
  **FX** (``quantize_fx.prepare_fx`` / ``convert_fx``), of a small CNN and of torchvision's
  quantizable ResNet-18 and MobileNet-v2 (``torchvision.models.quantization``, ``weights=None``,
  ``quantize=False``, then ``fuse_model()`` and the same steps), exported with the TorchScript
  exporter (``torch.onnx.export(..., dynamo=False)``);
- **PT2E** (torchao's ``prepare_pt2e`` / ``convert_pt2e`` on a ``torch.export`` graph, with
  ``X86InductorQuantizer`` and ExecuTorch's ``XNNPACKQuantizer``), exported with the dynamo exporter
  (``torch.onnx.export(..., dynamo=True)``);
- **fake-quantized** (QAT-style: ``prepare_qat`` puts ``FakeQuantize`` modules on weights and
  activations; a few training steps; ``eval()``, observers disabled, not converted), exported as is.

Every model is calibrated on seeded N(0, 1) inputs; nothing is downloaded. BatchNorm parameters get
a spread of values first (``spread_batchnorm``), as a trained model has. A file that stays under
``MAX_KB`` is committed whole (its int8 weights are the real ones); a larger one (the torchvision
models) keeps everything but the int8 weight tensors with more than ``STRIP_MIN_ELEMENTS`` values,
which keep name, dtype and shape, lose their data and get ``doc_string`` ``"<STRIPPED>; std <s>"``
(the standard deviation of the integers PyTorch wrote); ``tests/frontend/test_torch_quantized.py``
refills them with seeded integers of that spread. Scales, zero points, int32 biases and everything
else stay as PyTorch wrote them. The dynamo exporter's per-node metadata (stack traces
with this machine's paths, namespaces, class hierarchies) is dropped and its external data is put back
into the one file.

Each file is also run by ONNX Runtime before stripping and compared with the quantized PyTorch model
on the same input (the README's "PyTorch vs ORT" column, in output quantization steps).

Install what it needs in a separate virtual environment (torch is never a dependency of the project
or of its tests)::

    python3 -m venv /work/torchenv
    /work/torchenv/bin/pip install torch==2.14.1 torchvision==0.29.1 onnx onnxscript onnxruntime \\
        torchao==0.18.0 ruamel.yaml tabulate
    /work/torchenv/bin/pip install --no-deps executorch==1.5.1   # only for its XNNPACKQuantizer

(PT2E moved out of torch into torchao; XNNPACKQuantizer lives in ExecuTorch, whose full dependency
list is not needed for the quantizer.) Run from the repository root (one to two minutes on two cores)::

    /work/torchenv/bin/python tools/export_torch_quantized.py            # everything, and README.md
    /work/torchenv/bin/python tools/export_torch_quantized.py smallcnn   # only names containing this
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import importlib.metadata
import io
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]
OUT_DIR = ROOT / "tests" / "data" / "torch_quantized"
MAX_KB = 300
STRIP_MIN_ELEMENTS = 1024
STRIPPED = "stripped by tools/export_torch_quantized.py: refill with seeded integers"
SMALL_SHAPE = (1, 3, 32, 32)
TV_SHAPE = (1, 3, 32, 32)
CALIBRATION_BATCHES = 8
# MobileNet-v2 at full width has 400 KB of per-channel scales and int32 biases alone.
TV_KWARGS = {"mobilenet_v2": {"width_mult": 0.5}}


@dataclass(frozen=True)
class Variant:
    name: str          # file stem
    model: str         # "smallcnn", "resnet18", "mobilenet_v2"
    flow: str          # "eager", "fx", "pt2e", "qat"
    backend: str       # qconfig / quantizer
    exporter: str      # "torchscript" or "dynamo"
    opset: int
    note: str = ""


VARIANTS = (
    Variant("smallcnn_eager_x86_ts17", "smallcnn", "eager", "x86", "torchscript", 17),
    Variant("smallcnn_eager_fbgemm_ts13", "smallcnn", "eager", "fbgemm", "torchscript", 13),
    Variant("smallcnn_eager_qnnpack_ts17", "smallcnn", "eager", "qnnpack", "torchscript", 17),
    Variant("smallcnn_fx_x86_ts17", "smallcnn", "fx", "x86", "torchscript", 17),
    Variant("smallcnn_pt2e_x86_dynamo18", "smallcnn", "pt2e", "x86", "dynamo", 18),
    Variant("smallcnn_pt2e_xnnpack_dynamo18", "smallcnn", "pt2e", "xnnpack", "dynamo", 18),
    Variant("smallcnn_pt2e_xnnpack_pertensor_dynamo18", "smallcnn", "pt2e", "xnnpack-per-tensor", "dynamo", 18),
    Variant("smallcnn_qat_fakequant_ts17", "smallcnn", "qat", "fakequant", "torchscript", 17),
    Variant("smallcnn_qat_fakequant_fullrange_ts17", "smallcnn", "qat", "fakequant-full-range", "torchscript", 17),
    Variant("resnet18_eager_x86_ts17", "resnet18", "eager", "x86", "torchscript", 17),
    Variant("mobilenet_v2_eager_x86_ts17", "mobilenet_v2", "eager", "x86", "torchscript", 17),
    Variant("resnet18_fx_x86_ts17", "resnet18", "fx", "x86", "torchscript", 17),
    Variant("resnet18_pt2e_xnnpack_dynamo18", "resnet18", "pt2e", "xnnpack", "dynamo", 18),
    Variant("mobilenet_v2_pt2e_x86_dynamo18", "mobilenet_v2", "pt2e", "x86", "dynamo", 18),
    # Expected to fail; kept so that the README says why.
    Variant("resnet18_pt2e_x86_dynamo18", "resnet18", "pt2e", "x86", "dynamo", 18),
    Variant("smallcnn_eager_x86_dynamo18", "smallcnn", "eager", "x86", "dynamo", 18),
    Variant("smallcnn_qat_fakequant_dynamo18", "smallcnn", "qat", "fakequant", "dynamo", 18),
    Variant("smallcnn_qat_default_ts17", "smallcnn", "qat", "x86-default", "torchscript", 17,
            "get_default_qat_qconfig('x86'): FusedMovingAvgObsFakeQuantize"),
    Variant("smallcnn_eager_relu6_ts17", "smallcnn-relu6", "eager", "x86", "torchscript", 17,
            "nn.ReLU6 instead of nn.Hardtanh(0, 6)"),
    Variant("mlp_dynamic_ts17", "mlp", "dynamic", "x86", "torchscript", 17, "quantize_dynamic (int8 Linear)"),
    Variant("mlp_dynamic_dynamo18", "mlp", "dynamic", "x86", "dynamo", 18, "quantize_dynamic (int8 Linear)"),
    Variant("mlp_torchao_int8wo_dynamo18", "mlp", "torchao", "int8-weight-only", "dynamo", 18,
            "torchao quantize_(m, Int8WeightOnlyConfig())"),
    Variant("mlp_torchao_int8dyn_dynamo18", "mlp", "torchao", "int8-dynamic", "dynamo", 18,
            "torchao quantize_(m, Int8DynamicActivationInt8WeightConfig())"),
    Variant("mlp_torchao_int8dyn_ts17", "mlp", "torchao", "int8-dynamic", "torchscript", 17,
            "torchao quantize_(m, Int8DynamicActivationInt8WeightConfig())"),
)


# ---------------------------------------------------------------- models

def small_cnn(eager: bool, relu6: bool = False):
    """Conv-BN-ReLU, Conv-BN + residual add + ReLU, max pool, depthwise Conv-BN-ReLU, 1x1 conv +
    ReLU6, global average pool, Linear. ``eager``: QuantStub/DeQuantStub and FloatFunctional for the
    add, as eager-mode quantization needs; otherwise plain operators (FX, PT2E)."""
    import torch
    import torch.ao.quantization as tq
    from torch import nn

    class SmallCNN(nn.Module):
        def __init__(self):
            super().__init__()
            self.quant = tq.QuantStub() if eager else nn.Identity()
            self.dequant = tq.DeQuantStub() if eager else nn.Identity()
            self.conv1, self.bn1, self.relu1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()
            self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
            self.skip = nn.quantized.FloatFunctional()
            self.pool = nn.MaxPool2d(2)
            self.dw, self.bn3, self.relu3 = nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8), nn.ReLU()
            self.pw = nn.Conv2d(8, 16, 1)
            # Eager quantization cannot export nn.ReLU6 (quantized::relu6); Hardtanh(0, 6) is the same function.
            self.relu6 = nn.ReLU6() if relu6 else nn.Hardtanh(0.0, 6.0)
            self.gap = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(16, 10)

        def forward(self, x):
            x = self.quant(x)
            a = self.relu1(self.bn1(self.conv1(x)))
            b = self.bn2(self.conv2(a))
            x = self.skip.add_relu(b, a) if eager else torch.relu(b + a)
            x = self.pool(x)
            x = self.relu3(self.bn3(self.dw(x)))
            x = self.relu6(self.pw(x))
            x = torch.flatten(self.gap(x), 1)
            return self.dequant(self.fc(x))

        def fuse(self, qat: bool = False):
            groups = [["conv1", "bn1", "relu1"], ["conv2", "bn2"], ["dw", "bn3", "relu3"]]
            (tq.fuse_modules_qat if qat else tq.fuse_modules)(self, groups, inplace=True)

    torch.manual_seed(0)
    model = SmallCNN()
    spread_batchnorm(model)
    return model.eval()


def mlp():
    import torch
    from torch import nn

    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)).eval()


def torchvision_model(name: str, quantizable: bool):
    import torch
    import torchvision.models as tvm
    import torchvision.models.quantization as tvq

    torch.manual_seed(0)
    kwargs = TV_KWARGS.get(name, {})
    model = (getattr(tvq, name)(weights=None, quantize=False, **kwargs) if quantizable
             else getattr(tvm, name)(weights=None, **kwargs))
    spread_batchnorm(model)
    return model.eval()


def spread_batchnorm(model, seed: int = 0) -> None:
    """BatchNorm as training leaves it rather than as initialised (gamma 1, beta 0, mean 0, var 1)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                n = module.num_features
                module.weight.copy_(0.5 + 0.5 * torch.rand(n, generator=gen))
                module.bias.copy_(0.1 * torch.randn(n, generator=gen))
                module.running_mean.copy_(0.1 * torch.randn(n, generator=gen))
                module.running_var.copy_(0.5 + torch.rand(n, generator=gen))


def calibration_inputs(shape, batches: int = CALIBRATION_BATCHES, batch: int = 4):
    import torch

    gen = torch.Generator().manual_seed(0)
    return [torch.randn((batch,) + tuple(shape[1:]), generator=gen) for _ in range(batches)]


def build(variant: Variant):
    """(the model to export, its example input)."""
    import torch
    import torch.ao.quantization as tq

    if variant.model == "mlp":
        model, shape = mlp(), (1, 64)
    elif variant.model.startswith("smallcnn"):
        eager = variant.flow in ("eager", "qat")
        model, shape = small_cnn(eager=eager, relu6=variant.model.endswith("relu6")), SMALL_SHAPE
    else:
        model, shape = torchvision_model(variant.model, quantizable=variant.flow in ("eager", "fx")), TV_SHAPE
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    # torch.export specialises the batch of the example input: PT2E calibrates one sample at a time.
    data = calibration_inputs(shape, *((32, 1) if variant.flow == "pt2e" else ()))

    def calibrate(m):
        with torch.no_grad():
            for batch in data:
                m(batch)

    if variant.flow == "eager":
        torch.backends.quantized.engine = variant.backend
        if hasattr(model, "fuse_model"):
            model.fuse_model()
        else:
            model.fuse()
        model.qconfig = tq.get_default_qconfig(variant.backend)
        tq.prepare(model, inplace=True)
        calibrate(model)
        tq.convert(model, inplace=True)
    elif variant.flow == "fx":
        from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

        torch.backends.quantized.engine = variant.backend
        prepared = prepare_fx(model, tq.get_default_qconfig_mapping(variant.backend), (x,))
        calibrate(prepared)
        model = convert_fx(prepared)
    elif variant.flow == "pt2e":
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

        if variant.backend == "x86":
            from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
                X86InductorQuantizer, get_default_x86_inductor_quantization_config)

            quantizer = X86InductorQuantizer().set_global(get_default_x86_inductor_quantization_config())
        else:
            from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
                XNNPACKQuantizer, get_symmetric_quantization_config)

            per_channel = variant.backend == "xnnpack"
            quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=per_channel))
        graph = torch.export.export(model, (x,)).module()
        prepared = prepare_pt2e(graph, quantizer)
        calibrate(prepared)
        model = convert_pt2e(prepared)
    elif variant.flow == "qat":
        model.train()
        model.fuse(qat=True)
        if variant.backend == "x86-default":
            model.qconfig = tq.get_default_qat_qconfig("x86")
        else:
            # FakeQuantize (exportable) rather than the default fused observer+fake-quant module.
            activation = tq.default_fake_quant if variant.backend == "fakequant" else tq.FakeQuantize.with_args(
                observer=tq.MovingAverageMinMaxObserver, quant_min=0, quant_max=255, dtype=torch.quint8)
            model.qconfig = tq.QConfig(activation=activation, weight=tq.default_per_channel_weight_fake_quant)
        tq.prepare_qat(model, inplace=True)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
        for batch in data:
            loss = model(batch).square().mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        model.eval()
        model.apply(tq.disable_observer)
    elif variant.flow == "dynamic":
        model = tq.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    elif variant.flow == "torchao":
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig, quantize_

        quantize_(model, Int8WeightOnlyConfig() if variant.backend == "int8-weight-only"
                  else Int8DynamicActivationInt8WeightConfig())
    return model, x


def export(model, x, variant: Variant, path: Path) -> onnx.ModelProto:
    import torch

    log = io.StringIO()
    with torch.no_grad(), contextlib.redirect_stdout(log), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if variant.exporter == "torchscript":
            torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=variant.opset)
        else:
            torch.onnx.export(model, (x,), str(path), dynamo=True, opset_version=variant.opset, external_data=True)
    return onnx.load(str(path), load_external_data=True)


# ---------------------------------------------------------------- what PyTorch wrote

class Facts:
    """Reads a QDQ graph as exported: constants through Constant/Identity/Cast, producers, readers."""

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        g = model.graph
        self.init = {t.name: t for t in g.initializer}
        self.producer = {o: n for n in g.node for o in n.output}
        self.readers: dict[str, list[onnx.NodeProto]] = collections.defaultdict(list)
        for n in g.node:
            for i in n.input:
                self.readers[i].append(n)

    def constant(self, name: str):
        """(array, elem_type) of a constant input, through Identity and Cast of constants."""
        for _ in range(8):
            if name in self.init:
                t = self.init[name]
                return (numpy_helper.to_array(t) if _has_data(t) else None), t.data_type
            node = self.producer.get(name)
            if node is None:
                return None
            if node.op_type == "Constant":
                t = next(helper.get_attribute_value(a) for a in node.attribute if a.name == "value")
                return (numpy_helper.to_array(t) if _has_data(t) else None), t.data_type
            if node.op_type == "ConstantOfShape":
                value = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "value"), None)
                return None, (value.data_type if value is not None else TensorProto.FLOAT)
            if node.op_type not in ("Identity", "Cast"):
                return None
            if node.op_type == "Cast":
                to = next(a.i for a in node.attribute if a.name == "to")
                inner = self.constant(node.input[0])
                return None if inner is None else (inner[0], to)
            name = node.input[0]
        return None

    def summary(self) -> dict[str, str]:
        g = self.model.graph
        ops = collections.Counter(n.op_type for n in g.node)
        shown = {k: v for k, v in ops.items() if k not in ("Constant",)}
        facts = {"ops": ", ".join(f"{k} {v}" for k, v in sorted(shown.items(), key=lambda kv: (-kv[1], kv[0])))}
        if ops["Constant"]:
            facts["ops"] += f" (+ {ops['Constant']} Constant)"
        qoperator = sorted(k for k in ops if k.startswith("QLinear") or k in ("ConvInteger", "MatMulInteger",
                                                                             "DynamicQuantizeLinear"))
        matrix = [n for n in g.node if n.op_type in ("Conv", "Gemm", "MatMul")]
        weights, biases = collections.Counter(), collections.Counter()
        for n in matrix:
            weights[self._weight(n.input[1]) if len(n.input) > 1 else "none"] += 1
            biases[self._bias(n.input[2]) if len(n.input) > 2 and n.input[2] else "none"] += 1
        facts["weights"] = "; ".join(f"{k} x{v}" for k, v in sorted(weights.items())) or "-"
        facts["biases"] = "; ".join(f"{k} x{v}" for k, v in sorted(biases.items())) or "-"
        acts = collections.Counter()
        between = collections.Counter()
        for n in g.node:
            if n.op_type != "QuantizeLinear" or self._is_weight(n.input[0]):
                continue
            zp = self.constant(n.input[2]) if len(n.input) > 2 and n.input[2] else None
            dtype = _dtype_name(zp[1]) if zp else "uint8"
            zero = zp[0] if zp and zp[0] is not None else None
            sym = "zp 0" if zero is not None and np.all(zero == 0) else "zp != 0"
            acts[f"{dtype} ({sym})"] += 1
            for reader in self.readers[n.output[0]]:
                if reader.op_type != "DequantizeLinear":
                    between[reader.op_type] += 1
        facts["activations"] = ", ".join(f"{k} x{v}" for k, v in sorted(acts.items())) or "-"
        if between:
            facts["activations"] += "; Q -> " + ", ".join(f"{k} x{v}" for k, v in sorted(between.items())) + " -> DQ"
        facts["relu"] = self._relus()
        facts["float"] = self._float_tensors()
        facts["qoperator"] = ", ".join(qoperator)
        return facts

    def _is_weight(self, name: str) -> bool:
        return self.constant(name) is not None

    def _weight(self, name: str) -> str:
        dq = self.producer.get(name)
        if dq is None or dq.op_type != "DequantizeLinear":
            return "float (no DQ)"
        axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
        scale = self.constant(dq.input[1])
        per = f"per-channel axis {axis}" if scale and scale[0] is not None and scale[0].size > 1 else "per-tensor"
        src = dq.input[0]
        q = self.producer.get(src)
        if q is not None and q.op_type == "Cast":
            q = self.producer.get(q.input[0])
        if q is not None and q.op_type == "QuantizeLinear":
            zp = self.constant(q.input[2]) if len(q.input) > 2 else None
            return f"float weight -> Q -> DQ ({_dtype_name(zp[1]) if zp else 'uint8'}, {per})"
        const = self.constant(src)
        if const is None:
            return "DQ of a non-constant"
        where = "initializer" if src in self.init else "Constant node"
        return f"{_dtype_name(const[1])} {where} -> DQ ({per})"

    def _bias(self, name: str) -> str:
        dq = self.producer.get(name)
        if dq is not None and dq.op_type == "DequantizeLinear":
            const = self.constant(dq.input[0])
            return f"{_dtype_name(const[1]) if const else '?'} -> DQ (scale s_x*s_w)"
        const = self.constant(name)
        return "float32 constant" if const is not None else "computed"

    def _relus(self) -> str:
        notes = collections.Counter()
        for n in self.model.graph.node:
            if n.op_type not in ("Relu", "Clip"):
                continue
            src = self.producer.get(n.input[0])
            before = src.op_type if src is not None else "input"
            after = {r.op_type for r in self.readers[n.output[0]]}
            if before == "QuantizeLinear":
                continue  # a Clip on integers, listed with the activations
            notes[f"{n.op_type} after {before}, then {'/'.join(sorted(after)) or 'output'}"] += 1
        return "; ".join(f"{k} x{v}" for k, v in sorted(notes.items())) or "none"

    def _float_tensors(self) -> str:
        """Outputs of compute nodes that no QuantizeLinear reads (the model leaves them in float)."""
        skip = {"QuantizeLinear", "DequantizeLinear", "Constant", "Cast", "Identity", "ConstantOfShape", "Clip",
                "Relu"}
        left = collections.Counter()
        for n in self.model.graph.node:
            if n.op_type in skip:
                continue
            out = n.output[0]
            readers = self.readers[out]
            # follow a Relu/Clip to its reader
            while len(readers) == 1 and readers[0].op_type in ("Relu", "Clip"):
                readers = self.readers[readers[0].output[0]]
            if not any(r.op_type == "QuantizeLinear" for r in readers):
                left[n.op_type] += 1
        return ", ".join(f"{k} x{v}" for k, v in sorted(left.items())) or "none"


def _has_data(t: TensorProto) -> bool:
    return bool(t.raw_data or t.float_data or t.int32_data or t.int64_data or t.double_data) or not t.dims or \
        np.prod(t.dims) == 0


def _dtype_name(code: int) -> str:
    return TensorProto.DataType.Name(code).lower()


# ---------------------------------------------------------------- stripping

def strip_int8_weights(model: onnx.ModelProto) -> tuple[int, int]:
    """Replace every int8/uint8 constant with >= STRIP_MIN_ELEMENTS values (initializer or Constant node)
    by an initializer of the same name without data; returns (tensors, values)."""
    g = model.graph
    count = values = 0

    def strip(t: TensorProto) -> TensorProto:
        nonlocal count, values
        array = numpy_helper.to_array(t)
        out = TensorProto()
        out.name, out.data_type = t.name, t.data_type
        out.dims.extend(t.dims)
        out.doc_string = f"{STRIPPED}; std {float(array.astype(np.float64).std()):.4g}"
        count += 1
        values += array.size
        return out

    def strippable(t: TensorProto) -> bool:
        return t.data_type in (TensorProto.INT8, TensorProto.UINT8) and int(np.prod(t.dims)) >= STRIP_MIN_ELEMENTS

    for i, t in enumerate(list(g.initializer)):
        if strippable(t):
            g.initializer[i].CopyFrom(strip(t))
    kept = []
    for node in g.node:
        value = next((a for a in node.attribute if a.name == "value" and a.type == onnx.AttributeProto.TENSOR), None)
        if node.op_type == "Constant" and value is not None and strippable(value.t):
            t = TensorProto()
            t.CopyFrom(value.t)
            t.name = node.output[0]
            g.initializer.append(strip(t))
            continue
        kept.append(node)
    del g.node[:]
    g.node.extend(kept)
    return count, values


def drop_node_metadata(model: onnx.ModelProto) -> None:
    """The dynamo exporter's per-node provenance (stack traces with this machine's paths, namespaces,
    class hierarchies, FX node names): half of a PT2E file's size, and nothing a runtime reads."""
    for node in model.graph.node:
        del node.metadata_props[:]


# ---------------------------------------------------------------- checks

def ort_session(model: onnx.ModelProto):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def torch_vs_ort(quantized, model: onnx.ModelProto, x) -> str:
    """PyTorch's quantized model and ONNX Runtime on the exported file, one seeded input."""
    import torch

    with torch.no_grad():
        ours = quantized(x)
    ours = ours.dequantize() if ours.is_quantized else ours
    ours = ours.numpy()
    theirs = ort_session(model).run(None, {model.graph.input[0].name: x.numpy()})[0]
    diff = float(np.abs(ours - theirs).max())
    last = Facts(model).producer.get(model.graph.output[0].name)
    if last is not None and last.op_type == "DequantizeLinear":
        scale = Facts(model).constant(last.input[1])
        if scale is not None and scale[0] is not None and scale[0].size == 1:
            return f"max diff {diff / float(scale[0].reshape(-1)[0]):.3g} output steps"
    return f"max diff {diff:.3g} (output std {float(theirs.std()):.3g})"


def versions() -> str:
    import torch
    import torchvision

    import onnxruntime
    import onnxscript

    parts = [f"torch {torch.__version__}", f"torchvision {torchvision.__version__}", f"onnx {onnx.__version__}",
             f"onnxscript {onnxscript.__version__}", f"onnxruntime {onnxruntime.__version__}"]
    for name in ("torchao", "executorch"):
        try:
            parts.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            pass
    return ", ".join(parts)


# ---------------------------------------------------------------- README

FINDINGS = (
    "No PyTorch path writes QOperator ops (QLinearConv, QGemm, ...): every quantized model that exports",
    "at all is QDQ, QuantizeLinear/DequantizeLinear around float ops. (ONNX Runtime's own graph optimiser",
    "turns such a file into QLinearConv/QLinearAdd/QGemm when a user saves its optimised model; that is",
    "the QOperator file the tests use.)",
    "",
    "- **Eager and FX, TorchScript exporter.** Every quantized module becomes DequantizeLinear -> float",
    "  op -> QuantizeLinear. There are no initializers: the int8 weights are `Constant` nodes behind a",
    "  DequantizeLinear, per channel with `axis=0` for the x86/fbgemm qconfigs (per tensor for qnnpack),",
    "  int8 zero points 0; the biases are int32 `Constant`s behind a DequantizeLinear with the per-channel",
    "  scale `s_x * s_w[c]` and a zero point computed by ConstantOfShape -> Cast. Every QuantizeLinear is",
    "  followed by a Cast to its own type (uint8 -> uint8) before the DequantizeLinear. Activations are",
    "  uint8 with zero points (x86/fbgemm calibrate with `reduce_range`, 7 bits, but the Q is full uint8).",
    "  A ReLU fused into ConvReLU2d/`add_relu` comes back as an explicit Relu between the float op and a Q",
    "  with zero point 0; `nn.Hardtanh(0, 6)` is DQ -> Clip(0, 6) -> Q; max pool, global average pool and",
    "  flatten are DQ -> op -> Q with the input's parameters. FX writes the same graph as eager (plus two",
    "  Identity). Not exportable: `nn.ReLU6` (`quantized::relu6`), `quantize_dynamic`",
    "  (`quantized::linear_dynamic`), and any converted eager/FX model with the dynamo exporter (the packed",
    "  weights are TorchScript objects `torch.export` cannot trace).",
    "- **PT2E, dynamo exporter.** int8 weight *initializers* behind DequantizeLinear (per channel `axis=0`,",
    "  or per tensor), **float32 biases** (the float op adds them), BatchNorm folded by `prepare_pt2e`,",
    "  per-tensor Q/DQ written with `axis=1`, ReLU as Relu and ReLU6 as Clip(0, 6) before the Q.",
    "  XNNPACKQuantizer: int8 activations with zero points, every tensor quantized. X86InductorQuantizer:",
    "  uint8 activations, but it quantizes the inputs of convs/linears rather than every output (its",
    "  target fuses conv + add + relu): conv outputs that only a residual Add reads, Add -> Relu -> MaxPool",
    "  and the Linear's output stay float. It fails on torchvision's ResNet-18 (`ValueError: Input partition",
    "  has more than one output node`, in its conv + add + relu annotation).",
    "- **Fake-quantized (QAT), TorchScript exporter.** QuantizeLinear -> DequantizeLinear on *float*",
    "  weight initializers (int8, per channel `axis=0`) and on activations. `default_fake_quant` has",
    "  `reduce_range=True`: the exporter writes a uint8 Q, then **Clip(max=127) on the integers**, then the",
    "  DQ. QAT's fused Conv-BN(-ReLU) exports as Conv (the BN-scaled weight, constant-folded, fake-quantized;",
    "  a zero bias) -> Div(gamma/std) -> Add(bias) -> BatchNormalization -> Relu -> Q, so the conv output is",
    "  float; eager QAT puts no fake quantization after Hardtanh or the global average pool. The default QAT",
    "  qconfig (`get_default_qat_qconfig`, FusedMovingAvgObsFakeQuantize) does not export",
    "  (`aten::fused_moving_avg_obs_fake_quant`); with the dynamo exporter FakeQuantize's",
    "  `if self.observer_enabled[0] == 1` is a data-dependent branch `torch.export` refuses.",
    "- **torchao `quantize_`.** Int8WeightOnlyConfig writes no Q/DQ at all: the int8 values as float32",
    "  weights, MatMul, then a per-channel Mul; a float model to tpusim. Int8DynamicActivationInt8Weight",
    "  does not export (`aten._int_mm` has no ONNX function; the TorchScript exporter asserts).",
    "",
    "How tpusim reads them (`tpusim/frontend/`): canonicalisation folds the Constant nodes into",
    "initializers and removes the no-op Casts; `qdq.py` takes Q -> Clip(constant bounds) -> DQ as a grid",
    "whose integers stop at the Clip's bounds ([0, 127] here); tensors the model leaves in float are",
    "calibrated (`quantization_source` is still `model`), except the input of a grid-keeping op (max pool,",
    "reshape, ...) whose output the model quantizes, which takes that output's grid (`lowering.py`); a float",
    "bias is put on the accumulator's grid `s_x * s_w` by tpusim; the QAT Div/Add/BatchNormalization/Relu",
    "chain after a conv runs as one per-channel affine layer. With the int8 kernels of PyTorch's x86/fbgemm",
    "engines, PyTorch and ONNX Runtime agree to a few output steps; PyTorch's qnnpack kernels on this x86",
    "machine do not (the same qnnpack-quantized model run with `torch.backends.quantized.engine = 'x86'`",
    "matches ORT bit for bit).",
)


# ---------------------------------------------------------------- main

def run_variant(variant: Variant) -> dict:
    row = {"variant": variant, "ok": False}
    import torch

    torch.manual_seed(0)
    model, x = build(variant)
    with tempfile.TemporaryDirectory() as tmp:
        exported = export(model, x, variant, Path(tmp) / f"{variant.name}.onnx")
    drop_node_metadata(exported)
    row["facts"] = Facts(exported).summary()
    try:
        row["agreement"] = torch_vs_ort(model, exported, x)
        if variant.flow in ("eager", "fx") and variant.backend != "x86":
            # Which of PyTorch's int8 kernels ran matters: see the README's note on qnnpack.
            torch.backends.quantized.engine = "x86"
            row["agreement"] = f"{variant.backend} engine: {row['agreement']}; x86 engine: " \
                f"{torch_vs_ort(model, exported, x)}"
    except Exception as exc:  # noqa: BLE001 - recorded
        row["agreement"] = f"ORT failed: {type(exc).__name__}: {str(exc).splitlines()[0][:150]}"
    out = OUT_DIR / f"{variant.name}.onnx"
    size = len(exported.SerializeToString())
    stripped = None
    if size > MAX_KB * 1024:
        stripped = strip_int8_weights(exported)
    onnx.save_model(exported, str(out))
    row.update(ok=True, file=out.name, kb=round(out.stat().st_size / 1024), full_kb=round(size / 1024),
               stripped=stripped)
    return row


def _failure(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    # The exporters' long messages put the cause in a "<class ...>: message" line.
    cause = next((line for line in lines if line.startswith("<class")), lines[0] if lines else "")
    return f"{type(exc).__name__}: {cause}"[:300].replace("|", "/")


def write_readme(rows: list[dict], vers: str) -> None:
    ok = [r for r in rows if r["ok"]]
    failed = [r for r in rows if not r["ok"]]
    lines = [
        "# PyTorch-quantized ONNX files",
        "",
        "Written by `tools/export_torch_quantized.py` (its docstring says how to install and run it) with",
        f"{vers}.",
        "",
        "Each file is what `torch.onnx.export` wrote for a model quantized by PyTorch and calibrated on",
        "seeded N(0, 1) inputs (nothing is downloaded), with two changes: the dynamo exporter's per-node",
        "metadata (stack traces with this machine's paths, namespaces, class hierarchies) is dropped and its",
        f"external data is put back into the one file. A file that would be over {MAX_KB} KB (the torchvision",
        f"models) also has its int8 weight tensors of >= {STRIP_MIN_ELEMENTS} values stripped: name, dtype and shape",
        f"kept, no data, `doc_string` \"{STRIPPED}; std <s>\" (the spread",
        "of the integers PyTorch wrote). `tests/frontend/test_torch_quantized.py` refills them with seeded",
        "integers of that spread; every scale, zero point, int32 bias and node stays as PyTorch wrote it. The",
        "small CNN files keep PyTorch's own integer weights.",
        "",
        "Models: `smallcnn` (Conv-BN-ReLU, Conv-BN + residual add + ReLU, MaxPool, depthwise Conv-BN-ReLU,",
        "1x1 Conv + ReLU6 written `nn.Hardtanh(0, 6)`, global average pool, Linear; input 1x3x32x32);",
        "torchvision's quantizable `resnet18` and `mobilenet_v2` (`torchvision.models.quantization`,",
        "`weights=None, quantize=False`, then `fuse_model()`) for eager and FX, the plain torchvision models",
        f"for PT2E; input {'x'.join(map(str, TV_SHAPE))}, MobileNet-v2 at `width_mult=0.5` (at full width its",
        "per-channel scales and int32 biases alone are 400 KB). BatchNorm parameters get a spread of values",
        "first (gamma U(0.5, 1), beta and mean N(0, 0.1), var U(0.5, 1.5)), as training leaves them.",
        "",
        "Flows: **eager** = `fuse_modules`, `qconfig = get_default_qconfig(backend)`, `prepare`, 8",
        "calibration batches of 4, `convert`; **fx** = `prepare_fx(m, get_default_qconfig_mapping(backend),",
        "(x,))`, calibration, `convert_fx`; **pt2e** = `torch.export.export(m, (x,)).module()`, torchao's",
        "`prepare_pt2e(m, quantizer)`, 32 calibration samples (the export fixes batch 1), `convert_pt2e`",
        "(X86InductorQuantizer with `get_default_x86_inductor_quantization_config()`; ExecuTorch's",
        "XNNPACKQuantizer with `get_symmetric_quantization_config(is_per_channel=True/False)`); **qat** =",
        "`fuse_modules_qat`, `prepare_qat` with `QConfig(activation=default_fake_quant,",
        "weight=default_per_channel_weight_fake_quant)` (`fakequant`; `fakequant-full-range`: activations",
        "`FakeQuantize(quant_min=0, quant_max=255)` without `reduce_range`), 8 SGD steps, `eval()`,",
        "`apply(disable_observer)`, exported without `convert`. TorchScript = `torch.onnx.export(m, (x,), f,",
        "dynamo=False, opset_version=N)`; dynamo = `torch.onnx.export(m, (x,), f, dynamo=True,",
        "opset_version=18, external_data=True)`.",
        "",
        "## What PyTorch wrote",
        "",
        *FINDINGS,
        "",
        "The table is computed from the files (`Facts` in the script). *weights*: what feeds each",
        "Conv/Gemm's weight input; *biases*: its bias input; *activations*: the integer type and zero point",
        "of every QuantizeLinear on an activation, and any op between a Q and its DQ; *ReLU*: each",
        "Relu/Clip on floats, what produces its input and what reads it; *nodes whose output no Q reads*:",
        "compute nodes the model leaves in float (through a following Relu/Clip); *PyTorch vs ORT*: the",
        "quantized PyTorch model and ONNX Runtime on the exported file, one seeded input, in steps of the",
        "output's scale (or absolute when the output is float).",
        "",
        "| file | KB | flow / backend | exporter | ops | weights | biases | activations (Q) | ReLU | "
        "nodes whose output no Q reads | PyTorch vs ORT |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in ok:
        v, f = r["variant"], r["facts"]
        kb = f"{r['kb']}" + (f" (full {r['full_kb']}; {r['stripped'][0]} weights stripped)" if r["stripped"] else "")
        lines.append(f"| {r['file']} | {kb} | {v.flow} / {v.backend} | {v.exporter} {v.opset} | {f['ops']} | "
                     f"{f['weights']} | {f['biases']} | {f['activations']} | {f['relu']} | {f['float']} | "
                     f"{r['agreement']} |")
    lines += ["", "## Failed exports", "", "| variant | model | flow / backend | exporter | note | error |",
              "| --- | --- | --- | --- | --- | --- |"]
    for r in failed:
        v = r["variant"]
        lines.append(f"| {v.name} | {v.model} | {v.flow} / {v.backend} | {v.exporter} {v.opset} | {v.note} | "
                     f"{r['status']} |")
    (OUT_DIR / "README.md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="only variants whose name contains one of these")
    parser.add_argument("-v", "--verbose", action="store_true", help="print the traceback of each failure")
    args = parser.parse_args(argv)
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    rows = []
    for variant in VARIANTS:
        if args.names and not any(n in variant.name for n in args.names):
            continue
        t0 = time.time()
        try:
            row = run_variant(variant)
            status = f"ok, {row['kb']} KB; {row['agreement']}"
        except Exception as exc:  # noqa: BLE001 - recorded in the README
            row = {"variant": variant, "ok": False, "status": _failure(exc)}
            status = "FAILED: " + row["status"]
            if args.verbose:
                traceback.print_exc()
        rows.append(row)
        print(f"{variant.name}: {status} ({time.time() - t0:.1f} s)", flush=True)
    if not args.names:
        write_readme(rows, versions())
    return 0


if __name__ == "__main__":
    sys.exit(main())
