"""The default ``tpusim run`` on every real exported model the test suite carries.

    python3 benchmarks/real_models.py [--out results/real-models] [NAME ...]

Every file of ``tests/data/corpus/`` (torchvision models exported by ``torch.onnx.export``, both
exporters; seeded weights put back by ``tests/corpus.py``, dynamo exports re-saved with external
data as the exporter writes them), and the MLPerf Tiny models of ``../shared/mlperf_tiny`` converted
by tflite2onnx (real trained weights), go through the default command: ``tpusim run
configs/tpu_v1.yaml --model FILE`` (32 calibration samples, integer execution, fidelity on 4
held-out samples, timing, energy, the rescale twin, every report and plot), each in its own process.
Prints one markdown row per model: layers, GMACs, latency, TOPS, energy per inference, output SQNR
and top-1 agreement of int8 against FP32, and the command's wall time.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import corpus  # noqa: E402  (tests/corpus.py: the corpus and its weight filler)
import onnx  # noqa: E402


def _model_files(names: list[str], folder: Path) -> list[tuple[str, Path]]:
    files = []
    for entry in corpus.CORPUS:
        if names and entry.name not in names:
            continue
        path = folder / f"{entry.name}.onnx"
        model = corpus.load_model(entry.name)
        if entry.external_data:
            corpus.save_with_external_data(model, path)
        else:
            onnx.save(model, str(path))
        files.append((entry.name, path))
    source = corpus.mlperf_tiny_dir()
    for name in corpus.MLPERF_TINY_CONVERTIBLE:
        if (names and name not in names) or not (source / f"{name}.tflite").is_file():
            continue
        import tflite2onnx

        path = folder / f"{name}.onnx"
        tflite2onnx.convert(str(source / f"{name}.tflite"), str(path))
        files.append((f"{name} (MLPerf Tiny, tflite2onnx)", path))
    return files


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help="corpus entries or MLPerf Tiny names (default: all)")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "real-models")
    args = parser.parse_args()
    print("| model | layers | GMACs | latency (ms) | TOPS | energy / inference (mJ) | int8 output SQNR (dB) | top-1 vs FP32 | wall (s) |")
    print("|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for label, path in _model_files(args.names, Path(tmp)):
            out = args.out / path.stem
            start = time.perf_counter()
            done = subprocess.run([sys.executable, "-m", "tpusim", "run", str(ROOT / "configs" / "tpu_v1.yaml"),
                                   "--model", str(path), "--out", str(out), "--no-progress"],
                                  capture_output=True, text=True)
            wall = time.perf_counter() - start
            if done.returncode != 0:
                print(f"| {label} | failed: {done.stderr.strip().splitlines()[-1]} |||||||| {wall:.1f} |", flush=True)
                continue
            s = json.loads((out / "summary.json").read_text())
            layers = sum(1 for _ in open(out / "layers.csv")) - 1
            f = s["fidelity"]
            print(f"| {label} | {layers} | {s['macs'] / 1e9:.3f} | {s['latency_s'] * 1e3:.3f} | {s['tops']:.2f} | "
                  f"{s['energy']['total_pj'] / 1e9 / s['batch']:.3f} | {f['output_sqnr_db']:.1f} | "
                  f"{f['top1_agreement']:.0%} | {wall:.1f} |", flush=True)


if __name__ == "__main__":
    main()
