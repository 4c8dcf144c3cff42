"""Tensor statistics for calibration: exact min/max/count and a mergeable histogram.

Every histogram lives on a global power-of-two grid: its bins are ``[g * w, (g + 1) * w)`` for
consecutive integers ``g``, with bin width ``w = 2**level``. Bin ``g`` of a value ``x`` is
``floor(x / w)``, which is exact in floating point (scaling by a power of two), and 0 is always
a bin edge. Doubling the width maps bin ``g`` to ``g // 2``, so coarsening sums pairs of bins and
never splits a count.

``observe`` picks the finest level whose window of ``bins`` bins covers the data and 0, starting
the window at the bin of ``min(data, 0)``. ``merge`` coarsens both operands to the finest level
that covers the union. Because the covering level is monotone in the data's extent, merging the
statistics of batches gives exactly the histogram ``observe`` gives for the concatenated data:
the same level, the same window and the same counts.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numba import njit

from tpusim.errors import DataError

DEFAULT_BINS = 2048
# Finest bin width 2**-1000: keeps 1 / width finite; only an all-zero tensor sits there.
_MIN_LEVEL = -1000


@dataclass(frozen=True, eq=False)
class TensorStats:
    """Statistics of the values of one tensor over all observed batches.

    ``min``/``max`` are the exact extremes of the data; ``counts[i]`` counts the values in
    ``[lo + i * w, lo + (i + 1) * w)`` with ``w = (hi - lo) / len(counts)`` a power of two and
    ``lo <= min(min, 0) <= max(max, 0) < hi``.
    """

    min: float
    max: float
    counts: np.ndarray
    lo: float
    hi: float
    count: int

    def __post_init__(self) -> None:
        counts = np.array(self.counts, dtype=np.int64)
        if counts.ndim != 1 or counts.size < 2:
            raise ValueError("counts must be a 1-d array of at least 2 bins")
        width = (self.hi - self.lo) / counts.size
        mantissa, _ = math.frexp(width)
        if mantissa != 0.5 or self.lo / width != math.floor(self.lo / width):
            raise ValueError(f"histogram range [{self.lo}, {self.hi}) is not on a power-of-two grid")
        if not self.lo <= min(self.min, 0.0) <= max(self.max, 0.0) < self.hi:
            raise ValueError(f"histogram range [{self.lo}, {self.hi}) does not cover [{self.min}, {self.max}] and 0")
        if np.any(counts < 0) or int(counts.sum()) != self.count or self.count < 1:
            raise ValueError("counts must be non-negative and sum to a positive count")
        counts.setflags(write=False)
        object.__setattr__(self, "counts", counts)
        object.__setattr__(self, "count", int(self.count))
        object.__setattr__(self, "min", float(self.min))
        object.__setattr__(self, "max", float(self.max))
        object.__setattr__(self, "lo", float(self.lo))
        object.__setattr__(self, "hi", float(self.hi))

    @property
    def bins(self) -> int:
        return int(self.counts.size)

    @property
    def bin_width(self) -> float:
        return (self.hi - self.lo) / self.bins

    @property
    def level(self) -> int:
        """``log2(bin_width)``."""
        return math.frexp(self.bin_width)[1] - 1

    @property
    def first_bin(self) -> int:
        """Global grid index of ``counts[0]``; ``-first_bin`` is the bin starting at 0."""
        return int(self.lo / self.bin_width)

    @property
    def edges(self) -> np.ndarray:
        return self.lo + self.bin_width * np.arange(self.bins + 1, dtype=np.float64)


def grid_index(x: float, level: int) -> int:
    """``floor(x / 2**level)``, including for negatives whose scaled value underflows to -0."""
    index = math.floor(math.ldexp(x, -level))
    return -1 if x < 0 and index >= 0 else index


def _covering_level(lo: float, hi: float, bins: int, at_least: int) -> int:
    """Finest level >= ``at_least`` whose ``bins``-bin window covers ``[lo, hi]`` (lo <= 0 <= hi)."""

    def covers(level: int) -> bool:
        return grid_index(hi, level) - grid_index(lo, level) < bins

    span = hi - lo
    level = max(at_least, math.frexp(span / bins)[1] - 1 if span > 0 else _MIN_LEVEL)
    while not covers(level):
        level += 1
    while level > at_least and covers(level - 1):
        level -= 1
    return level


def _window(data_min: float, data_max: float, bins: int, at_least: int) -> tuple[int, int]:
    """(level, first global bin) of the histogram window for data in [data_min, data_max]."""
    lo, hi = min(data_min, 0.0), max(data_max, 0.0)
    level = _covering_level(lo, hi, bins, at_least)
    return level, grid_index(lo, level)


def _stats(data_min: float, data_max: float, counts: np.ndarray, level: int, first_bin: int, name: str) -> TensorStats:
    lo = math.ldexp(float(first_bin), level)
    hi = math.ldexp(float(first_bin + counts.size), level)
    if not math.isfinite(hi):
        raise DataError(f"{name}: values too large to histogram (max {data_max})")
    return TensorStats(data_min, data_max, counts, lo, hi, int(counts.sum()))


@njit(cache=True)
def _finite_min_max(x):
    """(all finite, min, max) of a non-empty 1-d float array in one pass."""
    lo = x[0]
    hi = x[0]
    for i in range(x.size):
        v = x[i]
        if not np.isfinite(v):
            return False, lo, hi
        if v < lo:
            lo = v
        elif v > hi:
            hi = v
    return True, lo, hi


@njit(cache=True)
def _bin_counts(x, inv_width, first_bin, bins):
    """Counts of ``floor(x * inv_width) - first_bin`` over [0, bins); ok=False if any falls outside."""
    counts = np.zeros(bins, dtype=np.int64)
    for i in range(x.size):
        v = x[i]
        g = np.floor(v * inv_width)
        # Tested in this order so that the branch is predictable (a random-sign test is not).
        if g == 0.0 and v < 0.0:
            g = -1.0
        j = np.int64(g) - first_bin
        if j < 0 or j >= bins:
            return False, counts
        counts[j] += 1
    return True, counts


def bin_counts_reference(x: np.ndarray, level: int, first_bin: int, bins: int) -> np.ndarray:
    """Numpy oracle of the binning kernel."""
    scaled = np.ldexp(np.asarray(x, dtype=np.float64), -level)
    g = np.floor(scaled)
    g[(x < 0) & (g >= 0)] = -1
    return np.bincount((g - first_bin).astype(np.int64), minlength=bins).astype(np.int64)


def observe(x: np.ndarray, bins: int = DEFAULT_BINS, *, name: str = "tensor") -> TensorStats:
    """Statistics of one batch of a tensor. NaN or inf raise :class:`DataError` naming ``name``."""
    if bins < 2:
        raise ValueError(f"bins must be at least 2, got {bins}")
    x = np.asarray(x)
    if x.size == 0:
        raise DataError(f"{name}: empty tensor")
    if x.dtype not in (np.float32, np.float64):
        x = x.astype(np.float64)
    flat = np.ascontiguousarray(x).reshape(-1)
    finite, data_min, data_max = _finite_min_max(flat)
    if not finite:
        raise DataError(f"{name}: tensor contains NaN or inf")
    data_min, data_max = float(data_min), float(data_max)
    level, first_bin = _window(data_min, data_max, bins, _MIN_LEVEL)
    inside, counts = _bin_counts(flat, math.ldexp(1.0, -level), first_bin, bins)
    if not inside:
        raise AssertionError("histogram window does not cover the data")
    return _stats(data_min, data_max, counts, level, first_bin, name)


def _rebin(stats: TensorStats, level: int, first_bin: int) -> np.ndarray:
    """Counts of ``stats`` moved to a coarser-or-equal level and a covering window."""
    coarsen = level - stats.level
    global_bins = np.arange(stats.first_bin, stats.first_bin + stats.bins, dtype=np.int64)
    target = (global_bins >> coarsen) - first_bin
    occupied = stats.counts > 0
    if np.any(target[occupied] < 0) or np.any(target[occupied] >= stats.bins):
        raise AssertionError("merged histogram window does not cover an operand")
    counts = np.zeros(stats.bins, dtype=np.int64)
    np.add.at(counts, target[occupied], stats.counts[occupied])
    return counts


def merge(a: TensorStats, b: TensorStats) -> TensorStats:
    """Statistics of the union of the data behind ``a`` and ``b`` (exact; see module docstring)."""
    if a.bins != b.bins:
        raise ValueError(f"cannot merge histograms of {a.bins} and {b.bins} bins")
    data_min, data_max = min(a.min, b.min), max(a.max, b.max)
    level, first_bin = _window(data_min, data_max, a.bins, max(a.level, b.level))
    counts = _rebin(a, level, first_bin) + _rebin(b, level, first_bin)
    return _stats(data_min, data_max, counts, level, first_bin, "merged tensor")
