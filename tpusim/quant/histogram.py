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


class NonFiniteError(DataError):
    """A tensor to observe holds NaN or inf."""


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

    @classmethod
    def _made_here(cls, data_min: float, data_max: float, counts: np.ndarray, lo: float, hi: float,
                   count: int) -> "TensorStats":
        """Statistics this module computed from valid ones (a merge): valid by construction, so made without
        ``__post_init__``'s checks and copy, which cost more than the merge itself (BERT-base's calibration
        merges 8,339 pairs)."""
        counts.setflags(write=False)
        stats = object.__new__(cls)
        for name, value in (("min", float(data_min)), ("max", float(data_max)), ("counts", counts),
                            ("lo", float(lo)), ("hi", float(hi)), ("count", int(count))):
            object.__setattr__(stats, name, value)
        return stats

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


def _stats(data_min: float, data_max: float, counts: np.ndarray, level: int, first_bin: int, name: str,
           merged_count: int | None = None) -> TensorStats:
    """Statistics on the window (``level``, ``first_bin``); ``merged_count``: the total of two valid ones
    merged, which need no checks."""
    lo = math.ldexp(float(first_bin), level)
    hi = math.ldexp(float(first_bin + counts.size), level)
    if not math.isfinite(hi):
        raise DataError(f"{name}: values too large to histogram (max {data_max})")
    if merged_count is not None:
        return TensorStats._made_here(data_min, data_max, counts, lo, hi, merged_count)
    return TensorStats(data_min, data_max, counts, lo, hi, int(counts.sum()))


# --------------------------------------------------------------------------------------- kernels
#
# Each kernel is a single typed pass with a numpy oracle beside it (``*_reference``) that the tests
# compare it with. observe makes two passes over a tensor: the extremes (which fix the window), then
# the counts. Both are bound by the machine, not by Python: the extremes by memory bandwidth, the
# counts by one load and one store per value. observe_merged knows its window beforehand (the running
# statistics'), so one pass finds the extremes while it bins.

# Bit patterns of IEEE floats as signed integers (``int_type``), for each float width: flipping the
# ``magnitude`` bits of the negative ones gives keys that order like the floats themselves (with -0.0 just
# below +0.0), and a value is NaN or inf exactly when all its ``exponent`` bits are set.
_FLOAT_BITS = {
    np.dtype(np.float32): (np.int32, np.int32(0x7FFFFFFF), np.int32(0x7F800000)),
    np.dtype(np.float64): (np.int64, np.int64(0x7FFFFFFFFFFFFFFF), np.int64(0x7FF0000000000000)),
}


@njit(inline="always")
def _ordered_key(b, int_type, magnitude):
    """The key of bit pattern ``b``, in ``b``'s own width: numba widens int32 arithmetic to int64, which
    would halve the keys a vector instruction holds."""
    return int_type(b ^ magnitude) if b < 0 else b


@njit(cache=True, nogil=True)
def _ordered_extremes(bits, int_type, magnitude, exponent):
    """(all finite, lowest key, highest key) of float bit patterns (int32 or int64) in one pass.

    Integer minimum and maximum vectorise where float ones do not (a float comparison must mind NaN);
    the keys order as the floats do."""
    lo = _ordered_key(bits[0], int_type, magnitude)
    hi = lo
    special = False
    for i in range(bits.size):
        b = bits[i]
        key = _ordered_key(b, int_type, magnitude)
        lo = min(lo, key)
        hi = max(hi, key)
        special |= (b & exponent) == exponent
    return not special, lo, hi


def extremes_reference(x: np.ndarray) -> tuple[bool, float, float]:
    """Numpy oracle of :func:`_extremes`: (all finite, min, max) with the first zero's sign for a zero extreme."""
    x = np.asarray(x).reshape(-1)
    if not np.all(np.isfinite(x)):
        return False, 0.0, 0.0
    lo, hi = float(x.min()), float(x.max())
    if lo == 0.0 or hi == 0.0:
        zero = float(x[np.flatnonzero(x == 0)[0]])
        lo, hi = (zero if lo == 0.0 else lo), (zero if hi == 0.0 else hi)
    return True, lo, hi


@njit(cache=True, nogil=True)
def _first_zero(x):
    """Index of the first element equal to 0 (either sign); -1 if none."""
    for i in range(x.size):
        if x[i] == 0.0:
            return i
    return -1


def _extremes(flat: np.ndarray) -> tuple[bool, float, float]:
    """(all finite, min, max) of a non-empty contiguous float32/float64 vector: ``min`` is the first value
    equal to the minimum, ``max`` the first equal to the maximum, so a zero extreme has the sign of the
    tensor's first zero (what a scan that keeps the first of equal values gives)."""
    int_type, magnitude, exponent = _FLOAT_BITS[flat.dtype]
    finite, lo, hi = _ordered_extremes(flat.view(int_type), int_type, magnitude, exponent)
    if not finite:
        return False, 0.0, 0.0
    return (True, *_decoded_extremes(flat, lo, hi))


