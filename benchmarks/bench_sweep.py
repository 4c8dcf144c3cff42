"""Throughput of a design-space sweep: ResNet-50, timing and energy (no quantization), on local workers.

    python3 benchmarks/bench_sweep.py [--points 1000|100] [--jobs 2]

The 1,000 points are 10 array shapes (array.rows 64..1024 x array.cols 128, 256) x 10 weight-memory
bandwidths (17..400 GB/s) x 10 batch sizes (1..8, 12, 16). ``--points 100`` keeps every shape and
batch size at one bandwidth (TPU v1's 34 GB/s) and extrapolates to 1,000 points.

Prints the sweep's wall time (``tpusim.sweep`` with an output folder, so every point file and
sweep.csv are written; the plots are timed on their own) and points per second, then where the time
goes, measured again in this process after the sweep: the set-up in the calling process (every config
checked, the model checked), a worker's start (a fresh interpreter importing the simulator), lowering
the model once per batch size, per point the simulation (compile + simulate + energy + record; a worker
compiles a program once for the points that differ only in settings the compiler does not read, such as
the bandwidths, ``tpusim.config.RecordedResults``, so the split times runs of consecutive points, as
a worker meets them) and the writing of its point file, and the plots. JIT caches must be warm (run any
ResNet-50 command once first).
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import tpusim
from tpusim import sweeps

CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "tpu_v1.yaml")
MODEL = "resnet50"
SHAPES = {"array.rows": [64, 128, 256, 512, 1024], "array.cols": [128, 256]}
BANDWIDTHS_GB_S = [17, 25, 34, 50, 68, 100, 136, 200, 300, 400]
BATCHES = [1, 2, 3, 4, 5, 6, 7, 8, 12, 16]
FULL_POINTS = len(SHAPES["array.rows"]) * len(SHAPES["array.cols"]) * len(BANDWIDTHS_GB_S) * len(BATCHES)
SPLIT_SAMPLE = 100  # points whose simulation and writing are timed one by one for the split
SPLIT_RUNS = 10  # ... in runs of consecutive points, spread over the grid, as a worker meets them


def grid(points: int) -> dict[str, list]:
    bandwidths = BANDWIDTHS_GB_S if points == FULL_POINTS else [34]
    return {**SHAPES, "weight_memory.bandwidth_gb_s": bandwidths}


def timed(function, *args):
    start = time.perf_counter()
    result = function(*args)
    return time.perf_counter() - start, result


def worker_start_s() -> float:
    """What a sweep worker pays once: a fresh interpreter that imports the simulator (best of three)."""
    code = "import tpusim.sweeps, tpusim.pipeline"
    return min(timed(subprocess.run, [sys.executable, "-c", code])[0] for _ in range(3))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--points", type=int, choices=(FULL_POINTS, FULL_POINTS // 10), default=FULL_POINTS)
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args()
    sweep_grid = grid(args.points)

    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "sweep"
        wall, rows = timed(lambda: sweeps.sweep(CONFIG, MODEL, sweep_grid, batch=BATCHES, out=out, jobs=args.jobs,
                                                 progress=False, plots=False))
        assert len(rows) == args.points
        print(f"{MODEL}, {len(rows)} points ({', '.join(f'{k}: {len(v)}' for k, v in sweep_grid.items())}, "
              f"batch: {len(BATCHES)}) on {args.jobs} workers: {wall:.1f} s wall, {len(rows) / wall:.1f} points/s")

        setup, points = timed(lambda: sweeps.build_points(CONFIG, MODEL, sweep_grid, batch=BATCHES))
        start = worker_start_s()
        sweeps._clear_caches()
        lowering = {}
        for batch in BATCHES:
            lowering[batch] = timed(sweeps._lowered, MODEL, points[0].model_digest, batch, None)[0]
        # A run's points differ in bandwidth only (the grid's last key), so they share the compiled program;
        # run i is of the i-th batch size and the i-th array shape.
        run_length, spacing = SPLIT_SAMPLE // SPLIT_RUNS, len(points) // SPLIT_RUNS
        sample = points if len(points) <= SPLIT_SAMPLE else [
            point for i in range(SPLIT_RUNS)
            for point in points[i * spacing + i * run_length % spacing:][:run_length]]
        store = sweeps._PointStore(Path(folder) / "split")
        simulate, write = [], []
        for point in sample:  # the lowering is timed above, not in the point's simulation
            sweeps._lowered(point.model, point.model_digest, point.batch, point.input_shape)
            seconds, record = timed(sweeps.simulate_point, CONFIG, point)
            simulate.append(seconds)
            write.append(timed(store.save, point, record)[0])
        table = timed(sweeps.write_table, rows, Path(folder) / "split" / "sweep.csv")[0]
        plots = timed(sweeps.write_plots, rows, sweeps.swept_parameters(points, sweep_grid), Path(folder) / "split")[0]
        direct = [timed(lambda: tpusim.simulate(CONFIG, MODEL, batch=point.batch, overrides=dict(point.overrides),
                                                quantize=False))[0] for point in sample[:3]]

    # The workers share the batch sizes out (tpusim.sweeps.pool_map's groups): each is lowered by one worker,
    # by two where one worker, done with its own, helps with another's.
    all_lowering = sum(lowering.values())
    mean_sim, mean_write = statistics.fmean(simulate), statistics.fmean(write)
    print(f"set-up in the calling process (check {len(points) // len(BATCHES)} configs and the model): {setup:.2f} s")
    print(f"worker start (interpreter + imports): {start:.2f} s per worker")
    print(f"lowering {MODEL} once per batch size: {all_lowering:.2f} s in all, shared out among the workers "
          f"({', '.join(f'{b}: {s:.2f}' for b, s in lowering.items())})")
    print(f"per point, mean of {len(sample)} ({SPLIT_RUNS} runs of consecutive points): "
          f"simulation {mean_sim * 1e3:.1f} ms "
          f"(min {min(simulate) * 1e3:.1f}, max {max(simulate) * 1e3:.1f}), point file {mean_write * 1e3:.2f} ms "
          f"(written by the calling process while the workers simulate); sweep.csv once {table * 1e3:.0f} ms")
    per_point_ms = {"simulation": mean_sim, "lowering": all_lowering / len(rows),
                    "worker start": args.jobs * start / len(rows), "writing": mean_write}
    rest = args.jobs * wall / len(rows) - sum(per_point_ms.values())
    print(f"the sweep's {args.jobs} x {wall:.1f} worker-seconds per point: "
          + ", ".join(f"{name} {seconds * 1e3:.1f} ms" for name, seconds in per_point_ms.items())
          + f", the rest (set-up, scheduling, idle ends, other load) {rest * 1e3:.1f} ms")

    def parts(points: int, configs_checked: float) -> float:
        return configs_checked + start + (all_lowering + points * mean_sim) / args.jobs + table

    print(f"for comparison, the first {len(direct)} of those points as single tpusim.simulate calls (config read, model "
          f"lowered, per-tensor twin run: what a sweep point cost before): {statistics.fmean(direct):.2f} s each, "
          f"against {statistics.fmean(simulate[:len(direct)]) * 1e3:.0f} ms in the sweep")
    print(f"the plots that `tpusim sweep` also draws (one per swept parameter; not in the wall time above): "
          f"{plots:.1f} s")
    print(f"the parts add up to {parts(len(rows), setup):.1f} s for this sweep")
    if args.points != FULL_POINTS:
        # The other bandwidths change stalls, not the work per point: scale the per-point parts and the set-up.
        scale = FULL_POINTS / args.points
        print(f"extrapolated to {FULL_POINTS} points on {args.jobs} workers: {parts(FULL_POINTS, setup * scale):.0f} s")

if __name__ == "__main__":
    main()
