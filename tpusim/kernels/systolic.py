"""PE-level weight-stationary systolic array, stepped cycle by cycle: the simulator's ground truth.

The model (DESIGN.md section 4), for an array of R rows and C columns:

* PE(r, c) multiplies with its *active* weight register and owns a *shadow* register.
* Weight shift. A tile's weights enter column c at the top, one row per cycle, the row bound for
  PE(R-1, c) first, so a shift always takes R cycles (partial tiles are zero-padded). The shift
  head moves down one row per cycle and the rows it has passed keep shifting, so after R cycles
  the shadow of PE(r, c) holds W[r, c] and the rows below the head were never disturbed.
  The shift of column c starts c cycles after that of column 0 (it follows the data wavefront).
* Streaming. Row r of input vector m of a tile that starts streaming at cycle s enters PE(r, 0)
  at cycle s + m + r and moves right one PE per cycle, so PE(r, c) sees it at s + m + r + c.
  Partial sums (int32) move down one PE per cycle: PE(r, c) adds act * W to what PE(r-1, c) held
  the cycle before. The bottom edge emits one C-wide vector per cycle: column c of vector m
  leaves PE(R-1, c) at cycle s + m + R - 1 + c.
* Swap. A tile's first activation carries a swap token: in the cycle it reaches PE(r, c) the PE
  copies its shadow into its active register and uses it at once. In that same cycle the next
  tile's shift head reaches PE(r, c), overwriting the shadow at the end of the cycle. So the
  shift of tile i+1 starts (column 0) in the cycle tile i starts streaming.
* Schedule. Cycle 0 is the first cycle of tile 0's shift; tile 0 streams from cycle R; tile i+1
  streams from max(s_i + M_i, s_i + R): after tile i's last row has entered and once its own
  R-cycle shift is complete.
* Without weight double buffering (``weight_double_buffering=False``: no shadow registers, the
  array SCALE-Sim's weight-stationary model describes) a shift overwrites the weights in use, so
  tile i+1's shift starts (column 0) in the cycle after tile i's last output has left the array,
  and tile i+1 streams R cycles later: s_{i+1} = s_i + M_i + 2R + C - 2.

Timing contract (tested equal to the stepped kernel): one tile of M rows takes M + R + C - 2
cycles from its first input entering to its last output leaving; T tiles of M rows take
R + (T-1) * max(M, R) + (M + R + C - 2) cycles in all, the first tile's shift being exposed;
without double buffering every tile (fold) takes its shift, stream and drain alone,
2R + C + M - 2 cycles, T * (2R + C + M - 2) in all.

``pe_array_reference`` is a literal register-transfer model in numpy (every register of every PE
updated every cycle, tokens travelling with the data, the schedule derived from register
state); ``pe_array_run`` and ``pe_gemm`` use the fast Numba kernel, which steps the same cycles
but skips PEs on wavefronts that carry no input row (their registers hold zeros and no
evaluated PE reads them), and lets activations move by advancing the origin of a per-row ring
buffer instead of copying every register.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np
from numba import njit

from tpusim.kernels.gemm import check_operands, result_dtype, wrap_to_bits


class ArrayRun(NamedTuple):
    """What the array's bottom edge emitted for each tile, and when."""

    outputs: tuple[np.ndarray, ...]  # tile i: (M_i, cols) int32, one bottom-edge vector per input row
    cycles: int  # cycle 0 = first cycle of tile 0's weight shift; ends with the last output leaving
    stream_starts: tuple[int, ...]  # cycle at which each tile's first input enters PE(0, 0)


class PeGemmResult(NamedTuple):
    result: np.ndarray  # (M, N), int32 when acc_bits <= 32 else int64
    cycles: int
    wrapped_count: int


