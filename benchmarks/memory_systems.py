"""TPU v1's weight memory as built (DDR3) against GDDR5 (the paper's TPU') and HBM2: throughput, latency and
the share of cycles the array waits for weights, on an MLP, ResNet-18 and ResNet-50 at batch 1 and 8.

    python3 benchmarks/memory_systems.py [--models mlp resnet18 resnet50] [--batches 1 8]

Timing only (no quantization: cycles do not depend on the weights' values); every chip is a shipped config.
Prints one markdown row per (model, batch, memory); DDR3 and GDDR5 also with two requests in flight. "weight stall" is the share of all cycles the array
waits for the weight memory; "weight shift" the share spent shifting weights in that streaming did not
cover (the TPU v1 paper's Table 3 categories). Energy per inference includes static power (28 W x latency);
the weight memory's part is its dynamic energy per bit (configs/energy/horowitz45.yaml) x bytes read.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from tpusim import pipeline

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# (label, config, overrides): the shipped memories, and DDR3 and GDDR5 with two requests in flight, which
# isolates what overlapping one tile's latency with the previous tile's transfer is worth.
TWO_IN_FLIGHT = {"weight_memory.requests_in_flight": 2}
MEMORIES = (("DDR3", "tpu_v1.yaml", {}), ("DDR3", "tpu_v1.yaml", TWO_IN_FLIGHT),
            ("GDDR5", "tpu_v1_gddr5.yaml", {}), ("GDDR5", "tpu_v1_gddr5.yaml", TWO_IN_FLIGHT),
            ("HBM2", "tpu_v1_hbm.yaml", {}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["mlp", "resnet18", "resnet50"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    args = parser.parse_args()
    print("| model | batch | memory | GB/s | requests in flight | latency (ms) | TOPS | weight stall | weight shift "
          "| energy / inference (mJ) | of it weight memory (mJ) |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for model in args.models:
        for batch in args.batches:
            for label, config_file, overrides in MEMORIES:
                options = pipeline.RunOptions(config=CONFIGS / config_file, model=model, batch=batch, quantize=False,
                                              overrides=overrides)
                config, graph, _ = pipeline.prepare(options)
                _, sim, energy = pipeline.time_and_energy(graph, config)
                total = sim.breakdown.total
                memory = config.weight_memory
                print(f"| {model} | {batch} | {label} | {memory.bandwidth_gb_s:g} | {memory.requests_in_flight} "
                      f"| {sim.latency_s * 1e3:.3f} | {sim.tops:.2f} | {sim.breakdown.weight_stall / total:.1%} "
                      f"| {sim.breakdown.weight_shift / total:.1%} | {energy.total_pj / batch / 1e9:.3f} "
                      f"| {energy.dynamic.weight_dram / batch / 1e9:.3f} |")


if __name__ == "__main__":
    main()
