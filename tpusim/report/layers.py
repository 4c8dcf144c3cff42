"""The lowered layer table: one row per layer of a :class:`Graph`."""
from __future__ import annotations

from typing import Any

from tpusim.ir import Graph

LAYER_TABLE_COLUMNS = ("layer", "op", "activation", "input_shape", "output_shape", "M", "K", "N", "groups",
                       "macs", "weight_bytes")


def _shape(shape: tuple[int, ...]) -> str:
    return "x".join(str(d) for d in shape)


def layer_table(graph: Graph, element_bytes: int) -> list[dict[str, Any]]:
    rows = []
    for layer in graph.layers:
        gemm = layer.gemm if layer.is_matrix else None
        rows.append({
            "layer": layer.name,
            "op": layer.op,
            "activation": layer.activation.label,
            "input_shape": " ".join(_shape(s) for s in layer.input_shapes),
            "output_shape": _shape(layer.output_shape),
            "M": gemm.m if gemm else "",
            "K": gemm.k if gemm else "",
            "N": gemm.n if gemm else "",
            "groups": gemm.groups if gemm else "",
            "macs": layer.macs,
            "weight_bytes": layer.weight_count * element_bytes,
        })
    return rows
