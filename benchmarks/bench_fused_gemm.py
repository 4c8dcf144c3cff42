"""The fused GEMMs of one integer run, timed call by call under each kernel and epilogue this CPU has.

Usage: python3 benchmarks/bench_fused_gemm.py [workload] [threads] [repeats]
(default resnet50, 2, 9). It runs the quantized workload once through ``run_integer`` (as
``bench_integer_execution.py`` quantizes it), keeps every ``RequantizedGemm`` call with its input, then
times each call under every variant back to back, best of ``repeats``, and prints each variant's total.
Variants: the epilogue that checks every sum for a wrap (``general``) and the one that runs where no sum
can leave the accumulator (``sums fit``), each on the AVX-512 VNNI kernel and, where the CPU has AMX
int8 and Linux grants its tiles, on the AMX kernel; where the AVX2 kernel runs, also its epilogue on int32
lanes (``int32 words``, where every right shift is 32 to 63), which those layers take. Every variant must give the same integers and wrap
counts; the script stops if one does not. Timing whole calls back to back keeps a busy machine's
swings out of the comparison, which whole-network runs (``bench_integer_execution.py``) cannot.
"""
from __future__ import annotations

import sys
import time

import numba
import numpy as np

from bench_integer_execution import _quantized
from tpusim.kernels import gemm
from tpusim.kernels.amx import amx_ready
from tpusim.quant.execute import run_integer


def _recorded_calls(name: str) -> list[tuple[gemm.RequantizedGemm, np.ndarray]]:
    _, _, qgraph, x = _quantized(name)
    calls = []
    call = gemm.RequantizedGemm.__call__

    def record(self, xs):
        calls.append((self, xs.copy()))
        return call(self, xs)

    gemm.RequantizedGemm.__call__ = record
    try:
        run_integer(qgraph, x)
    finally:
        gemm.RequantizedGemm.__call__ = call
    return calls


def _set_variant(fused: gemm.RequantizedGemm, prepared: dict, amx: bool, epilogue: str) -> None:
    """The kernel (AMX tiles or not) and the epilogue of the next call; ``prepared``: the layer's own choices."""
    fused._use_amx = amx
    for attribute, chosen in prepared.items():
        if chosen is not None:
            if attribute == "_pairs" and epilogue != "int32 words":
                chosen = chosen[:3] + (None,) + chosen[4:]
            setattr(fused, attribute, chosen[:-1] + (chosen[-1] and epilogue != "general",))


def main(name: str = "resnet50", threads: int = 2, repeats: int = 9) -> None:
    numba.set_num_threads(threads)
    calls = _recorded_calls(name)
    kernels = ["AMX", "VNNI"] if amx_ready() else ["VNNI"] if gemm.HAS_VNNI else ["this CPU's"]
    words = any(fused._pairs is not None and fused._pairs[3] is not None for fused, _ in calls)
    epilogues = ("general", "sums fit", "int32 words") if words else ("general", "sums fit")
    variants = [(kernel, epilogue) for kernel in kernels for epilogue in epilogues]
    totals = dict.fromkeys(variants, 0.0)
    fitting = 0
    for fused, x in calls:
        prepared = {attribute: getattr(fused, attribute) for attribute in ("_broadcast", "_pairs")}
        fitting += bool((fused._broadcast or fused._pairs or (False,))[-1])  # as the layer decided it
        results = set()
        for kernel, epilogue in variants:
            _set_variant(fused, prepared, kernel == "AMX", epilogue)
            out, wrapped = fused(x)
            results.add((out.tobytes(), wrapped))
        if len(results) != 1:
            raise SystemExit(f"the variants disagree on a call with input {x.shape}")
        best = dict.fromkeys(variants, float("inf"))
        for _ in range(repeats):
            for variant in variants:
                _set_variant(fused, prepared, variant[0] == "AMX", variant[1])
                start = time.perf_counter()
                fused(x)
                best[variant] = min(best[variant], time.perf_counter() - start)
        for variant in variants:
            totals[variant] += best[variant]
        for attribute, chosen in prepared.items():
            setattr(fused, attribute, chosen)
    macs = sum(x.shape[0] * x.shape[1] * fused._w_nk.shape[1] * fused._w_nk.shape[2] for fused, x in calls)
    print(f"{name}: {len(calls)} fused GEMM calls, {macs / 1e9:.2f} GMAC (K padded as the kernels run it), "
          f"{fitting} whose sums fit the accumulator; {threads} threads; best of {repeats} back-to-back calls each; "
          "same integers and wraps in every variant")
    for (kernel, epilogue), seconds in totals.items():
        print(f"  {kernel:10s} kernel, {epilogue:11s} epilogue: {seconds * 1e3:8.2f} ms "
              f"({macs / seconds / 1e9:5.0f} GMAC/s)")


if __name__ == "__main__":
    arguments = sys.argv[1:]
    main(arguments[0] if arguments else "resnet50", int(arguments[1]) if len(arguments) > 1 else 2,
         int(arguments[2]) if len(arguments) > 2 else 9)
