"""Throughput of the MXU kernels on one core.

    python3 benchmarks/bench_pe_kernel.py [--resnet50]

Prints PE-cycles/s of the cycle-stepped 256x256 array (PE-cycles = cycles x rows x cols; JIT
warmed first, best of three), the int8_gemm throughput in GOP/s (2 ops per MAC), and with
--resnet50 the time to run every ResNet-50 v1.5 conv/fc GEMM (batch 1, random int8 data)
through the PE-level array, values included.
"""
from __future__ import annotations

import argparse
import time
from typing import Callable

import numpy as np

from tpusim.kernels import int8_gemm, pe_gemm

ROWS = COLS = 256


def best_seconds(run: Callable[[], object], repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


def operands(rng: np.random.Generator, m: int, k: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    return rng.integers(-128, 128, (m, k)).astype(np.int8), rng.integers(-128, 128, (k, n)).astype(np.int8)


def resnet50_gemms() -> list[tuple[int, int, int]]:
    """(M, K, N) of every conv and the fc of ResNet-50 v1.5 at 224x224, batch 1."""
    shapes = [(112 * 112, 7 * 7 * 3, 64)]
    channels, size = 64, 56
    for stage, (blocks, width) in enumerate(zip((3, 4, 6, 3), (64, 128, 256, 512))):
        for block in range(blocks):
            stride = 2 if stage > 0 and block == 0 else 1
            out_size = size // stride
            shapes.append((size * size, channels, width))
            shapes.append((out_size * out_size, 9 * width, width))
            shapes.append((out_size * out_size, width, 4 * width))
            if block == 0:
                shapes.append((out_size * out_size, channels, 4 * width))
            channels, size = 4 * width, out_size
    shapes.append((1, 2048, 1000))
    return shapes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resnet50", action="store_true", help="also run all ResNet-50 GEMMs at PE level")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    pe_gemm(*operands(rng, 3, 5, 7), 4, 4)
    int8_gemm(*operands(rng, 3, 5, 7))

    print(f"PE-level stepped array, {ROWS}x{COLS}:")
    cases = [((2048, 1024, 512), "M >= R: every PE busy"), ((49, 4608, 512), "M < R: idle waves skipped")]
    for (m, k, n), note in cases:
        x, w = operands(rng, m, k, n)
        cycles = pe_gemm(x, w, ROWS, COLS).cycles
        seconds = best_seconds(lambda: pe_gemm(x, w, ROWS, COLS))
        print(f"  {m}x{k}x{n} ({note}): {cycles} cycles in {seconds * 1e3:.1f} ms"
              f" = {cycles * ROWS * COLS / seconds:.2e} PE-cycles/s, {m * k * n / seconds:.2e} MAC/s")

    print("int8_gemm (int32 accumulate):")
    for m, k, n in [(12544, 147, 64), (3136, 576, 64), (784, 1152, 128), (49, 4608, 512)]:
        x, w = operands(rng, m, k, n)
        seconds = best_seconds(lambda: int8_gemm(x, w), repeats=5)
        print(f"  {m}x{k}x{n}: {seconds * 1e3:.2f} ms = {2 * m * k * n / seconds / 1e9:.1f} GOP/s")

    if args.resnet50:
        shapes = resnet50_gemms()
        macs = sum(m * k * n for m, k, n in shapes)
        cycles, start = 0, time.perf_counter()
        for m, k, n in shapes:
            cycles += pe_gemm(*operands(rng, m, k, n), ROWS, COLS).cycles
        seconds = time.perf_counter() - start
        print(f"ResNet-50 at PE level: {len(shapes)} GEMMs, {macs:.3e} MACs, {cycles} array cycles"
              f" ({cycles * ROWS * COLS:.2e} PE-cycles) in {seconds:.1f} s")


if __name__ == "__main__":
    main()
