"""ONNX -> :class:`tpusim.ir.Graph`: load, check, lower op by op, fold batch norm, fuse activations."""
from tpusim.frontend.lowering import SUPPORTED_OPS, load_onnx, lower_model
from tpusim.frontend.reference import run_reference

__all__ = ["SUPPORTED_OPS", "load_onnx", "lower_model", "run_reference"]