def _decoded_extremes(flat: np.ndarray, lo_key: int, hi_key: int) -> tuple[float, float]:
    """(min, max) of ``flat`` from its lowest and highest ordered keys, a zero extreme with the sign of its
    first zero."""
    int_type, magnitude, _ = _FLOAT_BITS[flat.dtype]
    keys = np.array([lo_key, hi_key], dtype=int_type)
    data_min, data_max = (float(v) for v in np.where(keys < 0, keys ^ magnitude, keys).view(flat.dtype))
    if data_min == 0.0 or data_max == 0.0:  # -0.0 orders below +0.0 as a key; as a value it is equal
        zero = float(flat[_first_zero(flat)])
        data_min, data_max = (zero if data_min == 0.0 else data_min), (zero if data_max == 0.0 else data_max)
    return data_min, data_max


_CHUNK = 1024  # values whose bins are found together (a vectorised loop) before they are counted
_WAYS = 4  # interleaved copies of the counts: a run of values in one bin updates four counters in turn
_SPREAD = 8  # slots per copy that share the count of the bin of 0 (ReLU outputs put half their values there)
_FLOAT32_INTEGERS = 2**24  # float32 holds every integer up to this


@njit(inline="always")
def _slot(v, i, grid, first_bin, bins):
    """(bin of ``v`` in the window from global bin ``first_bin``, the slot of ``ways`` the value is counted in).

    The bin is unsigned and at least ``bins`` for a value outside, NaN included (``max(below, NaN)`` is
    ``below``, clamped to just outside before the integer conversion); a value below 0 is in bin -1 however
    small. Value ``i`` of a chunk counts the bin of 0 in spread slot ``i % _SPREAD``. ``grid`` is
    :func:`_grid`'s, all of one float type (a literal would widen float32 arithmetic to float64)."""
    inv_width, origin, below, above = grid
    g = np.floor(v * inv_width)
    g = below - origin if (g == 0.0) & (v < 0.0) else g  # -1 for a tiny negative whose scaled value rounds to -0.0
    j = np.uint32(np.int32(min(max(below, g), above) - origin))  # -1 wraps: outside
    return j, (np.uint32(bins) + np.uint32(i % _SPREAD)) if j == np.uint32(-first_bin) else j


def _grid(dtype: np.dtype, level: int, first_bin: int, bins: int) -> tuple:
    """What the binning kernels scale and clamp with: (1 / bin width, the window's first global bin, one bin
    below it, one bin past its end), in float32 for float32 data where that is exact, else in float64.

    Exact in float32 when the width is a power of two whose inverse is a normal float32 and the bins
    around the window are integers float32 holds (up to 2**24): then ``v * inv_width`` is exact except where
    it is subnormal, where its floor is 0 or -1 either way (-0.0 is caught as for float64), and an overflow
    to inf lands outside the window, as the exact value does. The float32 pass handles twice the values
    per vector instruction of the float64 one, which widens each value first."""
    window_ends = max(abs(first_bin - 1), abs(first_bin + bins))
    if dtype == np.float32 and -126 <= -level <= 127 and window_ends <= _FLOAT32_INTEGERS:
        kind = np.float32
    else:
        kind = np.float64
    return (kind(math.ldexp(1.0, -level)), kind(first_bin), kind(first_bin - 1), kind(first_bin + bins))


@njit(inline="always")
def _summed_ways(ways, first_bin, bins):
    """The counts: the ``_WAYS`` copies added, with the bin of 0's spread slots."""
    stride = bins + _SPREAD
    zero_bin = -first_bin
    counts = np.zeros(bins, dtype=np.int64)
    for w in range(_WAYS):
        for j in range(bins):
            counts[j] += ways[w * stride + j]
        if 0 <= zero_bin < bins:  # (else 0 is outside the window, and the spread slots are empty)
            for k in range(_SPREAD):
                counts[zero_bin] += ways[w * stride + bins + k]
    return counts