def tile_sequence_cycles(m_rows: int, n_tiles: int, rows: int, cols: int, *,
                         weight_double_buffering: bool = True) -> int:
    """Cycles for n_tiles tiles of m_rows inputs each on a rows x cols array, weights available."""
    if m_rows < 1 or n_tiles < 1 or rows < 1 or cols < 1:
        raise ValueError(f"all arguments must be >= 1, got {m_rows=}, {n_tiles=}, {rows=}, {cols=}")
    if not weight_double_buffering:
        return n_tiles * (2 * rows + cols + m_rows - 2)
    return rows + (n_tiles - 1) * max(m_rows, rows) + (m_rows + rows + cols - 2)


def stream_starts(m_rows: Sequence[int], rows: int, cols: int | None = None, *,
                  weight_double_buffering: bool = True) -> np.ndarray:
    """Cycle at which each tile starts streaming (see the module docstring's schedule).

    cols matters only without double buffering, where a tile waits for the previous one to drain.
    """
    if not weight_double_buffering and cols is None:
        raise ValueError("without weight double buffering the schedule depends on the array's cols")
    m = np.asarray(m_rows, np.int64)
    steps = np.maximum(m, rows) if weight_double_buffering else m + (2 * rows + cols - 2)
    starts = np.full(m.size, rows, np.int64)
    starts[1:] += np.cumsum(steps[:-1])
    return starts


def _shift_starts(starts: np.ndarray, rows: int, weight_double_buffering: bool) -> np.ndarray:
    """Cycle at which each tile's weights start shifting into column 0."""
    if not weight_double_buffering:
        return starts - rows
    shift = np.empty_like(starts)
    shift[0] = 0
    shift[1:] = starts[:-1]  # the next tile shifts into the shadows while this one streams
    return shift


