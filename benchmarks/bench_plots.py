"""Time of the three plots of a run: latency_breakdown.png, energy_breakdown.png, roofline.png.

    python3 benchmarks/bench_plots.py [--model resnet50[,bert_base,...]] [--repeat 5] [--out DIR]
                                      [--plots-module FILE]

Builds a run's layer rows and per-layer energies without quantizing (lower + compile + simulate +
energy, as ``tpusim run --no-quantize`` does; the plots draw nothing the quantizer adds), then times
each plot function of ``tpusim.report.plots`` exactly as ``tpusim.pipeline.write_reports`` calls it:
figure built, rendered to PNG and written. Imports are warm and one throwaway figure is drawn first
(matplotlib's font cache and text machinery loaded), so the figures measure the plots themselves.
Each figure's time is the best of ``--repeat``; the total is the sum of the three bests. The PNGs
stay in ``--out`` (default: a temporary directory) for looking at. Times are wall and CPU time of
this process: on a machine other jobs load, the CPU time is the steadier figure. Several models
(``--model resnet50,bert_base``: 73 and 270 layers) are timed one after the other in one process, each
with its figures in a folder of its own under ``--out``, and a last line gives each model's three plots
(best CPU time) per layer.

``--plots-module FILE`` times another copy of the module instead, for a before/after comparison:

    git show 0fe5378:tpusim/report/plots.py > /tmp/plots_before.py   # a commit before the one-pass plots
    python3 benchmarks/bench_plots.py --plots-module /tmp/plots_before.py --out /tmp/before
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
import time
from pathlib import Path

from tpusim import pipeline
from tpusim.report import plots, run_report

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tpu_v1.yaml"


def _times(repeat: int, work) -> tuple[float, float, float]:
    """Wall time of the first call (what a run pays: it draws each figure once), best wall time and
    best CPU time of this process (what other jobs on a loaded machine disturb least)."""
    first = wall = cpu = float("inf")
    for i in range(repeat):
        start, start_cpu = time.perf_counter(), time.process_time()
        work()
        elapsed = time.perf_counter() - start
        first = elapsed if i == 0 else first
        wall = min(wall, elapsed)
        cpu = min(cpu, time.process_time() - start_cpu)
    return first, wall, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet50", help="a model, or several separated by commas")
    parser.add_argument("--config", type=Path, default=CONFIG)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--plots-module", type=Path, default=None, help="time this copy of plots.py instead")
    args = parser.parse_args()
    global plots
    if args.plots_module is not None:
        spec = importlib.util.spec_from_file_location("plots_under_test", args.plots_module)
        plots = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = plots  # (its dataclasses look their module up there)
        spec.loader.exec_module(plots)

    out = args.out or Path(tempfile.mkdtemp(prefix="bench_plots_"))
    per_layer = []
    for model in args.model.split(","):
        layers, total_cpu = _bench_model(model, args.config, args.repeat, out / model if "," in args.model else out)
        per_layer.append(f"{model} {total_cpu / layers * 1000:.2f} ms")
    if len(per_layer) > 1:
        print("three plots per layer (best CPU): " + ", ".join(per_layer))


def _bench_model(model: str, config_path: Path, repeat: int, out: Path) -> tuple[int, float]:
    """Time the three figures of ``model``; its layer count and the three plots' best CPU time."""
    options = pipeline.RunOptions(config=config_path, model=model, quantize=False)
    config, graph, _ = pipeline.prepare(options)
    _, sim, energy = pipeline.time_and_energy(graph, config)
    rows = run_report.layer_rows(sim, energy, None)

    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    plots.plot_latency_breakdown(rows[:3], out / "warmup.png")  # fonts, text layout, Agg: loaded once per process
    warmup = time.perf_counter() - start
    (out / "warmup.png").unlink()

    # The run's own figures (pipeline.run_figures), drawn by the module under test: a job's builder is that
    # module's ``<builder>_figure`` (a previous plots.py given by --plots-module has those too).
    figures = {name: (lambda name=name, job=job: plots.save_figure(
                   getattr(plots, f"{job.builder}_figure")(*job.args, **job.kwargs), out / name))
               for name, job in pipeline.run_figures(config, sim, energy).items()}
    print(f"{model}: {len(rows)} layers on {config.name}; best of {repeat}; "
          f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    print(f"  a 3-layer figure first (fonts and text machinery, once per process): {warmup * 1000:.0f} ms")
    totals = [0.0, 0.0, 0.0]
    print(f"  {'':24s} {'first':>10s} {'best wall':>10s} {'best CPU':>10s}")
    for name, work in figures.items():
        times = _times(repeat, work)
        totals = [a + b for a, b in zip(totals, times)]
        print(f"  {name:24s}" + "".join(f" {t * 1000:7.0f} ms" for t in times)
              + f"  {(out / name).stat().st_size / 1024:5.0f} KiB")
    print(f"  {'three plots':24s}" + "".join(f" {t * 1000:7.0f} ms" for t in totals))
    print(f"PNGs in {out}")
    return len(rows), totals[2]

if __name__ == "__main__":
    main()