@njit(cache=True, nogil=True)
def _bin_counts(x, grid, first_bin, bins):
    """Counts of ``floor(x * inv_width) - first_bin`` over [0, bins), a value below 0 in bin -1 however
    small; ok=False (and the counts so far) if any value falls outside.

    Per chunk: the bins of all its values (vectorised, with a check that each is inside), then one
    increment per value. Indices are unsigned (no negative-index wrap-around code), and the increments
    alternate between ``_WAYS`` copies of the counts, with the bin of 0 spread over ``_SPREAD`` slots in
    each, so that runs of equal values do not wait on their own previous increment."""
    stride = bins + _SPREAD
    ways = np.zeros(_WAYS * stride, dtype=np.int64)
    index = np.empty(_CHUNK, dtype=np.uint32)
    for start in range(0, x.size, _CHUNK):
        chunk = x[start : start + _CHUNK]
        outside = False
        for i in range(chunk.size):
            j, index[i] = _slot(chunk[i], i, grid, first_bin, bins)
            outside |= j >= np.uint32(bins)
        if outside:
            return False, ways[:bins].copy()
        whole = chunk.size - chunk.size % _WAYS
        for i in range(0, whole, _WAYS):
            for w in range(_WAYS):
                ways[np.uint64(w * stride) + np.uint64(index[np.uint64(i + w)])] += 1
        for i in range(whole, chunk.size):
            ways[np.uint64(index[np.uint64(i)])] += 1
    return True, _summed_ways(ways, first_bin, bins)


def bin_counts_reference(x: np.ndarray, level: int, first_bin: int, bins: int) -> np.ndarray:
    """Numpy oracle of the binning kernel."""
    scaled = np.ldexp(np.asarray(x, dtype=np.float64), -level)
    g = np.floor(scaled)
    g[(x < 0) & (g >= 0)] = -1
    return np.bincount((g - first_bin).astype(np.int64), minlength=bins).astype(np.int64)


@njit(cache=True, nogil=True)
def _bin_counts_and_extremes(x, bits, int_type, magnitude, grid, first_bin, bins):
    """:func:`_bin_counts` on a window known beforehand, finding in the same pass what :func:`_ordered_extremes`
    finds: (all inside, lowest key, highest key, counts) of ``x`` and its bit patterns ``bits``.

    The key minimum and maximum join the vectorised loop that finds the bins. A value outside, NaN or inf
    among them, stops the pass with inside=False, and keys and counts of the values before it. Inside
    implies finite, so there is no separate check for NaN and inf."""
    stride = bins + _SPREAD
    ways = np.zeros(_WAYS * stride, dtype=np.int64)
    index = np.empty(_CHUNK, dtype=np.uint32)
    lo = _ordered_key(bits[0], int_type, magnitude)
    hi = lo
    for start in range(0, x.size, _CHUNK):
        chunk = x[start : start + _CHUNK]
        chunk_bits = bits[start : start + _CHUNK]
        outside = False
        for i in range(chunk.size):
            key = _ordered_key(chunk_bits[i], int_type, magnitude)
            lo = min(lo, key)
            hi = max(hi, key)
            j, index[i] = _slot(chunk[i], i, grid, first_bin, bins)
            outside |= j >= np.uint32(bins)
        if outside:
            return False, lo, hi, ways[:bins].copy()
        # (_bin_counts' counting loop: as a shared inline function it took both kernels 2-4 % longer)
        whole = chunk.size - chunk.size % _WAYS
        for i in range(0, whole, _WAYS):
            for w in range(_WAYS):
                ways[np.uint64(w * stride) + np.uint64(index[np.uint64(i + w)])] += 1
        for i in range(whole, chunk.size):
            ways[np.uint64(index[np.uint64(i)])] += 1
    return True, lo, hi, _summed_ways(ways, first_bin, bins)


def bin_counts_and_extremes_reference(x: np.ndarray, level: int, first_bin: int,
                                      bins: int) -> tuple[bool, int, int, np.ndarray]:
    """Numpy oracle of :func:`_bin_counts_and_extremes` (keys and counts meaningful only when inside)."""
    x = np.asarray(x)
    int_type, magnitude, _ = _FLOAT_BITS[x.dtype]
    bits = x.view(int_type).astype(np.int64)
    keys = bits ^ ((bits >> (8 * x.itemsize - 1)) & int(magnitude))
    inside = bool(np.all(np.isfinite(x))) and all(
        first_bin <= grid_index(float(v), level) < first_bin + bins for v in (x.min(), x.max()))
    counts = bin_counts_reference(x, level, first_bin, bins) if inside else np.zeros(bins, dtype=np.int64)
    return inside, int(keys.min()), int(keys.max()), counts


@njit(cache=True, nogil=True)
def _coarsened(counts, first_bin, shift, new_first_bin):
    """``counts`` (global bins from ``first_bin``) moved to bins ``2**shift`` times wider starting at
    global bin ``new_first_bin``: ok=False if an occupied bin falls outside the window."""
    out = np.zeros(counts.size, dtype=np.int64)
    shift = min(shift, 63)  # beyond 63 a shift gives the same 0 or -1, and a wider one is undefined
    for i in range(counts.size):
        c = counts[i]
        if c != 0:
            t = ((first_bin + i) >> shift) - new_first_bin
            if t < 0 or t >= out.size:
                return False, out
            out[t] += c
    return True, out


