"""Time of the histogram statistics of calibration: ``observe`` and ``merge`` on ResNet-50's tensors.

    python3 benchmarks/bench_calibration.py [--model resnet50] [--batch 8] [--batches 4] [--repeat 3]
                                            [--bins 2048] [--reference FILE]

Runs the FP32 model in ONNX Runtime with every tensor calibration histograms exposed, as
``tpusim.quant.calibrate.collect_statistics`` does, on ``--batches`` seeded synthetic batches of
``--batch`` samples (the defaults are what ``tpusim run`` calibrates on: 32 samples in batches of 8).
For every batch it times ``observe`` of each tensor (best of ``--repeat``, JIT caches warm) and the
``merge`` into the running statistics, and prints the totals, the time per value and the largest
tensors. ONNX Runtime's own time is printed too but not counted. It also times what calibration does
(``observe`` of a tensor's first batch, ``observe_merged`` of every later one) against ``observe`` and
``merge`` of every batch, and checks that both give the same statistics, bit for bit. Both find the
tensors in the caches as ONNX Runtime leaves them (it runs again before the sequence); with
``--reference``, the baseline is the reference, as the current ``observe`` finds the caches warmed by it.

``--reference FILE`` also times another copy of ``histogram.py`` on the same tensors and checks that
both give the same statistics, bit for bit (min, max, range and every bin count):

    git show a5affac^:tpusim/quant/histogram.py > /tmp/histogram_before.py   # before the kernels of a5affac
    python3 benchmarks/bench_calibration.py --reference /tmp/histogram_before.py
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from pathlib import Path

import numpy as np
import onnx

from tpusim import pipeline
from tpusim.frontend import load_onnx
from tpusim.quant import histogram
from tpusim.quant.calibrate import _session_exposing, graph_tensors, synthetic_inputs


def _load(path: Path):
    spec = importlib.util.spec_from_file_location("histogram_reference", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _best(repeat: int, work) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        result = work()
        best = min(best, time.perf_counter() - start)
    return best, result


def _same(a, b) -> bool:
    return ((a.min, a.max, a.lo, a.hi, a.count) == (b.min, b.max, b.lo, b.hi, b.count)
            and np.signbit(a.min) == np.signbit(b.min) and np.signbit(a.max) == np.signbit(b.max)
            and np.array_equal(a.counts, b.counts))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--bins", type=int, default=histogram.DEFAULT_BINS)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--reference", type=Path, default=None, help="another histogram.py to time and compare")
    args = parser.parse_args()

    modules = {"current": histogram}
    if args.reference is not None:
        modules = {"reference": _load(args.reference), **modules}
    for module in modules.values():  # compile or load the cached kernels
        module.merge(module.observe(np.arange(5, dtype=np.float32), args.bins),
                     module.observe(-np.arange(5.0), args.bins))

    path = pipeline.resolve_model(args.model)
    graph = load_onnx(path, batch=1)
    tensors = graph_tensors(graph)
    session = _session_exposing(onnx.load(str(path)), tensors)
    input_name = session.get_inputs()[0].name
    data = np.asarray(synthetic_inputs(graph.input_shape[1:], args.batch * args.batches, args.seed).inputs)

    observe_s = {name: 0.0 for name in modules}
    merge_s = {name: 0.0 for name in modules}
    running: dict[str, dict] = {name: {} for name in modules}
    sequenced: dict[str, object] = {}  # what calibration does: observe, then observe_merged
    sequence_s = 0.0
    later_batches = fitting_batches = 0
    ort_s = values = 0
    largest: list[tuple[int, str, dict[str, float]]] = []
    for start in range(0, len(data), args.batch):
        batch = data[start : start + args.batch]
        began = time.perf_counter()
        outputs = dict(zip([o.name for o in session.get_outputs()], session.run(None, {input_name: batch})))
        ort_s += time.perf_counter() - began
        outputs[graph.input_name] = batch
        for tensor in tensors:
            x = outputs[tensor]
            values += x.size
            per_module = {}
            for name, module in modules.items():
                seconds, stats = _best(args.repeat, lambda: module.observe(x, args.bins, name=tensor))
                observe_s[name] += seconds
                per_module[name] = (seconds, stats)
                previous = running[name].get(tensor)
                if previous is not None:
                    seconds, stats = _best(args.repeat, lambda: module.merge(previous, stats))
                    merge_s[name] += seconds
                running[name][tensor] = stats
            if args.reference is not None and not _same(per_module["reference"][1], per_module["current"][1]):
                raise SystemExit(f"{tensor}: observe differs from the reference")
            if start == 0:
                largest.append((x.size, tensor, {name: t for name, (t, _) in per_module.items()}))
        # calibration's sequence, on the tensors in the caches as ONNX Runtime leaves them (as the first observe
        # timed found them)
        session.run(None, {input_name: batch})
        for tensor in tensors:
            x, so_far = outputs[tensor], sequenced.get(tensor)
            if so_far is None:
                seconds, sequenced[tensor] = _best(args.repeat, lambda: histogram.observe(x, args.bins, name=tensor))
            else:
                seconds, sequenced[tensor] = _best(args.repeat,
                                                   lambda: histogram.observe_merged(so_far, x, name=tensor))
                later_batches += 1
                fitting_batches += so_far.lo <= float(x.min()) and float(x.max()) < so_far.hi
            sequence_s += seconds
        del outputs
    if args.reference is not None:
        for tensor in tensors:
            if not _same(running["reference"][tensor], running["current"][tensor]):
                raise SystemExit(f"{tensor}: merged statistics differ from the reference")
    for tensor in tensors:
        if not _same(sequenced[tensor], running["current"][tensor]):
            raise SystemExit(f"{tensor}: observe_merged differs from observe and merge")

    print(f"{args.model}: {len(tensors)} tensors x {args.batches} batches of {args.batch} samples, {values:,} values, "
          f"{args.bins} bins; best of {args.repeat}; load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    print(f"  ONNX Runtime (not counted): {ort_s:.2f} s")
    for name in modules:
        print(f"  {name:9s} observe {observe_s[name]:6.3f} s ({observe_s[name] / values * 1e9:.2f} ns per value)   "
              f"merge {merge_s[name] * 1000:6.1f} ms")
    if args.reference is not None:
        print(f"  observe {observe_s['reference'] / observe_s['current']:.1f}x faster, "
              f"merge {merge_s['reference'] / max(merge_s['current'], 1e-12):.1f}x; "
              "every statistic identical to the reference (min, max, range, all bin counts)")
    baseline = next(iter(modules))  # the first timed on each tensor, in the caches as ONNX Runtime leaves them
    merged_s = observe_s[baseline] + merge_s[baseline]
    print(f"  calibration's sequence: {baseline} observe + merge {merged_s:6.3f} s, current observe then "
          f"observe_merged {sequence_s:6.3f} s ({merged_s / sequence_s:.2f}x); {fitting_batches} of {later_batches} "
          "later batches in the running window; identical statistics")
    print("  largest tensors of the first batch (observe, ms):")
    for size, tensor, seconds in sorted(largest, reverse=True)[:5]:
        print(f"    {tensor:40s} {size:>11,}  " + "  ".join(f"{n} {t * 1000:6.2f}" for n, t in seconds.items()))


if __name__ == "__main__":
    main()
