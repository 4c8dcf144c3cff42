"""Where a model's integer execution spends its time, op by op.

    python3 benchmarks/bench_integer_ops.py [MODEL ...] [--runs 8] [--top 8]

Each MODEL (a built-in workload such as ``resnet50``, or an ONNX file) is calibrated and quantized as the
default ``tpusim run`` does it; ``run_integer`` then runs one warm-up sample (kernels loaded, weights
packed) and ``--runs`` more, and the script prints the milliseconds per run of the whole network and of
each op type (every layer's ``execute``, timed around it), slowest first. A default run executes the
network once per evaluation sample (16), so an op's figure times 16 is what it adds to that run.
"""
from __future__ import annotations

import argparse
import collections
import time
from pathlib import Path

from tpusim.config import load_config
from tpusim.frontend import load_onnx
from tpusim.pipeline import resolve_model
from tpusim.quant import execute
from tpusim.quant.calibrate import model_for_onnxruntime
from tpusim.quant.stage import calibrate_and_quantize, evaluation_inputs

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tpu_v1.yaml"


def op_times(model: str, runs: int) -> tuple[float, list[tuple[str, float, int]]]:
    """(ms per run, [(op, ms per run, layers)] slowest first) of ``model``'s integer execution."""
    path = resolve_model(model)
    graph, config = load_onnx(path), load_config(CONFIG)
    quantized = calibrate_and_quantize(graph, model_for_onnxruntime(path, graph.external_data), config, None)
    batch = quantized.graph.batch
    samples, _ = evaluation_inputs(quantized.calibration, quantized.graph, (runs + 1) * batch, config.quant.seed)
    execute.run_integer(quantized.qgraph, samples[:batch], keep_all=True)
    spent: collections.Counter[str] = collections.Counter()
    layers: collections.Counter[str] = collections.Counter()
    untimed = execute._run_layer

    def timed(module, ql, inputs, options):
        start = time.perf_counter()
        result = untimed(module, ql, inputs, options)
        spent[ql.layer.op] += time.perf_counter() - start
        layers[ql.layer.op] += 1
        return result

    execute._run_layer = timed
    try:
        start = time.perf_counter()
        for i in range(1, runs + 1):
            execute.run_integer(quantized.qgraph, samples[i * batch : (i + 1) * batch], keep_all=True)
        total = (time.perf_counter() - start) / runs
    finally:
        execute._run_layer = untimed
    return total * 1e3, [(op, seconds / runs * 1e3, layers[op] // runs) for op, seconds in spent.most_common()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="*", default=["resnet50"], help="built-in workloads or ONNX files")
    parser.add_argument("--runs", type=int, default=8)
    parser.add_argument("--top", type=int, default=8, help="op types shown per model")
    args = parser.parse_args()
    for model in args.models:
        total, ops = op_times(model, args.runs)
        print(f"{Path(model).stem}: {total:.1f} ms a run ({args.runs} runs after one warm-up)")
        for op, ms, count in ops[: args.top]:
            print(f"  {op:16s} {ms:7.2f} ms  {count:4d} layers")


if __name__ == "__main__":
    main()