@njit(cache=True)
def _step_array(x_src, tile_x_row0, tile_x_col0, tile_m, w_src, tile_w_row0, tile_w_col0,
                starts, shift_base, out_row0, out_col0, acc, exact, acc_bits, rows, cols):
    """Step the array until the last output leaves; returns the cycle count.

    Tile i streams rows x_src[tile_x_row0[i] : +tile_m[i], tile_x_col0[i] : +rows] against
    weights w_src[tile_w_row0[i] : +rows, tile_w_col0[i] : +cols] from cycle starts[i] (both
    sources zero-padded); its weights shift into column c from cycle shift_base[i] + c. The
    weights always pass through the shadow registers: without double buffering no shift overlaps
    another tile's streaming, so that equals shifting into the active registers (what
    pe_array_reference models, and a test compares). Bottom-edge vector m of tile i goes to
    accumulator row out_row0[i] + m, columns out_col0[i] + c: acc wraps at acc_bits, exact keeps
    the int64 sum.

    Row r's activation registers live in a ring of 2*cols int16 (every value stored twice, so
    any window of cols is contiguous): PE(r, c)'s register at cycle t is at slot
    (c - t) mod cols, so "every activation moves right one PE" is the origin moving one slot.
    Partial sums are updated in place, bottom row first, so row r-1 still holds last cycle's.
    """
    n_tiles = starts.size
    last_wave = starts[n_tiles - 1] + tile_m[n_tiles - 1] - 1
    # wave d = the input row that enters PE(0, 0) at cycle d; PE(r, c) works on wave t - r - c.
    wave_tile = np.full(last_wave + 1, -1, np.int64)
    for i in range(n_tiles):
        wave_tile[starts[i]:starts[i] + tile_m[i]] = i
    # maximal runs of consecutive input-carrying waves, and for each wave the first run not before it
    run_lo = np.empty(n_tiles, np.int64)
    run_hi = np.empty(n_tiles, np.int64)
    n_runs = 0
    for i in range(n_tiles):
        if n_runs > 0 and run_hi[n_runs - 1] + 1 == starts[i]:
            run_hi[n_runs - 1] = starts[i] + tile_m[i] - 1
        else:
            run_lo[n_runs] = starts[i]
            run_hi[n_runs] = starts[i] + tile_m[i] - 1
            n_runs += 1
    first_run = np.empty(last_wave + 1, np.int64)
    j = 0
    for d in range(last_wave + 1):
        while run_hi[j] < d:
            j += 1
        first_run[d] = j

    psum = np.zeros((rows, cols), np.int32)
    ring = np.zeros((rows, 2 * cols), np.int16)
    active = np.zeros((rows, cols), np.int8)
    shadow = np.zeros((rows, cols), np.int8)
    zero_row = np.zeros(cols, np.int32)

    first_swapping = 0  # tiles whose swap front is inside the array at cycle t
    first_shifting = 0  # tiles whose shift is in progress at cycle t
    t = 0
    done = False
    while not done:
        origin = (cols - t % cols) % cols

        # swap: tile i's first activation is at PE(r, t - s_i - r)
        while first_swapping < n_tiles and t - starts[first_swapping] > rows + cols - 2:
            first_swapping += 1
        i = first_swapping
        while i < n_tiles and starts[i] <= t:
            for r in range(rows):
                c = t - starts[i] - r
                if 0 <= c < cols:
                    active[r, c] = shadow[r, c]
            i += 1

        # left edge: row r receives wave t - r
        for r in range(rows):
            d = t - r
            value = 0
            if 0 <= d <= last_wave:
                tile = wave_tile[d]
                if tile >= 0:
                    value = x_src[tile_x_row0[tile] + d - starts[tile], tile_x_col0[tile] + r]
            ring[r, origin] = value
            ring[r, origin + cols] = value

        # multiply-accumulate, bottom row first; only PEs on input-carrying waves
        for r in range(rows - 1, -1, -1):
            lo = max(t - r - cols + 1, 0)
            hi = min(t - r, last_wave)
            if lo > hi:
                continue
            above = psum[r - 1] if r > 0 else zero_row
            here = psum[r]
            acts = ring[r, origin:origin + cols]
            weights = active[r]
            j = first_run[lo]
            while j < n_runs and run_lo[j] <= hi:
                c_first = t - r - min(run_hi[j], hi)
                c_last = t - r - max(run_lo[j], lo)
                # unsigned indices (both bounds are >= 0 here): Numba then drops its negative-index
                # wraparound, which would otherwise stay in the loop and defeat vectorisation
                for c in range(np.uint64(c_first), np.uint64(c_last + 1)):
                    here[c] = above[c] + np.int32(acts[c]) * np.int32(weights[c])
                if r == rows - 1:
                    for c in range(c_first, c_last + 1):
                        d = t - r - c
                        tile = wave_tile[d]
                        m = out_row0[tile] + d - starts[tile]
                        n = out_col0[tile] + c
                        exact[m, n] += here[c]
                        acc[m, n] = wrap_to_bits(acc[m, n] + here[c], acc_bits)
                        if d == last_wave and c == cols - 1:
                            done = True
                j += 1

        # weight shift (end of cycle): column c of tile i is at step t - shift_base[i] - c
        while first_shifting < n_tiles and t - shift_base[first_shifting] > rows + cols - 2:
            first_shifting += 1
        i = first_shifting
        while i < n_tiles and shift_base[i] <= t:
            step0 = t - shift_base[i]  # step of column 0
            c_begin = max(0, step0 - rows + 1)
            for r in range(rows - 1, 0, -1):
                c_end = min(cols - 1, step0 - r) + 1  # the shift head has passed row r in columns < c_end
                if c_end <= c_begin:
                    continue
                below = shadow[r]
                above_row = shadow[r - 1]
                for c in range(np.uint64(c_begin), np.uint64(c_end)):
                    below[c] = above_row[c]
            for c in range(c_begin, min(cols - 1, step0) + 1):
                shadow[0, c] = w_src[tile_w_row0[i] + rows - 1 - (step0 - c), tile_w_col0[i] + c]
            i += 1
        t += 1
    return t


