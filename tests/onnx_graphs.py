"""Small ONNX graphs built with onnx.helper for the tests, and an ONNX Runtime runner."""
from __future__ import annotations

import platform
from pathlib import Path

import llvmlite.binding
import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper


def _onnxruntime_int8_gemm_saturates() -> bool:
    """Whether ONNX Runtime's 8-bit GEMM may saturate on this CPU. On x86 without VNNI it multiplies with
    AVX2's ``vpmaddubsw`` (uint8 x int8), which adds each pair of products in int16 with saturation, so a
    pair past 32767 changes the sum (OpenVINO's "Saturation (overflow) issue" page describes the same for
    those CPUs; VNNI's ``vpdpbusd`` adds in int32, and ARM's kernels are exact). Its Conv, Gemm and MatMul
    integers are then no exact reference: seen on a Zen 2 CPU (AVX2), 2 % of a uint8 conv's outputs off by
    up to 53, and int8 MatMuls off by up to 26."""
    if platform.machine().lower() not in ("x86_64", "amd64", "x86", "i686"):
        return False
    features = llvmlite.binding.get_host_cpu_features()
    return not any(features.get(name) for name in ("avx512vnni", "avxvnni", "amx-int8"))


ORT_INT8_GEMM_SATURATES = _onnxruntime_int8_gemm_saturates()
SATURATES_HERE = "ONNX Runtime's 8-bit GEMM saturates on this CPU (x86 without VNNI)"
_GEMM_OPS = frozenset({"conv", "gemm", "matmul"})


def onnxruntime_integers_exact(op: str) -> bool:
    """Whether ONNX Runtime's integers for a layer of this op are an exact reference here."""
    return not (ORT_INT8_GEMM_SATURATES and op in _GEMM_OPS)


class GraphBuilder:
    """Append nodes one by one; ``model()`` returns a checked ModelProto with one float input."""

    def __init__(self, input_shape, opset: int = 17, seed: int = 0, input_name: str = "input"):
        self.input_shape = list(input_shape)
        self.input_name = input_name
        self.opset = opset
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._count = 0

    def name(self, prefix: str) -> str:
        self._count += 1
        return f"{prefix}{self._count}"

    def const(self, array, prefix: str = "c") -> str:
        name = self.name(prefix)
        self.initializers.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def weight(self, shape, scale: float = 0.3) -> str:
        return self.const((self.rng.standard_normal(shape) * scale).astype(np.float32), "w")

    def node(self, op_type: str, inputs, n_outputs: int = 1, **attrs) -> str:
        outputs = [self.name(op_type.lower()) for _ in range(n_outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outputs, name=self.name(op_type + "_node"), **attrs))
        return outputs[0]

    def conv(self, x: str, c_in: int, c_out: int, k: int = 3, group: int = 1, bias: bool = True, **attrs) -> str:
        inputs = [x, self.weight((c_out, c_in // group, k, k))]
        if bias:
            inputs.append(self.const((self.rng.standard_normal(c_out) * 0.1).astype(np.float32), "b"))
        return self.node("Conv", inputs, group=group, **attrs)

    def batchnorm(self, x: str, channels: int) -> str:
        r = self.rng
        params = [r.uniform(0.5, 2.0, channels), r.normal(0, 0.3, channels), r.normal(0, 0.5, channels),
                  r.uniform(0.2, 3.0, channels)]
        return self.node("BatchNormalization", [x] + [self.const(p.astype(np.float32), "bn") for p in params],
                         epsilon=1e-5)

    def model(self, outputs, batch_dim="batch", spatial=None) -> onnx.ModelProto:
        outputs = [outputs] if isinstance(outputs, str) else list(outputs)
        shape = list(self.input_shape)
        shape[0] = batch_dim
        if spatial is not None:
            shape[1:] = spatial
        graph = helper.make_graph(
            self.nodes, "test_graph",
            [helper.make_tensor_value_info(self.input_name, TensorProto.FLOAT, shape)],
            [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs],
            self.initializers,
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset)])
        model.ir_version = min(model.ir_version, 10)
        done = onnx.shape_inference.infer_shapes(model).graph
        inferred = {vi.name: vi for vi in list(done.value_info) + list(done.output) if vi.type.tensor_type.HasField("shape")}
        for output in model.graph.output:
            if output.name in inferred:
                output.type.CopyFrom(inferred[output.name].type)
        onnx.checker.check_model(model)
        return model


def run_onnxruntime(model: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})


def save_small_classifier(path: Path) -> Path:
    """A conv, ReLU, global pool and Gemm on 1x3x8x8 inputs: the smallest model every stage has work in."""
    b = GraphBuilder((1, 3, 8, 8))
    y = b.node("Relu", [b.conv("input", 3, 4, pads=[1, 1, 1, 1])])
    y = b.node("Flatten", [b.node("GlobalAveragePool", [y])])
    onnx.save(b.model(b.node("Gemm", [y, b.weight((5, 4))], transB=1)), path)
    return path


# A residual add rounds sum_i s_i (q_i - z_i) / s_y: ONNX Runtime in float32 (relative error ~1e-7 of a value
# below 2**8), we through 31-bit dyadic multipliers into a 2**20 fixed-point domain (error < 2**-18 LSB).
# Both round correctly except where the exact value lies that close to a rounding boundary.
ADD_TIE_BAND = 1e-4


def assert_add_differences_are_near_ties(ql, inputs, ours, theirs):
    y_qp = ql.output_qparams
    exact = np.zeros(ours.shape, np.float64)
    for x, qp in zip(inputs, ql.input_qparams):
        exact += float(qp.scale) * (x.astype(np.float64) - int(qp.zero_point))
    exact = exact / float(y_qp.scale) + int(y_qp.zero_point)
    differ = (ours != theirs) & ~((ours.astype(np.int64) == -127) & (theirs.astype(np.int64) == -128))
    distance_to_boundary = np.abs(exact[differ] - np.floor(exact[differ]) - 0.5)
    assert np.all(distance_to_boundary < ADD_TIE_BAND), float(distance_to_boundary.max(initial=0.0))
