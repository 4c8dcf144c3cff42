"""Clipping ranges from tensor statistics (white paper sec. 3.1): min-max, percentile, entropy, MSE.

Every function is pure: ``(TensorStats, target) -> (lo, hi)``. The target is the integer grid the
range will be quantized to: ``symmetric=True`` means [-(2**(b-1) - 1), 2**(b-1) - 1] with zero
point 0 and the result is ``(-t, t)``; ``symmetric=False`` means [0, 2**b - 1] with an integer
zero point and the result always contains 0.

Within a histogram bin, values are modelled as uniformly spread over the part of the bin that
lies inside the observed [min, max] (the first and last occupied bins are cut at the exact
extremes), so a range never exceeds the data and interpolated quantiles are continuous.
"""
from __future__ import annotations

from typing import Literal

import numpy as np
from numba import njit

from tpusim.quant.arithmetic import asymmetric_grid, integer_range, symmetric_scale
from tpusim.quant.histogram import TensorStats

RangeMethod = Literal["minmax", "percentile", "entropy", "mse"]

# Mass given to an empty candidate bin that must hold clipped outliers, in counts (as MXNet /
# ONNX Runtime smooth their KL candidates); small enough that such a candidate is never chosen
# over one that represents its outliers.
_KL_SMOOTHING_COUNTS = 1e-4
_MAX_COORDINATE_SWEEPS = 16


def _symmetric(t: float) -> tuple[float, float]:
    return 0.0 - t, t


def _containing_zero(lo: float, hi: float) -> tuple[float, float]:
    return min(lo, 0.0), max(hi, 0.0)


def _amax(stats: TensorStats) -> float:
    return max(abs(stats.min), abs(stats.max))


