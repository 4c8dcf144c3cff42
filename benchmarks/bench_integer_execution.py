"""Wall time of whole-network integer execution vs ONNX Runtime's int8 (QDQ) execution of the same model.

Usage: python3 benchmarks/bench_integer_execution.py [workload] [repeats]
(default resnet50, 7). Both run at batch 1 on the same quantized model and the same input: ours is
``run_integer``; ONNX Runtime runs ``export_qdq`` (its QDQ fusions turn it into QLinearConv etc.)
with its default threads. The two are timed alternately, one run each per round, and the best of
the rounds is kept for each, so a busy machine slows both alike. The target is ours within 2x of
ONNX Runtime (issue 11).

It then times both again on one thread each (Numba's threads set to 1, ONNX Runtime's intra-op
threads to 1) by the CPU time of the calling thread, which a busy machine barely changes: on a
loaded machine, read the kernels' relative speed there.

The int8 kernel's fast paths need AMX int8 (``tdpbusd``, with Linux granting the process its tiles),
AVX-512 VNNI (``vpdpbusd``) or, without either, AVX2 (``vpmaddwd``); the script says which this CPU has and
then times ours again in subprocesses: with the AMX tiles turned off (the VNNI kernel, where this CPU has
AMX), with ``vpdpbusd`` turned off too (the AVX2 kernel, where this CPU has AVX-512 VNNI), and with Numba
compiling for a named CPU (``NUMBA_CPU_NAME``: ``haswell``, AVX2; ``generic``, baseline x86-64), which takes
the portable kernel.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time

import llvmlite.binding
import numba
import numpy as np
import onnxruntime as ort

from tpusim.config import load_config
from tpusim.frontend import lower_model
from tpusim.kernels import gemm
from tpusim.kernels.amx import amx_ready
from tpusim.kernels.gemm import HAS_AVX2, HAS_VNNI
from tpusim.quant.calibrate import collect_statistics, synthetic_inputs
from tpusim.quant.execute import run_integer
from tpusim.quant.export import export_qdq
from tpusim.quant.quantize import quantize_graph
from tpusim.workloads import build_model

# Without these features a Numba target takes the portable kernel (LLVM's own vectorisation of it).
_FEATURES = ("avx2", "avx512f", "avx512bw", "avx512vnni", "avxvnni", "amx-int8")
_OTHER_TARGETS = (("haswell", "AVX2, no AVX-512"), ("generic", "baseline x86-64, SSE2"))
_OURS_ONLY = "--ours-only"
_NO_VNNI = "--no-vnni"  # with _OURS_ONLY: vpdpbusd off, as where it fails to compile, so the AVX2 kernel runs
_NO_AMX = "--no-amx"  # with _OURS_ONLY: the AMX tiles off likewise, so the VNNI kernel runs


_KERNEL = ("AMX int8 (tdpbusd) where the fused GEMM fits it, else AVX-512 VNNI (vpdpbusd)" if amx_ready()
           else "AVX-512 VNNI (vpdpbusd)" if HAS_VNNI else "AVX2 (vpmaddwd) where the fused GEMM fits it, else portable"
           if HAS_AVX2 else "portable")


def _quantized(name: str):
    config = load_config("configs/tpu_v1.yaml")
    model = build_model(name)
    graph = lower_model(model, name)
    calibration = synthetic_inputs(graph.input_shape[1:], 2, seed=0)
    stats = collect_statistics(model, graph, calibration, config.quant.histogram_bins)
    qgraph = quantize_graph(graph, stats, config.quant)
    return config, graph, qgraph, np.asarray(synthetic_inputs(graph.input_shape[1:], 1, seed=1).inputs)


def _timed(fn, clock=time.perf_counter) -> float:
    start = clock()
    fn()
    return clock() - start


def _ours_only(name: str, repeats: int) -> None:
    """The subprocess side: our time alone, printed as one number of seconds."""
    _, _, qgraph, x = _quantized(name)
    run_integer(qgraph, x)  # compile (or load) the kernels for this target outside the timing
    print(min(_timed(lambda: run_integer(qgraph, x)) for _ in range(repeats)))


def main(name: str = "resnet50", repeats: int = 7) -> None:
    config, graph, qgraph, x = _quantized(name)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    qdq = export_qdq(qgraph, graph).SerializeToString()
    session = ort.InferenceSession(qdq, options, providers=["CPUExecutionProvider"])
    feed = {graph.input_name: x}
    session.run(None, feed)
    run_integer(qgraph, x)  # compile the Numba kernels outside the timing

    ours, theirs = [], []
    for _ in range(repeats):
        ours.append(_timed(lambda: run_integer(qgraph, x)))
        theirs.append(_timed(lambda: session.run(None, feed)))
    blas = min(_timed(lambda: run_integer(qgraph, x, engine="exact-blas")) for _ in range(max(1, repeats // 3)))
    best_ours, best_theirs = min(ours), min(theirs)

    options.intra_op_num_threads = 1
    single = ort.InferenceSession(qdq, options, providers=["CPUExecutionProvider"])
    single.run(None, feed)
    threads = numba.get_num_threads()
    numba.set_num_threads(1)
    ours_cpu, theirs_cpu = [], []
    for _ in range(repeats):
        ours_cpu.append(_timed(lambda: run_integer(qgraph, x), time.thread_time))
        theirs_cpu.append(_timed(lambda: single.run(None, feed), time.thread_time))
    numba.set_num_threads(threads)

    features = llvmlite.binding.get_host_cpu_features()
    print(f"{name} batch 1, {graph.macs / 1e9:.2f} GMAC, {config.quant.weights} weights, "
          f"{config.quant.activations} activations; best of {repeats} alternating rounds; "
          f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs (both sides slow down under load)")
    print(f"  CPU                       : {llvmlite.binding.get_host_cpu_name()}, "
          + " ".join(f"{f}={'yes' if features.get(f) else 'no'}" for f in _FEATURES)
          + f"; int8 kernel: {_KERNEL}, "
          f"{numba.get_num_threads()} threads (the caller and helpers claiming tasks, tpusim.kernels.gemm.run_tasks)")
    print(f"  tpusim run_integer        : {best_ours * 1e3:8.1f} ms (engine int8-gemm, the default)")
    print(f"  ONNX Runtime QDQ int8     : {best_theirs * 1e3:8.1f} ms (intra-op threads: default)")
    print(f"  ratio                     : {best_ours / best_theirs:8.2f}x (target <= 2x)")
    print(f"  one thread each, CPU time : {min(ours_cpu) * 1e3:8.1f} ms vs {min(theirs_cpu) * 1e3:.1f} ms: "
          f"{min(ours_cpu) / min(theirs_cpu):.2f}x (load-proof: the kernels' relative speed)")
    print(f"  tpusim run_integer        : {blas * 1e3:8.1f} ms (engine exact-blas: float32 BLAS on exact K chunks)")
    if amx_ready():
        seconds = _ours_elsewhere(name, repeats, os.environ, _NO_AMX)
        print(f"  tpusim, AMX off           : {seconds * 1e3:8.1f} ms (the AVX-512 VNNI kernel, vpdpbusd; "
              f"{seconds / best_theirs:.2f}x ONNX Runtime here)")
    if HAS_VNNI and HAS_AVX2:
        seconds = _ours_elsewhere(name, repeats, os.environ, _NO_AMX, _NO_VNNI)
        print(f"  tpusim, vpdpbusd off      : {seconds * 1e3:8.1f} ms (the AVX2 kernel, vpmaddwd, where the fused "
              f"GEMM fits it; {seconds / best_theirs:.2f}x ONNX Runtime here)")
    for cpu, what in _OTHER_TARGETS:
        seconds = _ours_elsewhere(name, repeats, dict(os.environ, NUMBA_CPU_NAME=cpu))
        print(f"  tpusim, NUMBA_CPU_NAME={cpu:8s}: {seconds * 1e3:6.1f} ms ({what}: the portable kernel; "
              f"{seconds / best_theirs:.2f}x ONNX Runtime here)")


def _ours_elsewhere(name: str, repeats: int, env, *flags: str) -> float:
    """Our best time in a subprocess with this environment and these flags, in seconds."""
    result = subprocess.run([sys.executable, __file__, name, str(repeats), _OURS_ONLY, *flags], env=env,
                            capture_output=True, text=True, check=True)
    return float(result.stdout.split()[-1])


if __name__ == "__main__":
    if _NO_AMX in sys.argv:
        gemm._amx_compiles[0] = False
    if _NO_VNNI in sys.argv:
        gemm._vnni_compiles[0] = False
    arguments = [a for a in sys.argv[1:] if a not in (_OURS_ONLY, _NO_VNNI, _NO_AMX)]
    workload = arguments[0] if arguments else "resnet50"
    rounds = int(arguments[1]) if len(arguments) > 1 else 7
    (_ours_only if _OURS_ONLY in sys.argv else main)(workload, rounds)
