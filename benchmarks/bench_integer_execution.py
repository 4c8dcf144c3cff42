"""Wall time of whole-network integer execution vs ONNX Runtime's int8 (QDQ) execution of the same model.

Usage: python3 benchmarks/bench_integer_execution.py [workload] [repeats]
(default resnet50, 3). Both run at batch 1 on the same quantized model: ours is
``run_integer``; ONNX Runtime runs ``export_qdq`` (its QDQ fusions turn it into QLinearConv etc.).
The target is ours within 5x of ONNX Runtime.
"""
from __future__ import annotations

import os
import sys
import time

import onnxruntime as ort

from tpusim.config import load_config
from tpusim.frontend import lower_model
from tpusim.quant.calibrate import collect_statistics, synthetic_inputs
from tpusim.quant.execute import run_integer
from tpusim.quant.export import export_qdq
from tpusim.quant.quantize import quantize_graph
from tpusim.workloads import build_model


def best_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main(name: str = "resnet50", repeats: int = 3) -> None:
    config = load_config("configs/tpu_v1.yaml")
    model = build_model(name)
    graph = lower_model(model, name)
    calibration = synthetic_inputs(graph.input_shape[1:], 2, seed=0)
    stats = collect_statistics(model, graph, calibration, config.quant.histogram_bins)
    qgraph = quantize_graph(graph, stats, config.quant)
    x = synthetic_inputs(graph.input_shape[1:], 1, seed=1).inputs

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(export_qdq(qgraph, graph).SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    feed = {graph.input_name: x}
    session.run(None, feed)
    run_integer(qgraph, x)  # compile the Numba kernels outside the timing

    ours = best_time(lambda: run_integer(qgraph, x, engine="int8-gemm"), repeats)
    blas = best_time(lambda: run_integer(qgraph, x, engine="exact-blas"), repeats)
    theirs = best_time(lambda: session.run(None, feed), repeats)
    print(f"{name} batch 1, {graph.macs / 1e9:.2f} GMAC, {config.quant.weights} weights, "
          f"{config.quant.activations} activations; best of {repeats}; "
          f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs (both sides slow down under load)")
    print(f"  tpusim run_integer        : {ours * 1e3:8.1f} ms (engine int8-gemm, the default)")
    print(f"  tpusim run_integer        : {blas * 1e3:8.1f} ms (engine exact-blas)")
    print(f"  ONNX Runtime QDQ int8     : {theirs * 1e3:8.1f} ms (intra-op threads: default)")
    print(f"  ratio                     : {ours / theirs:8.2f}x / {blas / theirs:.2f}x (target <= 5x)")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "resnet50", int(sys.argv[2]) if len(sys.argv) > 2 else 3)
