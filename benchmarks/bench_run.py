"""Wall time and peak memory of the whole ``tpusim run`` command, per model, and how they grow.

    python3 benchmarks/bench_run.py [--models bert_tiny,mobilenet_v2,resnet18,resnet50,bert_base]
                                    [--repeat 3] [--eval-samples N] [--samples-model resnet18] [--no-samples]

Every run is its own ``python3 -m tpusim run`` process, so its peak RSS (``wait4``'s ``ru_maxrss``) is
that run's alone, imports included, as a user pays them. The run's figure worker (a second process that
draws the plots, see ``tpusim.report.figure_worker``) is counted too, and so is the copy of itself it forks
to draw on both cores when the run does not quantize: their peaks (``VmHWM``, read every few milliseconds
while they live) are added to the run's, which is at least the peak of their sum (more: the copy's pages
are the worker's until either writes them). Each model first runs once untimed (the
built-in ONNX file generated, the JIT cache warm); the figures are the best of ``--repeat`` runs. The
table gives the default run (calibration, integer execution, fidelity, timing, energy, rescale twin,
reports and plots) and ``--no-quantize``, with seconds per GMAC of the model (its MACs at batch 1,
from the run's summary.json).

The last lines hold the samples fixed but one: peak RSS of ``--samples-model`` with 32 and 128
calibration samples (``--set quant.calibration_samples``), then with 32 and 128 evaluation samples
(``--eval-samples``). Peak memory must not grow with either.

On a machine other jobs load, wall times vary run to run; the best of several is the steadier figure.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "tpu_v1.yaml"
MODELS = "bert_tiny,mobilenet_v2,resnet18,resnet50,bert_base"


def _descendants(pid: int) -> set[int]:
    """The processes below ``pid``: its children, theirs, and so on (the figure worker, and the copy of itself
    it forks to draw on both cores)."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            pass
    found: set[int] = set()
    frontier = {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def _descendants_peaks(pid: int, peaks: dict[int, int], running: threading.Event) -> None:
    """While ``running`` is set: the peak RSS (kB) of each process below ``pid``, as last read (every 5 ms; the
    processes are looked for every 20 ms, a scan of /proc being the costly part)."""
    descendants: set[int] = set()
    polls = 0
    while running.is_set():
        if polls % 4 == 0:
            descendants |= _descendants(pid)
        for child in descendants:
            try:
                status = Path(f"/proc/{child}/status").read_text()
            except OSError:
                continue
            for line in status.splitlines():
                if line.startswith("VmHWM:"):
                    peaks[child] = max(peaks.get(child, 0), int(line.split()[1]))
        polls += 1
        time.sleep(0.005)


def run_once(model: str, out: Path, extra: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS in MiB of the run plus its figure worker and the worker's copy) of one ``tpusim
    run`` process."""
    command = [sys.executable, "-m", "tpusim", "run", str(CONFIG), "--model", model, "--out", str(out),
               "--no-progress", *extra]
    start = time.perf_counter()
    # cwd: ``-m`` then imports the tpusim of this checkout
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peaks: dict[int, int] = {}
    running = threading.Event()
    running.set()
    watcher = threading.Thread(target=_descendants_peaks, args=(process.pid, peaks, running), daemon=True)
    watcher.start()
    stderr = process.stderr.read()
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    running.clear()
    watcher.join()
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        sys.exit(f"bench_run: {' '.join(command)} failed ({process.returncode}):\n{stderr.decode()}")
    return wall, (usage.ru_maxrss + sum(peaks.values())) / 1024  # kilobytes on Linux


def best_of(repeat: int, model: str, out: Path, extra: list[str]) -> tuple[float, float]:
    """Fastest wall time and the largest peak RSS over ``repeat`` runs."""
    runs = [run_once(model, out, extra) for _ in range(repeat)]
    return min(wall for wall, _ in runs), max(rss for _, rss in runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=MODELS, help=f"comma-separated built-in workloads (default {MODELS})")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--eval-samples", type=int, default=None,
                        help="passed to every default run (default: the CLI's)")
    parser.add_argument("--samples-model", default="resnet18",
                        help="the model whose peak RSS is measured at 32 and 128 samples")
    parser.add_argument("--no-samples", action="store_true", help="skip the 32-vs-128-samples lines")
    args = parser.parse_args()
    eval_flag = [] if args.eval_samples is None else ["--eval-samples", str(args.eval_samples)]
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "run"
        print(f"{'model':<14} {'GMAC':>7} {'run s':>7} {'peak MiB':>9} {'s/GMAC':>7} {'--no-quantize s':>16} "
              f"{'peak MiB':>9}", flush=True)
        for model in args.models.split(","):
            run_once(model, out, eval_flag)  # warm: the ONNX file generated, the JIT cache loaded
            wall, rss = best_of(args.repeat, model, out, eval_flag)
            gmac = json.loads((out / "summary.json").read_text())["macs"] / 1e9
            plain_wall, plain_rss = best_of(args.repeat, model, out, ["--no-quantize"])
            print(f"{model:<14} {gmac:7.2f} {wall:7.2f} {rss:9.0f} {wall / gmac:7.2f} {plain_wall:16.2f} "
                  f"{plain_rss:9.0f}", flush=True)
        if args.no_samples:
            return
        model = args.samples_model
        for what, flags in (("calibration samples", lambda n: ["--set", f"quant.calibration_samples={n}", *eval_flag]),
                            ("evaluation samples", lambda n: ["--eval-samples", str(n)])):
            rss = {n: run_once(model, out, flags(n))[1] for n in (32, 128)}
            print(f"{model}, {what}: peak RSS {rss[32]:.0f} MiB at 32, {rss[128]:.0f} MiB at 128", flush=True)


if __name__ == "__main__":
    main()