def _signed_bins(stats: TensorStats) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(lower bound, upper bound, count) of each occupied bin, cut at the data extremes."""
    occupied = np.flatnonzero(stats.counts)
    edges = stats.edges
    lower = np.maximum(edges[occupied], stats.min)
    upper = np.minimum(edges[occupied + 1], stats.max)
    return lower, upper, stats.counts[occupied]


def magnitude_histogram(stats: TensorStats) -> np.ndarray:
    """Counts of ``|x|`` in bins of width w, exact because 0 is a bin edge.

    Bin m holds positives in ``[m * w, (m + 1) * w)`` and negatives with ``|x|`` in
    ``(m * w, (m + 1) * w]`` (so a negative exactly on an edge lands one bin lower than its
    positive twin). Trailing empty bins are dropped: the last bin holds the largest magnitude.
    """
    zero_bin = -stats.first_bin
    positive = stats.counts[zero_bin:]
    negative = stats.counts[:zero_bin][::-1]
    magnitude = np.zeros(max(positive.size, negative.size), dtype=np.int64)
    magnitude[: positive.size] += positive
    magnitude[: negative.size] += negative
    return magnitude[: np.flatnonzero(magnitude)[-1] + 1]


def magnitude_without_zero_spike(magnitude: np.ndarray) -> np.ndarray:
    """The magnitude histogram with bin 0 capped at the count of bin 1 (float64, for the KL)."""
    smoothed = magnitude.astype(np.float64)
    if smoothed.size > 1:
        smoothed[0] = min(smoothed[0], smoothed[1])
    return smoothed


def _magnitude_bins(stats: TensorStats) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    magnitude = magnitude_histogram(stats)
    occupied = np.flatnonzero(magnitude)
    lower = occupied * stats.bin_width
    upper = np.minimum((occupied + 1) * stats.bin_width, _amax(stats))
    return lower, upper, magnitude[occupied]


def _quantile(lower: np.ndarray, upper: np.ndarray, counts: np.ndarray, fraction: float) -> float:
    """Value below which ``fraction`` of the mass lies, interpolating inside a bin."""
    cumulative = np.cumsum(counts)
    target = fraction * float(cumulative[-1])
    j = min(int(np.searchsorted(cumulative, target, side="left")), counts.size - 1)
    before = float(cumulative[j] - counts[j])
    inside = min(max((target - before) / float(counts[j]), 0.0), 1.0)
    return float(lower[j] + inside * (upper[j] - lower[j]))


def minmax_range(stats: TensorStats, symmetric: bool) -> tuple[float, float]:
    """The full observed range (no clipping error)."""
    if symmetric:
        return _symmetric(_amax(stats))
    return _containing_zero(stats.min, stats.max)


def percentile_range(stats: TensorStats, symmetric: bool, percentile: float = 99.99) -> tuple[float, float]:
    """Range holding ``percentile`` % of the values.

    Symmetric: the ``percentile`` quantile of ``|x|``. Asymmetric: ``(100 - percentile) / 2`` %
    is cut from each tail (as ONNX Runtime does), then the range is widened to contain 0.
    """
    if not 0.0 < percentile <= 100.0:
        raise ValueError(f"percentile must be in (0, 100], got {percentile}")
    if symmetric:
        return _symmetric(_quantile(*_magnitude_bins(stats), percentile / 100.0))
    tail = (100.0 - percentile) / 200.0
    lower, upper, counts = _signed_bins(stats)
    return _containing_zero(_quantile(lower, upper, counts, tail), _quantile(lower, upper, counts, 1.0 - tail))


@njit(cache=True)
def _kl_divergences(hist, start_bin, levels):
    """KL(P_i || Q_i) for each candidate threshold of ``i`` bins, i = start_bin .. hist.size.

    P_i is hist[:i] with all the mass beyond bin i - 1 added to bin i - 1; Q_i quantizes hist[:i]
    into ``levels`` equal groups of bins and spreads each group's mass evenly over the bins where
    P_i is non-zero. A bin where P_i > 0 but Q_i = 0 gets a tiny smoothing mass.
    """
    n = hist.size
    total = 0.0
    for j in range(n):
        total += hist[j]
    divergences = np.empty(n - start_bin + 1)
    group_mass = np.zeros(levels)
    group_support = np.zeros(levels, dtype=np.int64)
    for i in range(start_bin, n + 1):
        group_mass[:] = 0.0
        group_support[:] = 0
        inside = 0.0
        for j in range(i):
            inside += hist[j]
        outliers = total - inside
        for j in range(i):
            group = (j * levels) // i
            group_mass[group] += hist[j]
            if hist[j] > 0 or (j == i - 1 and outliers > 0):
                group_support[group] += 1
        if inside == 0.0:
            divergences[i - start_bin] = np.inf
            continue
        last_group = ((i - 1) * levels) // i
        q_total = inside
        if outliers > 0 and group_mass[last_group] == 0.0:
            q_total += _KL_SMOOTHING_COUNTS
        divergence = 0.0
        for j in range(i):
            p = hist[j]
            if j == i - 1:
                p += outliers
            if p == 0:
                continue
            group = (j * levels) // i
            q = group_mass[group] / group_support[group]
            if q == 0.0:
                q = _KL_SMOOTHING_COUNTS
            divergence += (p / total) * np.log((p / total) / (q / q_total))
        divergences[i - start_bin] = divergence
    return divergences


def kl_divergences_reference(hist: np.ndarray, start_bin: int, levels: int) -> np.ndarray:
    """Numpy oracle of the KL kernel, one candidate at a time."""
    hist = np.asarray(hist, dtype=np.float64)
    total = hist.sum()
    result = []
    for i in range(start_bin, hist.size + 1):
        reference = hist[:i].copy()
        reference[-1] += hist[i:].sum()
        if hist[:i].sum() == 0:
            result.append(np.inf)
            continue
        groups = np.arange(i) * levels // i
        mass = np.bincount(groups, weights=hist[:i], minlength=levels)
        support = np.bincount(groups, weights=(reference > 0).astype(np.float64), minlength=levels)
        candidate = np.where(reference > 0, mass[groups] / np.maximum(support[groups], 1), 0.0)
        smoothed = (reference > 0) & (candidate == 0)
        candidate[smoothed] = _KL_SMOOTHING_COUNTS
        p = reference[reference > 0] / total
        q = candidate[reference > 0] / candidate.sum()
        result.append(float(np.sum(p * np.log(p / q))))
    return np.array(result)


def entropy_range(
    stats: TensorStats, symmetric: bool, num_bits: int = 8, start_bin: int = 128
) -> tuple[float, float]:
    """Threshold minimising KL(data || quantized data) over the magnitude histogram (TensorRT).

    Candidates are the bin edges from ``start_bin`` upward. The magnitude is quantized into
    2**(b-1) levels for a symmetric grid or for two-sided data on an asymmetric grid (whose
    levels are shared by both signs), and 2**b levels for one-sided data on an asymmetric grid.
    Asymmetric two-sided data is clipped at ``-t`` and ``t``; a finer search over the two
    thresholds separately is what :func:`mse_range` does.

    Bin 0 is capped at the count of bin 1 (NVIDIA pytorch-quantization sets it to bin 1's count).
    A ReLU output puts its exact zeros there, often more than half the tensor. Zero is exact on
    every grid, but left in, that spike dominates the KL: each candidate spreads it over the
    ``i / levels`` bins of the first group, a cost growing with ``i`` that pulls the threshold down
    to ~2 sigma or below. Other spikes (a constant image background, ReLU6 saturation) still
    mislead the KL, as they do in TensorRT.
    """
    magnitude = magnitude_without_zero_spike(magnitude_histogram(stats))
    amax = _amax(stats)
    one_sided = stats.min >= 0.0 or stats.max <= 0.0
    levels = 1 << (num_bits if one_sided and not symmetric else num_bits - 1)
    if magnitude.size <= start_bin:
        threshold = amax
    else:
        divergences = _kl_divergences(magnitude, start_bin, levels)
        threshold = min((start_bin + int(np.argmin(divergences))) * stats.bin_width, amax)
    if symmetric:
        return _symmetric(threshold)
    return _containing_zero(max(stats.min, -threshold), min(stats.max, threshold))


@njit(cache=True)
def _rounding_error_antiderivative(t, scale):
    """Antiderivative of ``(t - scale * round(t / scale))**2`` in units of scale**3 (plus a constant)."""
    shifted = t / scale + 0.5
    periods = np.floor(shifted)
    offset = shifted - periods - 0.5
    return periods / 12.0 + (offset**3 + 0.125) / 3.0


@njit(cache=True)
def _interval_sq_error(a, b, scale, grid_lo, grid_hi):
    """Integral over [a, b] of the squared quantize-dequantize error of the grid."""
    total = 0.0
    if a < grid_lo:
        end = min(b, grid_lo)
        total += ((end - grid_lo) ** 3 - (a - grid_lo) ** 3) / 3.0
    if b > grid_hi:
        start = max(a, grid_hi)
        total += ((b - grid_hi) ** 3 - (start - grid_hi) ** 3) / 3.0
    start = max(a, grid_lo)
    end = min(b, grid_hi)
    if end > start:
        total += scale**3 * (
            _rounding_error_antiderivative(end, scale) - _rounding_error_antiderivative(start, scale)
        )
    return total


@njit(cache=True)
def _point_sq_error(x, scale, grid_lo, grid_hi):
    if x < grid_lo:
        return (x - grid_lo) ** 2
    if x > grid_hi:
        return (x - grid_hi) ** 2
    return (x - scale * np.floor(x / scale + 0.5)) ** 2


@njit(cache=True)
def _expected_sq_errors(lower, upper, counts, scales, zero_points, qmin, qmax):
    """Mean squared quantize-dequantize error of the binned data for each candidate grid."""
    total = 0.0
    for j in range(counts.size):
        total += counts[j]
    errors = np.empty(scales.size)
    for c in range(scales.size):
        scale = scales[c]
        grid_lo = scale * (qmin - zero_points[c])
        grid_hi = scale * (qmax - zero_points[c])
        error = 0.0
        for j in range(counts.size):
            a = lower[j]
            b = upper[j]
            if b > a:
                error += counts[j] * _interval_sq_error(a, b, scale, grid_lo, grid_hi) / (b - a)
            else:
                error += counts[j] * _point_sq_error(a, scale, grid_lo, grid_hi)
        errors[c] = error / total
    return errors


def expected_sq_errors_reference(
    lower: np.ndarray,
    upper: np.ndarray,
    counts: np.ndarray,
    scales: np.ndarray,
    zero_points: np.ndarray,
    qmin: int,
    qmax: int,
    samples_per_bin: int = 4000,
) -> np.ndarray:
    """Numpy oracle of the MSE kernel: midpoint rule over each bin, float64 quantization."""
    fractions = (np.arange(samples_per_bin) + 0.5) / samples_per_bin
    points = lower[:, None] + fractions[None, :] * (upper - lower)[:, None]
    weights = np.repeat(counts[:, None] / samples_per_bin, samples_per_bin, axis=1)
    errors = []
    for scale, zero_point in zip(scales, zero_points):
        q = np.clip(np.rint(points / scale) + zero_point, qmin, qmax)
        errors.append(float(np.sum(weights * (points - scale * (q - zero_point)) ** 2) / counts.sum()))
    return np.array(errors)


def _edge_candidates(extreme: float, width: float) -> np.ndarray:
    """Bin edges strictly between 0 and ``extreme`` (either sign), plus ``extreme`` itself."""
    steps = np.arange(1, int(abs(extreme) / width) + 1, dtype=np.float64) * width
    steps = steps[steps < abs(extreme)]
    return np.append(steps, abs(extreme)) * (1.0 if extreme >= 0 else -1.0)


def mse_range(stats: TensorStats, symmetric: bool, num_bits: int = 8) -> tuple[float, float]:
    """Range whose grid minimises the expected squared quantize-dequantize error (eq. 16).

    The error counts rounding inside the grid and clipping outside it, integrated exactly over
    the uniform-within-bin model. Candidates are the bin edges up to the extremes. Symmetric:
    one threshold over the magnitude. Asymmetric: the upper threshold, and the lower one too when
    the data is two-sided, by alternating exact 1-d searches until neither moves; each grid is
    built with the same zero-point rounding as :func:`~tpusim.quant.arithmetic.activation_qparams`.
    """
    qmin, qmax = integer_range(symmetric, num_bits)
    lower, upper, counts = _signed_bins(stats)
    counts = counts.astype(np.float64)
    if _amax(stats) == 0.0:
        return 0.0, 0.0

    def errors_of(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        scales, zero_points = asymmetric_grid(lo, hi, qmin, qmax)
        return _expected_sq_errors(lower, upper, counts, scales, zero_points.astype(np.float64), qmin, qmax)

    if symmetric:
        thresholds = _edge_candidates(_amax(stats), stats.bin_width)
        scales = symmetric_scale(thresholds, qmax)
        errors = _expected_sq_errors(lower, upper, counts, scales, np.zeros(scales.size), qmin, qmax)
        return _symmetric(float(thresholds[int(np.argmin(errors))]))

    lo_candidates = _edge_candidates(stats.min, stats.bin_width) if stats.min < 0 else np.zeros(1)
    hi_candidates = _edge_candidates(stats.max, stats.bin_width) if stats.max > 0 else np.zeros(1)
    lo, hi = _containing_zero(stats.min, stats.max)
    for _ in range(_MAX_COORDINATE_SWEEPS):
        best_hi = float(hi_candidates[int(np.argmin(errors_of(np.full(hi_candidates.size, lo), hi_candidates)))])
        best_lo = float(lo_candidates[int(np.argmin(errors_of(lo_candidates, np.full(lo_candidates.size, best_hi))))])
        if (best_lo, best_hi) == (lo, hi):
            break
        lo, hi = best_lo, best_hi
    return lo, hi


def select_range(
    method: RangeMethod, stats: TensorStats, symmetric: bool, percentile: float = 99.99, num_bits: int = 8
) -> tuple[float, float]:
    """Dispatch to the range method named in the quantization config."""
    if method == "minmax":
        return minmax_range(stats, symmetric)
    if method == "percentile":
        return percentile_range(stats, symmetric, percentile)
    if method == "entropy":
        return entropy_range(stats, symmetric, num_bits)
    if method == "mse":
        return mse_range(stats, symmetric, num_bits)
    raise ValueError(f"unknown range method {method!r}")
