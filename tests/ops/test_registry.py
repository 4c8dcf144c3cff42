"""Every op the front end accepts is handled by every stage: one module per op, registered."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import onnx
import pytest

from onnx_graphs import GraphBuilder
from tpusim import ops
from tpusim.frontend import supported_ops
from tpusim.ops.base import Op

STAGE_METHODS = ("reference", "quantize", "execute", "export")


def _overrides(module: Op, method: str) -> bool:
    return getattr(type(module), method) is not getattr(Op, method)


def test_every_onnx_type_has_a_lowering():
    for onnx_type in supported_ops():
        module = ops.lowering(onnx_type)
        assert module is not None and _overrides(module, "lower"), onnx_type


@pytest.mark.parametrize("name", ops.layer_ops())
def test_every_layer_op_is_known_to_every_stage(name):
    module = ops.op(name)
    for method in STAGE_METHODS:
        assert _overrides(module, method), f"{name} has no {method}"
    # The tiler maps a matrix op's GEMM onto the array; everything else runs on the activation unit,
    # except ops that emit their own instructions.
    assert (module.matrix or _overrides(module, "vector_cost") or module.alias
            or (module.schedules_itself and _overrides(module, "emit"))), f"{name} has no cost"


def test_unknown_names_are_refused():
    with pytest.raises(ValueError, match="no op module"):
        ops.op("no_such_op")
    assert ops.lowering("NoSuchOnnxOp") is None


def test_readme_lists_exactly_the_registered_ops():
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    start = readme.index("<!-- ops table: python3 -m tpusim.ops -->\n") + len("<!-- ops table: python3 -m tpusim.ops -->\n")
    end = readme.index("<!-- end ops table -->")
    assert readme[start:end].strip() == ops.markdown_table(), "regenerate the README's table: python3 -m tpusim.ops"


def test_every_op_on_the_matrix_unit_counts_its_accumulator_wraps():
    for name in ops.layer_ops():
        module = ops.op(name)
        if module.matrix:
            assert module.accumulates, name
    assert {"conv", "gemm", "matmul", "lstm", "gru"} <= {n for n in ops.layer_ops() if ops.op(n).accumulates}


def _silu_cnn() -> onnx.ModelProto:
    g = GraphBuilder((1, 4, 8, 8))
    x = g.conv(g.input_name, 4, 4)
    return g.model(g.node("Mul", [x, g.node("Sigmoid", [x])]))


@pytest.mark.parametrize("model", ["tiny_cnn", "bert_tiny", "silu"])
def test_lowering_a_float_model_imports_no_numba(tmp_path, generated_workload, model):
    """A run without quantization (and ``tpusim check``) lowers every op but executes none: op modules
    import the quantization stage, tensor_ops and their kernels, which all import Numba, where they run.
    Identifying a function (BERT's GELU, SiLU) evaluates the known ones on a few thousand points."""
    path = tmp_path / f"{model}.onnx"
    onnx.save(_silu_cnn() if model == "silu" else generated_workload(model).model, path)
    code = ("import sys\nimport tpusim.pipeline\nfrom tpusim import ops\nfrom tpusim.frontend import load_onnx\n"
            f"ops.layer_ops()\nload_onnx({str(path)!r}, batch=2)\n"
            "print(sorted(m for m in ('numba', 'tpusim.quant', 'tpusim.kernels', 'tpusim.tensor_ops') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
