"""Speed and memory of the timing path: ResNet-50, batch 1, on the 256x256 TPU v1.

    python3 benchmarks/bench_timing.py [--model resnet50] [--batch 1]

Prints the wall time of lowering + compiling + simulating + pricing the model (the part of
`tpusim run` that produces cycles, stalls and energy; JIT caches warm, best of three, the ONNX file
already generated), the first of the three (what a `tpusim run` pays) and this process's peak RSS.
"""
from __future__ import annotations

import argparse
import resource
import time
from pathlib import Path

from tpusim import pipeline

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tpu_v1.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--batch", type=int, default=1)
    args = parser.parse_args()
    options = pipeline.RunOptions(config=CONFIG, model=args.model, batch=args.batch, quantize=False)
    pipeline.resolve_model(args.model)
    times = []
    for _ in range(3):
        start = time.perf_counter()
        config, graph, _ = pipeline.prepare(options)
        _, sim, _ = pipeline.time_and_energy(graph, config)
        times.append(time.perf_counter() - start)
    best = min(times)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{args.model} batch {args.batch} on {config.name} ({config.array.rows}x{config.array.cols}): "
          f"{sim.total_cycles:,} cycles, {len(sim.layers)} layers")
    print(f"timing wall time (lower + compile + simulate + energy): {best:.3f} s")
    # A run pays the first: its fresh memory (a copy of every weight) is page-faulted in, later ones reuse it.
    print(f"first of the three, as in a run: {times[0]:.3f} s")
    print(f"peak RSS: {peak_mib:.0f} MiB")


if __name__ == "__main__":
    main()