def rebin_reference(counts: np.ndarray, first_bin: int, shift: int, new_first_bin: int) -> np.ndarray:
    """Numpy oracle of :func:`_coarsened` (for windows that cover the occupied bins)."""
    global_bins = np.arange(first_bin, first_bin + counts.size, dtype=np.int64)
    target = (global_bins >> shift) - new_first_bin
    occupied = counts > 0
    out = np.zeros(counts.size, dtype=np.int64)
    np.add.at(out, target[occupied], counts[occupied])
    return out


def _flat_floats(x: np.ndarray, name: str) -> np.ndarray:
    """``x`` as a contiguous float32 or float64 vector (other types as float64); empty raises naming ``name``."""
    x = np.asarray(x)
    if x.size == 0:
        raise DataError(f"{name}: empty tensor")
    if x.dtype not in (np.float32, np.float64):
        x = x.astype(np.float64)
    return np.ascontiguousarray(x).reshape(-1)


def observe(x: np.ndarray, bins: int = DEFAULT_BINS, *, name: str = "tensor") -> TensorStats:
    """Statistics of one batch of a tensor. NaN or inf raise :class:`DataError` naming ``name``."""
    if bins < 2:
        raise ValueError(f"bins must be at least 2, got {bins}")
    flat = _flat_floats(x, name)
    finite, data_min, data_max = _extremes(flat)
    if not finite:
        raise NonFiniteError(f"{name}: tensor contains NaN or inf")
    level, first_bin = _window(data_min, data_max, bins, _MIN_LEVEL)
    inside, counts = _bin_counts(flat, _grid(flat.dtype, level, first_bin, bins), first_bin, bins)
    if not inside:
        raise AssertionError("histogram window does not cover the data")
    return _stats(data_min, data_max, counts, level, first_bin, name)


def _rebin(stats: TensorStats, level: int, first_bin: int) -> np.ndarray:
    """Counts of ``stats`` moved to a coarser-or-equal level and a covering window."""
    if level == stats.level and first_bin == stats.first_bin:
        return stats.counts  # already on that window (the running total, once the ranges settle)
    inside, counts = _coarsened(stats.counts, stats.first_bin, level - stats.level, first_bin)
    if not inside:
        raise AssertionError("merged histogram window does not cover an operand")
    return counts


def merge(a: TensorStats, b: TensorStats) -> TensorStats:
    """Statistics of the union of the data behind ``a`` and ``b`` (exact; see module docstring)."""
    if a.bins != b.bins:
        raise ValueError(f"cannot merge histograms of {a.bins} and {b.bins} bins")
    data_min, data_max = min(a.min, b.min), max(a.max, b.max)
    level, first_bin = _window(data_min, data_max, a.bins, max(a.level, b.level))
    counts = _rebin(a, level, first_bin) + _rebin(b, level, first_bin)
    return _stats(data_min, data_max, counts, level, first_bin, "merged tensor", merged_count=a.count + b.count)


def observe_merged(running: TensorStats, x: np.ndarray, *, name: str = "tensor") -> TensorStats:
    """``merge(running, observe(x, running.bins, name=name))``, bit for bit, in one pass over ``x`` when its
    values fall in ``running``'s window, as nearly every batch's do once the ranges settle.

    The merge then keeps that window: ``x``'s own level is no coarser (the window covers ``x`` and 0), so
    the merged level is ``running``'s, and coarsening ``x``'s counts to it equals binning ``x`` there
    (``floor(floor(v / w) / 2**k) == floor(v / (w * 2**k))``). Anything else (a value outside, NaN or inf,
    a window of ``running`` looser than a merge would choose) takes the merge, with its errors."""
    flat = _flat_floats(x, name)
    level, first_bin, bins = running.level, running.first_bin, running.bins
    int_type, magnitude, _ = _FLOAT_BITS[flat.dtype]
    inside, lo_key, hi_key, counts = _bin_counts_and_extremes(
        flat, flat.view(int_type), int_type, magnitude, _grid(flat.dtype, level, first_bin, bins), first_bin, bins)
    if inside:  # then observe(x) would not fail either: its window is no wider than running's
        x_min, x_max = _decoded_extremes(flat, lo_key, hi_key)
        data_min, data_max = min(running.min, x_min), max(running.max, x_max)
        if grid_index(min(data_min, 0.0), level) == first_bin:
            return _stats(data_min, data_max, running.counts + counts, level, first_bin, name,
                          merged_count=running.count + flat.size)
    return merge(running, observe(flat, bins, name=name))
