"""ONNX -> :class:`tpusim.ir.Graph`: load, check, lower op by op, fold batch norm, fuse activations."""
from tpusim.frontend.lowering import load_onnx, lower_model, supported_ops
from tpusim.frontend.reference import run_reference

__all__ = ["load_onnx", "lower_model", "run_reference", "supported_ops"]