def _padded(a: np.ndarray, shape: tuple[int, int], dtype: type) -> np.ndarray:
    out = np.zeros(shape, dtype)
    out[: a.shape[0], : a.shape[1]] = a
    return out


def _check_tiles(x_tiles: Sequence[np.ndarray], w_tiles: Sequence[np.ndarray], rows: int, cols: int) -> None:
    if rows < 1 or cols < 1:
        raise ValueError(f"array must be at least 1x1, got {rows}x{cols}")
    if len(x_tiles) != len(w_tiles) or not x_tiles:
        raise ValueError(f"need as many activation as weight tiles (>= 1), got {len(x_tiles)} and {len(w_tiles)}")
    for i, (x, w) in enumerate(zip(x_tiles, w_tiles)):
        check_operands(x, w, None, 32)
        k, n = w.shape
        if x.shape[0] < 1 or not (1 <= k <= rows and 1 <= n <= cols):
            raise ValueError(f"tile {i}: x {x.shape} and w {w.shape} do not fit a {rows}x{cols} array")


def pe_array_run(x_tiles: Sequence[np.ndarray], w_tiles: Sequence[np.ndarray], rows: int, cols: int, *,
                 weight_double_buffering: bool = True) -> ArrayRun:
    """Stream tiles through the stepped array, back to back (or one at a time without double buffering).

    Tile i is an activation block x_tiles[i] (M_i, k_i <= rows), int8 or uint8, and a weight block
    w_tiles[i] (k_i, n_i <= cols), int8. Returns each tile's bottom-edge vectors (M_i, cols) int32
    (columns >= n_i are zero) and the cycle count.
    """
    _check_tiles(x_tiles, w_tiles, rows, cols)
    tile_m = np.array([x.shape[0] for x in x_tiles], np.int64)
    row0 = np.concatenate(([0], np.cumsum(tile_m)[:-1])).astype(np.int64)
    x_src = np.zeros((int(tile_m.sum()), rows), np.int16)
    w_src = np.zeros((len(w_tiles) * rows, cols), np.int8)  # tile i's block zero-padded to rows x cols
    for x, w, r0, w0 in zip(x_tiles, w_tiles, row0.tolist(), range(0, w_src.shape[0], rows)):
        x_src[r0 : r0 + x.shape[0], : x.shape[1]] = x
        w_src[w0 : w0 + w.shape[0], : w.shape[1]] = w
    zeros = np.zeros(len(x_tiles), np.int64)
    starts = stream_starts(tile_m, rows, cols, weight_double_buffering=weight_double_buffering)
    acc = np.zeros((x_src.shape[0], cols), np.int64)
    exact = np.zeros_like(acc)
    cycles = _step_array(x_src, row0, zeros, tile_m, w_src, np.arange(len(w_tiles), dtype=np.int64) * rows, zeros,
                         starts, _shift_starts(starts, rows, weight_double_buffering), row0, zeros, acc, exact, 32,
                         rows, cols)
    emitted = acc.astype(np.int32)
    outputs = tuple(emitted[r0 : r0 + m] for r0, m in zip(row0, tile_m))
    return ArrayRun(outputs, int(cycles), tuple(int(s) for s in starts))


