"""The residual adds of one integer run, timed call by call with each of the fused add's two kernels.

Usage: python3 benchmarks/bench_residual_add.py [workload] [threads] [repeats]
(default resnet50, 2, 9). It runs the quantized workload once through ``run_integer`` (as
``bench_integer_execution.py`` quantizes it), keeps every fused add with its inputs, then times each add
with the arithmetic kernel (``_add_kernel``: int64 rescales, which AVX-512 DQ's ``vpmullq`` vectorises) and
with the table of every pair of input bytes (``_table_kernel``, which 8-bit inputs take), alternating, best of
``repeats``, and prints each kernel's total. Both must give the same integers; the script stops if they do not. The tables are built before the timing, as a layer builds its table once.
"""
from __future__ import annotations

import sys

import numba
import numpy as np

from bench_integer_execution import _quantized
from bench_pe_kernel import best_seconds
from tpusim.ops import add
from tpusim.quant.execute import run_integer


def _recorded_adds(name: str) -> list[tuple[object, list[np.ndarray]]]:
    """(layer, inputs) of every add that took a fused kernel in one run."""
    _, _, qgraph, x = _quantized(name)
    calls = []
    call = add._FusedAdd.__call__

    def record(self, inputs):
        calls.append(self)
        return call(self, inputs)

    layers = {}
    execute = add.Add.execute

    def execute_recorded(self, ql, inputs, options):
        count = len(calls)
        result = execute(self, ql, inputs, options)
        if len(calls) > count:
            layers[ql.name] = (self, ql, [q.copy() for q in inputs])
        return result

    add._FusedAdd.__call__, add.Add.execute = record, execute_recorded
    try:
        run_integer(qgraph, x)
    finally:
        add._FusedAdd.__call__, add.Add.execute = call, execute
    return list(layers.values())


def main(name: str = "resnet50", threads: int = 2, repeats: int = 9) -> None:
    numba.set_num_threads(threads)
    recorded = _recorded_adds(name)
    totals = {"arithmetic": 0.0, "table": 0.0}
    elements = 0
    for module, ql, inputs in recorded:
        kernels = {"arithmetic": add._FusedAdd.of(ql, module.signs, table=False),
                   "table": add._FusedAdd.of(ql, module.signs)}
        if kernels["arithmetic"]._looks_up:
            continue  # the arithmetic kernel's shortcuts do not hold for this layer
        outputs = {kind: fused(inputs) for kind, fused in kernels.items()}
        if not np.array_equal(outputs["arithmetic"], outputs["table"]):
            sys.exit(f"{ql.name}: the two kernels disagree")
        for kind, fused in kernels.items():
            totals[kind] += best_seconds(lambda: fused(inputs), repeats)
        elements += inputs[0].size
    print(f"{name}: {len(recorded)} fused adds, {elements / 1e6:.1f} M elements; {threads} threads; best of {repeats} "
          "back-to-back calls each; same integers from both kernels")
    for kind, seconds in totals.items():
        mark = " (what runs)" if kind == "table" else ""
        print(f"  {kind:10s}: {seconds * 1e3:7.2f} ms ({seconds / max(elements, 1) * 1e9:.2f} ns an element){mark}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "resnet50", int(sys.argv[2]) if len(sys.argv) > 2 else 2,
         int(sys.argv[3]) if len(sys.argv) > 3 else 9)
