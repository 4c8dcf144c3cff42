"""``tpusim check``: which nodes of a model tpusim can run, and every op it cannot, at once.

Each node of the file gets one status: ``lowered`` (an op module lowers it), ``folded`` (removed by
canonicalisation: constant and shape arithmetic, Identity, Dropout, no-op Cast, cancelled
Transposes), ``quantization`` (a QuantizeLinear/DequantizeLinear pair whose parameters tpusim
reads from the model) or ``unsupported``. When canonicalisation itself fails (for example on an op
that ONNX shape inference does not know), the nodes are judged by their op type alone and the
reason is reported.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import onnx

from tpusim import ops
from tpusim.errors import ModelError
from tpusim.frontend.canonical import canonicalize
DEFAULT_DOMAINS = ("", "ai.onnx")
QDQ_NODE_TYPES = ("QuantizeLinear", "DequantizeLinear")


@dataclass(frozen=True)
class NodeSupport:
    name: str
    op_type: str
    domain: str
    status: str  # lowered | folded | quantization | unsupported


@dataclass(frozen=True)
class SupportReport:
    nodes: tuple[NodeSupport, ...]
    canonical_nodes: int | None   # nodes left after canonicalisation (None when it failed)
    canonical_error: str | None

    @property
    def unsupported(self) -> dict[str, int]:
        """Unsupported op types (with their domain when not the default one) and how often each occurs."""
        counts = Counter(_label(n.op_type, n.domain) for n in self.nodes if n.status == "unsupported")
        return dict(sorted(counts.items(), key=lambda item: (-item[1], item[0])))


def _label(op_type: str, domain: str) -> str:
    return op_type if domain in DEFAULT_DOMAINS else f"{domain}.{op_type}"


def op_supported(node: onnx.NodeProto) -> bool:
    return node.domain in DEFAULT_DOMAINS and ops.lowering(node.op_type) is not None


def unsupported_summary(counts: dict[str, int]) -> str:
    return ", ".join(f"{op} x{count}" for op, count in counts.items())


def check_model(model: onnx.ModelProto, where: str, batch: int | None = None,
                input_shape: tuple[int, ...] | None = None) -> SupportReport:
    names = [node.name or f"{node.op_type}_{i}" for i, node in enumerate(model.graph.node)]
    kept: set[str] | None = None
    error = None
    canonical_count = None
    try:
        canonical = ops.rewrite(canonicalize(model, where, batch=batch, input_shape=input_shape).model)
        kept = {node.name for node in canonical.graph.node}
        canonical_count = len(canonical.graph.node)
    except ModelError as exc:
        error = str(exc)
    rows = []
    for name, node in zip(names, model.graph.node):
        if node.op_type in QDQ_NODE_TYPES and node.domain in DEFAULT_DOMAINS:
            status = "quantization"
        elif op_supported(node):
            status = "lowered" if kept is None or name in kept else "folded"
        elif kept is not None and name not in kept:
            status = "folded"
        else:
            status = "unsupported"
        rows.append(NodeSupport(name, node.op_type, node.domain, status))
    return SupportReport(tuple(rows), canonical_count, error)