def pe_gemm(x: np.ndarray, w: np.ndarray, rows: int, cols: int, acc_bits: int = 32,
            bias: np.ndarray | None = None, *, weight_double_buffering: bool = True) -> PeGemmResult:
    """(M,K) x (K,N) through the stepped array, K folded over array rows and N over columns.

    Tiles go column block by column block, the K folds of one block consecutively, all in one
    stream (one tile at a time without weight double buffering); every fold's bottom-edge vectors
    are added into acc_bits accumulators (initialised with the bias). An output counts as wrapped
    when its exact int64 sum lies outside the acc_bits range. Bit-exact equal to int8_gemm.
    """
    check_operands(x, w, bias, acc_bits)
    if rows < 1 or cols < 1:
        raise ValueError(f"array must be at least 1x1, got {rows}x{cols}")
    (m_total, k_total), n_total = x.shape, w.shape[1]
    if m_total < 1 or k_total < 1 or n_total < 1:
        raise ValueError(f"empty GEMM: x {x.shape}, w {w.shape}")
    k_folds = -(-k_total // rows)
    n_blocks = -(-n_total // cols)
    x_src = _padded(x, (m_total, k_folds * rows), np.int16)
    w_src = _padded(w, (k_folds * rows, n_blocks * cols), np.int8)
    n_tiles = k_folds * n_blocks
    fold = np.tile(np.arange(k_folds, dtype=np.int64), n_blocks)
    block = np.repeat(np.arange(n_blocks, dtype=np.int64), k_folds)
    zeros = np.zeros(n_tiles, np.int64)
    tile_m = np.full(n_tiles, m_total, np.int64)
    starts = stream_starts(tile_m, rows, cols, weight_double_buffering=weight_double_buffering)
    bias_row = np.zeros(n_blocks * cols, np.int64)
    if bias is not None:
        bias_row[:n_total] = bias
    acc = np.repeat(bias_row[None, :], m_total, axis=0)
    exact = acc.copy()
    cycles = _step_array(x_src, zeros, fold * rows, tile_m, w_src, fold * rows, block * cols,
                         starts, _shift_starts(starts, rows, weight_double_buffering), zeros, block * cols, acc,
                         exact, acc_bits, rows, cols)
    acc, exact = acc[:, :n_total], exact[:, :n_total]
    wrapped = int(np.count_nonzero(acc != exact))
    return PeGemmResult(acc.astype(result_dtype(acc_bits)), int(cycles), wrapped)


def pe_array_reference(x_tiles: Sequence[np.ndarray], w_tiles: Sequence[np.ndarray], rows: int, cols: int, *,
                       weight_double_buffering: bool = True) -> ArrayRun:
    """Register-transfer oracle of pe_array_run in numpy: slow, literal, for small arrays.

    Every register of every PE is recomputed every cycle from last cycle's registers.
    Activations carry (tile, row) tags and the swap token; partial sums and weight registers carry
    tags too, and the model checks that a PE only ever adds an activation into a partial sum of
    the same input row, with the weights of the activation's tile. The schedule is not given:
    tile j starts streaming in the first cycle in which tile j-1 has no rows left to send and
    column 0 has finished shifting tile j's weights. The shift of tile 0 into column c starts at
    cycle c. With double buffering, weights shift into the shadow registers and the shift of
    tile j into column c starts in the cycle tile j-1's swap token is at PE(0, c). Without it
    there are no shadow registers: weights shift straight into the active ones, and the shift of
    tile j into column c starts c + 1 cycles after the cycle in which the bottom edge emitted
    tile j-1's last output.
    """
    _check_tiles(x_tiles, w_tiles, rows, cols)
    n_tiles = len(x_tiles)
    xs = [_padded(x, (x.shape[0], rows), np.int64) for x in x_tiles]
    ws = [_padded(w, (rows, cols), np.int64) for w in w_tiles]
    outputs = [np.zeros((x.shape[0], cols), np.int64) for x in x_tiles]
    pending = [x.shape[0] * cols for x in x_tiles]

    act = np.zeros((rows, cols), np.int64)
    act_tile = np.full((rows, cols), -1)
    act_row = np.full((rows, cols), -1)
    token = np.zeros((rows, cols), bool)
    psum = np.zeros((rows, cols), np.int64)
    psum_tile = np.full((rows, cols), -1)
    psum_row = np.full((rows, cols), -1)
    active = np.zeros((rows, cols), np.int64)
    active_tile = np.full((rows, cols), -1)
    # where a shift writes: the shadow registers, or the active ones when there are none
    shadow, shadow_tile = (np.zeros((rows, cols), np.int64), np.full((rows, cols), -1)) if weight_double_buffering \
        else (active, active_tile)
    shift_tile = np.full(cols, -1)  # tile being shifted into each column
    shift_step = np.zeros(cols, np.int64)  # values already entered into that column
    shifted_into_col0 = -1  # last tile whose shift into column 0 is complete
    drained_at = np.full(n_tiles, -1)  # cycle in which the bottom edge emitted the tile's last output

    launched: list[tuple[int, int]] = []  # wave d -> (tile, row) or (-1, -1)
    starts: list[int] = []
    streaming, next_row = -1, 0
    t = 0
    while any(pending):
        # stream controller: launch wave t into row 0 (row r receives it r cycles later)
        if streaming >= 0 and next_row < x_tiles[streaming].shape[0]:
            launched.append((streaming, next_row))
            next_row += 1
        elif streaming + 1 < n_tiles and shifted_into_col0 >= streaming + 1:
            streaming, next_row = streaming + 1, 1
            starts.append(t)
            launched.append((streaming, 0))
        else:
            launched.append((-1, -1))

        edge = np.zeros(rows, np.int64)
        edge_tile = np.full(rows, -1)
        edge_row = np.full(rows, -1)
        for r in range(rows):
            if t - r >= 0:
                tile, m = launched[t - r]
                if tile >= 0:
                    edge[r], edge_tile[r], edge_row[r] = xs[tile][m, r], tile, m
        act = np.concatenate((edge[:, None], act[:, :-1]), axis=1)
        act_tile = np.concatenate((edge_tile[:, None], act_tile[:, :-1]), axis=1)
        act_row = np.concatenate((edge_row[:, None], act_row[:, :-1]), axis=1)
        token = np.concatenate(((edge_row == 0)[:, None], token[:, :-1]), axis=1)

        if weight_double_buffering:
            active[token] = shadow[token]
            active_tile[token] = shadow_tile[token]

        psum_in = np.concatenate((np.zeros((1, cols), np.int64), psum[:-1]))
        tile_in = np.concatenate((act_tile[:1], psum_tile[:-1]))
        row_in = np.concatenate((act_row[:1], psum_row[:-1]))
        carrying = act_tile >= 0
        assert np.array_equal(tile_in[carrying], act_tile[carrying])
        assert np.array_equal(row_in[carrying], act_row[carrying])
        assert np.array_equal(active_tile[carrying], act_tile[carrying])
        psum = psum_in + act * active
        psum_tile, psum_row = tile_in, row_in

        for c in np.flatnonzero(psum_tile[-1] >= 0):
            tile, m = psum_tile[-1, c], psum_row[-1, c]
            outputs[tile][m, c] = psum[-1, c]
            pending[tile] -= 1
            if pending[tile] == 0:
                drained_at[tile] = t

        # weight shift at the end of the cycle
        for c in range(cols):
            if shift_tile[c] < 0:
                if t == c:
                    next_tile = 0
                elif weight_double_buffering:
                    next_tile = act_tile[0, c] + 1 if token[0, c] else -1
                else:
                    just_drained = np.flatnonzero((drained_at >= 0) & (t - drained_at == c + 1))
                    next_tile = just_drained[0] + 1 if just_drained.size else -1
                if 0 <= next_tile < n_tiles:
                    shift_tile[c], shift_step[c] = next_tile, 0
            if shift_tile[c] >= 0:
                head = shift_step[c]
                shadow[1 : head + 1, c] = shadow[:head, c].copy()
                shadow_tile[1 : head + 1, c] = shadow_tile[:head, c].copy()
                shadow[0, c] = ws[shift_tile[c]][rows - 1 - head, c]
                shadow_tile[0, c] = shift_tile[c]
                shift_step[c] += 1
                if shift_step[c] == rows:
                    if c == 0:
                        shifted_into_col0 = shift_tile[c]
                    shift_tile[c] = -1
        t += 1
    return ArrayRun(tuple(o.astype(np.int32) for o in outputs), t, tuple(starts))
