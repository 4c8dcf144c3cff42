"""int8 x int8 GEMM with a finite-width two's-complement accumulator.

This is the functional model of the matrix unit's arithmetic: 8-bit operands (activations
signed or unsigned, weights signed), exact products, sums wrapped modulo ``2**acc_bits`` as
the TPU's 32-bit accumulators would. ``int8_gemm`` (and ``grouped_int8_gemm``, which takes
weights in their stored (N, K) layout and all groups of a conv at once) is the fast Numba kernel;
``int8_gemm_reference`` is the naive numpy oracle it is tested against. ``requantized_int8_gemm``
adds the activation unit's requantization in the kernel's epilogue and returns channels-last
8-bit outputs (its oracle: the GEMM reference, then ``requantize_reference``).

On CPUs with AVX-512 VNNI the kernels use ``vpdpbusd`` (64 uint8 x int8 products per
instruction) through small LLVM intrinsics (int8 activations are shifted to uint8 first, the
bias absorbing the shift): for the fused kernel, 6 pixels x 64 channels per tile with each
pixel's four activation bytes broadcast against packed weights, so no sum is reduced across
lanes; otherwise 4 x 4 tiles of K-contiguous dot products. On CPUs with AVX2 but not that, the fused
kernel uses ``vpmaddwd`` (two int16 x int16 products per int32 lane, exact for int8 and uint8 widened
to int16) the same way: 6 pixels x 16 channels per tile. (AVX2's ``vpmaddubsw`` would be twice as
dense but saturates its int16 sums.) On CPUs with AMX int8, where Linux grants the process its tile
state, the fused kernel feeds the broadcast kernel's operands to ``tdpbusd`` instead
(:mod:`tpusim.kernels.amx`: 32 pixels x 32 channels a block). Elsewhere, and for shapes that do not fill
the tiles, a portable loop that LLVM vectorises. All are exact. Where no sum plus its bias can leave the
accumulator (:func:`_sums_fit`, decided once per layer from K, the dtypes and the biases), the fused
epilogue skips the wrap and multiplies 32 x 32 bits. Rows (and for the fused
kernel, L2-sized panels of weights) are split into tasks that the ``numba.get_num_threads()``
threads claim one at a time (:func:`run_tasks`); each output is computed by one task, so the
integers do not depend on the thread count.
"""
from __future__ import annotations

import os
import platform
import threading
import time
import warnings
from typing import NamedTuple

import llvmlite.binding
import numba
import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from tpusim.derived import derived_from
from tpusim.kernels import amx
from tpusim.kernels.amx import HAS_AMX, amx_ready
from tpusim.kernels.rounding import requantize_constants, requantize_value

# |uint8 x int8| <= 255 * 128, so this many products always fit an int32 partial sum.
_INT32_SAFE_TERMS = (2**31 - 1) // (255 * 128)
_TILE = 4  # a tile is 4 rows of x against 4 weight rows: 16 int32 sums, each a vectorised reduction over K
_PANEL_BYTES = 128 * 1024  # weight rows swept by all row blocks before moving on: stays in L2
_VNNI_BLOCK = 64  # bytes of K per vpdpbusd operand (one zmm register)
_BROADCAST_PANEL_BYTES = 512 * 1024  # weights a broadcast-tile panel holds: half of a Zen 4/5 core's L2
_VNNI_CHUNK = _INT32_SAFE_TERMS // _VNNI_BLOCK * _VNNI_BLOCK  # whole blocks whose int32 sums cannot overflow
# Numba compiles for the host CPU unless told otherwise; the intrinsic exists only there.
HAS_VNNI = numba.config.CPU_NAME is None and bool(llvmlite.binding.get_host_cpu_features().get("avx512vnni"))
HAS_AVX2 = numba.config.CPU_NAME is None and bool(llvmlite.binding.get_host_cpu_features().get("avx2"))
_vnni_compiles = [True]  # set False for good once the intrinsic fails to compile here
_amx_compiles = [True]  # likewise for the AMX tiles


class GemmResult(NamedTuple):
    """Accumulator contents after the GEMM, and how many of them wrapped."""

    result: np.ndarray  # (M, N), int32 when acc_bits <= 32 else int64
    wrapped_count: int  # outputs whose exact sum lies outside the acc_bits range


def check_operands(x: np.ndarray, w: np.ndarray, bias: np.ndarray | None, acc_bits: int) -> None:
    """Raise ValueError unless x is (M,K) int8/uint8, w is (K,N) int8, bias is (N,) int32."""
    if x.ndim != 2 or x.dtype not in (np.int8, np.uint8):
        raise ValueError(f"x must be a 2-D int8 or uint8 array, got {x.dtype} {x.shape}")
    if w.ndim != 2 or w.dtype != np.int8:
        raise ValueError(f"w must be a 2-D int8 array, got {w.dtype} {w.shape}")
    if x.shape[1] != w.shape[0]:
        raise ValueError(f"inner dimensions differ: x {x.shape} vs w {w.shape}")
    if bias is not None and (bias.dtype != np.int32 or bias.shape != (w.shape[1],)):
        raise ValueError(f"bias must be int32 of shape ({w.shape[1]},), got {bias.dtype} {bias.shape}")
    if not 2 <= acc_bits <= 64:
        raise ValueError(f"acc_bits must be in [2, 64], got {acc_bits}")


def result_dtype(acc_bits: int) -> type[np.signedinteger]:
    return np.int32 if acc_bits <= 32 else np.int64


@njit(cache=True)
def wrap_to_bits(value: np.int64, acc_bits: int) -> np.int64:
    """Two's-complement wrap of an int64 to acc_bits (the accumulator's modulo arithmetic)."""
    if acc_bits >= 64:
        return value
    half = np.int64(1) << (acc_bits - 1)
    mask = (np.int64(1) << acc_bits) - 1
    return ((value + half) & mask) - half


@njit(cache=True)
def _dot(x_row, w_row):
    """Exact int64 dot product of two K-vectors, summed in int32 over K chunks that cannot overflow."""
    total = np.int64(0)
    for k0 in range(0, x_row.shape[0], _INT32_SAFE_TERMS):
        # Loops over sliced chunks index from 0, which lets LLVM drop the negative-index wrap and vectorise.
        x_chunk = x_row[k0 : k0 + _INT32_SAFE_TERMS]
        w_chunk = w_row[k0 : k0 + _INT32_SAFE_TERMS]
        partial = np.int32(0)
        for k in range(x_chunk.shape[0]):
            partial = np.int32(partial + np.int32(x_chunk[k]) * np.int32(w_chunk[k]))
        total += partial
    return total


@njit(cache=True)
def _tile_sums(x, w, m0, n0, sums):
    """sums[i, j] = exact x[m0 + i] . w[n0 + j] for a full 4 x 4 tile.

    Sixteen int32 reductions over the same K range share the eight operand loads; LLVM
    vectorises each along K into multiply-adds. int32 is exact for _INT32_SAFE_TERMS products,
    so longer K is cut into chunks whose sums are folded into the int64 tile.
    """
    sums[:, :] = 0
    for k0 in range(0, x.shape[1], _INT32_SAFE_TERMS):
        k1 = k0 + _INT32_SAFE_TERMS
        # Slices indexed from 0 let LLVM drop the negative-index wrap and vectorise.
        x0, x1, x2, x3 = x[m0, k0:k1], x[m0 + 1, k0:k1], x[m0 + 2, k0:k1], x[m0 + 3, k0:k1]
        w0, w1, w2, w3 = w[n0, k0:k1], w[n0 + 1, k0:k1], w[n0 + 2, k0:k1], w[n0 + 3, k0:k1]
        s00 = s01 = s02 = s03 = np.int32(0)
        s10 = s11 = s12 = s13 = np.int32(0)
        s20 = s21 = s22 = s23 = np.int32(0)
        s30 = s31 = s32 = s33 = np.int32(0)
        for k in range(x0.shape[0]):
            a0, a1, a2, a3 = np.int32(x0[k]), np.int32(x1[k]), np.int32(x2[k]), np.int32(x3[k])
            b0, b1, b2, b3 = np.int32(w0[k]), np.int32(w1[k]), np.int32(w2[k]), np.int32(w3[k])
            s00 = np.int32(s00 + a0 * b0)
            s01 = np.int32(s01 + a0 * b1)
            s02 = np.int32(s02 + a0 * b2)
            s03 = np.int32(s03 + a0 * b3)
            s10 = np.int32(s10 + a1 * b0)
            s11 = np.int32(s11 + a1 * b1)
            s12 = np.int32(s12 + a1 * b2)
            s13 = np.int32(s13 + a1 * b3)
            s20 = np.int32(s20 + a2 * b0)
            s21 = np.int32(s21 + a2 * b1)
            s22 = np.int32(s22 + a2 * b2)
            s23 = np.int32(s23 + a2 * b3)
            s30 = np.int32(s30 + a3 * b0)
            s31 = np.int32(s31 + a3 * b1)
            s32 = np.int32(s32 + a3 * b2)
            s33 = np.int32(s33 + a3 * b3)
        sums[0, 0] += s00
        sums[0, 1] += s01
        sums[0, 2] += s02
        sums[0, 3] += s03
        sums[1, 0] += s10
        sums[1, 1] += s11
        sums[1, 2] += s12
        sums[1, 3] += s13
        sums[2, 0] += s20
        sums[2, 1] += s21
        sums[2, 2] += s22
        sums[2, 3] += s23
        sums[3, 0] += s30
        sums[3, 1] += s31
        sums[3, 2] += s32
        sums[3, 3] += s33


_I8X64 = ir.VectorType(ir.IntType(8), _VNNI_BLOCK)
_I32X16 = ir.VectorType(ir.IntType(32), _VNNI_BLOCK // 4)


def _transpose_reduce(builder, vectors):
    """Sixteen 16-lane vectors -> one vector whose lane t is the sum of vectors[t]'s lanes.

    Each round adds the low-half and high-half shuffles of pairs of vectors, halving both the
    vector count and the lanes each source occupies: 15 vector adds in all instead of sixteen
    separate horizontal reductions.
    """
    lanes = _VNNI_BLOCK // 4
    per_source = lanes
    while len(vectors) > 1:
        half = per_source // 2
        sources = lanes // per_source

        def mask(start):
            picks = [s * per_source + start + i for s in range(sources) for i in range(half)]
            picks += [lanes + p for p in picks]
            return ir.Constant(ir.VectorType(ir.IntType(32), lanes), picks)

        vectors = [builder.add(builder.shuffle_vector(a, b, mask(0)), builder.shuffle_vector(a, b, mask(half)))
                   for a, b in zip(vectors[0::2], vectors[1::2])]
        per_source = half
    return vectors[0]


def _vnni_tile_intrinsic(channel_major: bool):
    """An intrinsic computing the tile (m0.., n0..) of 4 x 4 outputs, wrapped and stored; it returns how many wrapped.

    v[i, j] = wrap(sum over k < 64 blocks of x[m0 + i, k] * w[n0 + j, k] + bias[n0 + j]), the wrap
    being ((v + half) & mask) - half, goes to out[out_row + j, out_col + i] (``channel_major``) or
    out[out_row + i, out_col + j]. x is a uint8 and w an int8 2-D array, bias int64 and out int32,
    all with unit inner stride. Sixteen zmm accumulators take one vpdpbusd per 64 k each (four
    adjacent products per int32 lane, modulo 2**32: exact while K * 255 * 128 < 2**31); they are
    reduced together, then the bias add and wrap check run in int64 lanes.
    """

    def tile(typingctx, x, w, m0, n0, blocks, bias, half, mask, out, out_row, out_col):
        return types.int64(x, w, m0, n0, blocks, bias, half, mask, out, out_row, out_col), codegen

    def codegen(context, builder, signature, args):
        byte, i32, i64 = ir.IntType(8), ir.IntType(32), ir.IntType(64)
        x_arr, w_arr, bias_arr, out_arr = (context.make_array(signature.args[a])(context, builder, args[a])
                                           for a in (0, 1, 5, 8))
        x_stride, w_stride, out_stride = (cgutils.unpack_tuple(builder, arr.strides, 2)[0]
                                          for arr in (x_arr, w_arr, out_arr))

        def row_start(data, first, offset, stride, column_bytes=None):
            start = builder.mul(builder.add(first, i64(offset)), stride)
            if column_bytes is not None:
                start = builder.add(start, column_bytes)
            return builder.gep(data, [start], source_etype=byte)

        x_rows = [row_start(x_arr.data, args[2], i, x_stride) for i in range(_TILE)]
        w_rows = [row_start(w_arr.data, args[3], j, w_stride) for j in range(_TILE)]
        accs = [[cgutils.alloca_once_value(builder, ir.Constant(_I32X16, None)) for _ in range(_TILE)]
                for _ in range(_TILE)]
        dpbusd = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(_I32X16, [_I32X16, _I8X64, _I8X64]), "llvm.x86.avx512.vpdpbusd.512")
        with cgutils.for_range(builder, args[4]) as loop:
            offset = builder.mul(loop.index, i64(_VNNI_BLOCK))

            def block(row):
                return builder.load(builder.gep(row, [offset], source_etype=byte), typ=_I8X64, align=1)

            x_blocks = [block(row) for row in x_rows]
            w_blocks = [block(row) for row in w_rows]
            for i in range(_TILE):
                for j in range(_TILE):
                    acc = accs[i][j]
                    builder.store(builder.call(dpbusd, [builder.load(acc), x_blocks[i], w_blocks[j]]), acc)
        # Lane 4 j + i of the reduced vector is output (m0 + i, n0 + j): four consecutive m per row of out.
        totals = _transpose_reduce(builder, [builder.load(accs[i][j]) for j in range(_TILE) for i in range(_TILE)])
        wide = ir.VectorType(i64, _TILE * _TILE)
        bias_quad = builder.load(builder.gep(bias_arr.data, [args[3]], source_etype=i64),
                                 typ=ir.VectorType(i64, _TILE), align=8)
        spread = ir.Constant(ir.VectorType(i32, _TILE * _TILE), [t // _TILE for t in range(_TILE * _TILE)])
        exact = builder.add(builder.sext(totals, wide), builder.shuffle_vector(bias_quad, bias_quad, spread))

        def splat(value):
            return builder.shuffle_vector(builder.insert_element(ir.Constant(wide, None), value, i32(0)),
                                          ir.Constant(wide, None), ir.Constant(ir.VectorType(i32, _TILE * _TILE), None))

        half_v = splat(args[6])
        stored = builder.sub(builder.and_(builder.add(exact, half_v), splat(args[7])), half_v)
        reduce_add = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(i64, [wide]), "llvm.vector.reduce.add.v16i64")
        wrapped = builder.call(reduce_add, [builder.zext(builder.icmp_signed("!=", stored, exact), wide)])
        narrow = builder.trunc(stored, _I32X16)
        quad = ir.VectorType(i32, _TILE)
        column_bytes = builder.mul(args[10], i64(4))
        for r in range(_TILE):
            lanes = [_TILE * r + t for t in range(_TILE)] if channel_major else [_TILE * t + r for t in range(_TILE)]
            part = builder.shuffle_vector(narrow, narrow, ir.Constant(quad, lanes))
            target = row_start(out_arr.data, args[9], r, out_stride, column_bytes)
            builder.store(part, builder.bitcast(target, quad.as_pointer()), align=4)
        return wrapped

    return intrinsic(tile)


_vnni_tile = _vnni_tile_intrinsic(channel_major=True)
_vnni_tile_rows = _vnni_tile_intrinsic(channel_major=False)


@njit(cache=True)
def _store_tile(sums, rows_here, cols_here, bias_g, acc_bits, out_g, m0, n0):
    """Add the bias, wrap to acc_bits, store channel-major; returns how many sums wrapped."""
    wrapped = 0
    for j in range(cols_here):
        bias = bias_g[n0 + j]
        out_row = out_g[n0 + j]
        for i in range(rows_here):
            exact = sums[i, j] + bias
            stored = wrap_to_bits(exact, acc_bits)
            wrapped += stored != exact
            out_row[m0 + i] = stored
    return wrapped


@njit(cache=True)
def _edge_sums(x, w, m0, n0, rows_here, cols_here, sums):
    for i in range(rows_here):
        for j in range(cols_here):
            sums[i, j] = _dot(x[m0 + i], w[n0 + j])


def _panel_rows(k_total: int, n_total: int) -> int:
    """Weight rows per L2-resident panel: a multiple of the tile, at least one tile."""
    return min(max(_TILE, _PANEL_BYTES // max(k_total, 1) // _TILE * _TILE), max(n_total, 1))


@njit(cache=True)
def _rows_range(task, chunks, m_total, unit=_TILE):
    """[m_lo, m_hi) of task's share of the rows: whole units (tiles or strips), split as evenly as the chunks allow."""
    units = -(-m_total // unit)
    chunk = task % chunks
    unit_lo = chunk * units // chunks
    unit_hi = (chunk + 1) * units // chunks
    return unit_lo * unit, min(unit_hi * unit, m_total)


def _element(context, builder, array_type, array, index):
    """The address of ``array[index]`` (a 1-D int64 array) in an intrinsic's code."""
    return builder.gep(context.make_array(array_type)(context, builder, array).data, [index])


def _count_intrinsic(slot: int):
    """An intrinsic adding 1 to counters[slot] atomically and returning the value before."""

    def count(typingctx, counters):
        sig = types.int64(counters)

        def codegen(context, builder, signature, args):
            address = _element(context, builder, signature.args[0], args[0], ir.Constant(ir.IntType(64), slot))
            return builder.atomic_rmw("add", address, ir.Constant(ir.IntType(64), 1), "seq_cst")

        return sig, codegen

    return intrinsic(count)


# counters[0]: tasks claimed so far (the next task is the value a claim returns); counters[1]: tasks finished.
claim_task = _count_intrinsic(0)
finish_task = _count_intrinsic(1)


@intrinsic
def _load_value(typingctx, values, index):
    """values[index] (int64) read from memory on every call: a loop polling it sees another thread's store,
    where a plain load may be hoisted out of the loop."""
    sig = types.int64(values, index)

    def codegen(context, builder, signature, args):
        return builder.load_atomic(_element(context, builder, signature.args[0], args[0], args[1]), "monotonic", 8)

    return sig, codegen


@intrinsic
def _add_value(typingctx, values, index, delta):
    """values[index] += delta (int64), atomically."""
    sig = types.void(values, index, delta)

    def codegen(context, builder, signature, args):
        builder.atomic_rmw("add", _element(context, builder, signature.args[0], args[0], args[1]), args[2], "seq_cst")
        return context.get_dummy_value()

    return sig, codegen


_IS_X86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")


@intrinsic
def _spin_pause(typingctx):
    """x86's ``pause`` (a spin loop's hint: it yields the core's pipeline and saves power); nothing elsewhere."""
    sig = types.void()

    def codegen(context, builder, signature, args):
        if _IS_X86:
            pause = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), []),
                                                   "llvm.x86.sse2.pause")
            builder.call(pause, [])
        return context.get_dummy_value()

    return sig, codegen


@njit(cache=True, nogil=True)
def _await_job(posted, counters, inside, index, left, seen, polls):
    """Helper ``index``'s wait between jobs, without the GIL (``posted``: jobs so far, the last one's slot, tasks
    and helpers): (True, the number of the job posted after ``seen``) once its caller has claimed one of its
    tasks and some are left, or (False, the last job passed over, else ``seen``) after ``polls`` polls a pause
    apart; a job whose tasks are all claimed before it is noticed, or that wants fewer helpers, is passed over.
    A caller that has claimed a task is in its own kernel, so the helper finds the GIL free: a thread waiting
    for the GIL sleeps, and an idle virtual CPU is halted until the host wakes it (20-300 us on the AMX Xeon).
    First the helper counts itself out of the job of slot ``left`` (-1: none), here, where it holds no GIL that
    its caller could wait for."""
    if left >= 0:
        _add_value(inside, left, -1)
    for _ in range(polls):
        post = _load_value(posted, 0)
        if post != seen:
            slot, tasks = _load_value(posted, 1), _load_value(posted, 2)
            claimed = _load_value(counters, 2 * slot)
            if claimed >= tasks or index >= _load_value(posted, 3):
                seen = post
            elif claimed > 0:
                return True, post
        _spin_pause()
    return False, seen


@njit(cache=True, nogil=True)
def _count_in(inside, slot):
    """A helper entering the job of ``slot``: atomic, as other helpers count themselves out without the GIL."""
    _add_value(inside, slot, 1)


@njit(cache=True, nogil=True)
def _await_done(counters, inside, slot, tasks, polls):
    """The caller's wait, without the GIL: whether the job of ``slot`` has its ``tasks`` finished and no helper
    left in it, within ``polls`` polls a pause apart."""
    for _ in range(polls):
        if _load_value(counters, 2 * slot + 1) >= tasks and _load_value(inside, slot) == 0:
            return True
        _spin_pause()
    return False


_SPIN_SECONDS = 3e-4  # how long a helper polls for the next job before it sleeps
_WAIT_SECONDS = 50e-6  # how long the caller polls for its job's end without the GIL before it yields the core instead
_SLOTS = 64  # jobs' task counters, taken in turn by the jobs posted


def _polls_for(seconds: float) -> int:
    """Polls of :func:`_await_done` (on a job that does not end) that take about ``seconds`` here."""
    counters, inside, polls = np.zeros(2, np.int64), np.ones(1, np.int64), 10_000
    _await_done(counters, inside, 0, 1, 1)  # (compiled or loaded before it is timed)
    start = time.perf_counter()
    _await_done(counters, inside, 0, 1, polls)
    return max(1, int(polls * seconds / max(time.perf_counter() - start, 1e-9)))


class _Job(NamedTuple):
    work: object
    args: tuple  # the kernel's arguments, its task counters last
    slot: int
    post: int
    helpers: int  # how many may join (numba.get_num_threads() - 1 of the caller, at most the tasks - 1)


class _Helpers:
    """``numba.get_num_threads() - 1`` threads that join the caller's task loops (:func:`run_tasks`).

    The caller works through the tasks itself and waits only for tasks a helper has claimed and
    not yet finished, never for a helper to start: on a busy machine a helper that the OS has not
    scheduled yet finds the tasks gone, where an OpenMP loop (a fixed share per thread, then a
    barrier) waited for it every time. Between jobs a helper polls for the next one without the GIL
    (:func:`_await_job`) for ``_SPIN_SECONDS``, as ONNX Runtime's threads spin between its kernels, and
    only then sleeps on a lock that the caller releases to wake it; the caller waits for its job's end
    without the GIL too (:func:`_await_done`), until the helpers are back to polling, so that neither
    thread waits for the GIL while the other holds it. Each job's task counters are a row of ``counters``
    that a helper can poll; a row is taken again only once its caller is done (``taken``) and no helper is left
    in its job (``inside``), so callers on several threads at once each keep counters of their own.
    The layers of a run post a job every 20-300 us; helpers that slept between jobs, and took the GIL as
    they woke, joined too late for one job in three: on an AMX Xeon, 19 of a ResNet-50 run's 53 fused
    GEMMs ran on the caller alone.
    """

    def __init__(self):
        self._gates: list[threading.Lock] = []
        self._asleep: list[bool] = []  # per helper: blocked on its gate (or about to be), to be released
        self.counters = np.zeros((_SLOTS, 2), np.int64)  # per slot: tasks claimed, tasks finished
        self.inside = np.zeros(_SLOTS, np.int64)  # per slot: helpers in its job's kernel
        self._posted = np.zeros(4, np.int64)  # jobs posted so far, the last one's slot, tasks and helpers
        self.taken = np.zeros(_SLOTS, np.bool_)  # per slot: its caller is still in run_tasks
        self.errors: list[BaseException | None] = [None] * _SLOTS  # per slot: what a helper's task raised
        self._next_slot = 0
        self.helper_polls = self.caller_polls = 0  # polls that take _SPIN_SECONDS and _WAIT_SECONDS here
        self._job: _Job | None = None
        self._lock = threading.Lock()  # callers on several threads take slots and post jobs one at a time
        os.register_at_fork(after_in_child=self._forget_threads)  # a forked child has none of the threads

    def _forget_threads(self) -> None:
        self._gates.clear()
        self._asleep.clear()
        self.inside[:] = 0
        self.taken[:] = False
        self._lock = threading.Lock()  # (held, maybe, by a thread the child does not have)

    def take_slot(self) -> int | None:
        """A slot of counters, zeroed, that no caller has and whose last job no helper is in any more (None if
        every one is in use); :meth:`stop` gives it back."""
        with self._lock:
            for step in range(_SLOTS):
                slot = (self._next_slot + step) % _SLOTS
                if not self.taken[slot] and self.inside[slot] == 0:
                    self._next_slot = slot + 1
                    self.taken[slot] = True
                    self.counters[slot] = 0
                    self.errors[slot] = None
                    return slot
        return None

    def start(self, work, args: tuple, slot: int, tasks: int, count: int) -> None:
        with self._lock:
            if not self.helper_polls:
                self.helper_polls, self.caller_polls = _polls_for(_SPIN_SECONDS), _polls_for(_WAIT_SECONDS)
            while len(self._gates) < count:
                gate = threading.Lock()
                gate.acquire()
                self._gates.append(gate)
                self._asleep.append(False)
                threading.Thread(target=self._serve, args=(len(self._gates) - 1, int(self._posted[0])),
                                 name="tpusim-gemm-helper", daemon=True).start()
            post = int(self._posted[0]) + 1
            self._job = _Job(work, (*args, self.counters[slot]), slot, post, count)
            self._posted[1], self._posted[2], self._posted[3] = slot, tasks, count
            self._posted[0] = post
            for index in range(count):
                if self._asleep[index]:
                    self._asleep[index] = False
                    try:
                        self._gates[index].release()
                    except RuntimeError:  # already open: woken for an earlier job it found by polling
                        pass

    def stop(self, slot: int) -> None:
        """The caller of ``slot`` is done: a helper waking late finds nothing (and keeps no array alive)."""
        with self._lock:
            job = self._job
            if job is not None and job.slot == slot:  # (else another thread's caller has posted since)
                self._job = None
            self.taken[slot] = False

    def _serve(self, index: int, seen: int) -> None:
        gate, left = self._gates[index], -1
        while True:
            found, seen = _await_job(self._posted, self.counters.reshape(-1), self.inside, index, left, seen,
                                     self.helper_polls)
            left = -1
            if not found:
                self._asleep[index] = True
                if self._posted[0] == seen:  # (else a job came between the polls and this line)
                    gate.acquire()
                self._asleep[index] = False
            job = self._job
            if job is None or job.post < seen or (job.post == seen and not found) or index >= job.helpers:
                continue  # (done, or passed over)
            seen, left = job.post, job.slot
            _count_in(self.inside, job.slot)
            try:
                job.work(*job.args)
            except BaseException as exc:  # a task it claimed will never finish: the caller raises this instead
                self.errors[job.slot] = exc


_helpers = _Helpers()
_thread_count_reader: list = []  # Numba's threading-layer counter, bound once that layer is loaded


def thread_count() -> int:
    """``numba.get_num_threads()`` (this thread's count, as ``numba.set_num_threads`` left it), read straight from
    Numba's threading layer once it is loaded: Numba's own function takes two locks on every call, 4-5 us where
    the caches are cold, as a run's kernels leave them between layers (a ResNet-50 run reads it 180 times)."""
    if not _thread_count_reader:
        numba.get_num_threads()  # loads the threading layer
        from numba.np.ufunc import parallel
        _thread_count_reader.append(getattr(parallel, "_get_num_threads", numba.get_num_threads))
    count = _thread_count_reader[0]()
    return count if count > 0 else numba.get_num_threads()  # (Numba's function raises for that)


# Linux's time.sleep(0) sleeps out the timer slack (50-70 us here, 0.7 us for sched_yield); Windows has
# no sched_yield, and its sleep(0) yields.
_yield_core = getattr(os, "sched_yield", None) or (lambda: time.sleep(0))


def run_tasks(work, tasks: int, *args) -> None:
    """work(*args, counters) on this thread and up to ``numba.get_num_threads() - 1`` helpers at once.

    ``work`` is a ``nogil`` kernel that takes task numbers with :func:`claim_task` until they reach
    ``tasks`` and calls :func:`finish_task` after each; every output belongs to one task, so no value
    depends on which thread ran it, or on how many did.
    """
    helpers = min(thread_count(), tasks) - 1
    slot = _helpers.take_slot() if helpers > 0 else None
    if slot is None:
        work(*args, np.zeros(2, np.int64))
        return
    counters = _helpers.counters[slot]
    try:
        _helpers.start(work, args, slot, tasks, helpers)
        work(*args, counters)
        # Only tasks a helper claimed are left, or a helper on its way out of the job, back to polling: a short
        # wait for both without the GIL, then, for the tasks alone, yielding the core (a helper the OS has not
        # run for a while, as on a busy machine, where waiting for it to leave the job took a slice of its core).
        if not _await_done(_helpers.counters.reshape(-1), _helpers.inside, slot, tasks, _helpers.caller_polls):
            while counters[1] < tasks:
                if _helpers.errors[slot] is not None:
                    raise _helpers.errors[slot]
                _yield_core()
    finally:
        _helpers.stop(slot)


@njit(cache=True, nogil=True)
def _grouped_gemm_kernel(x, w, bias64, acc_bits, out, panel, chunks, wrapped, counters):
    """out[g] = wrap(x[g] @ w[g].T + bias64[g]).T for every group g; wrapped[task] = that task's wrapped outputs.

    x is (G, M, K) and w is (G, N, K), both contiguous along K; out is channel-major (G, N, M),
    which for a batch-1 conv is already NCHW. Each (group, chunk of M) is a task of its own, claimed
    from counters (:func:`run_tasks`; the tasks share no output, so threads cannot change any sum).
    Weight rows are taken a panel at a time; every 4-row block of x sweeps the panel in 4 x 4 tiles,
    edge tiles fall back to single dot products.
    """
    groups, m_total, _ = x.shape
    n_total = w.shape[1]
    sums = np.empty((_TILE, _TILE), np.int64)
    task = claim_task(counters)
    while task < groups * chunks:
        g = task // chunks
        m_lo, m_hi = _rows_range(task, chunks, m_total)
        xg, wg, bias_g, out_g = x[g], w[g], bias64[g], out[g]
        task_wrapped = 0
        if n_total < _TILE:  # e.g. depthwise: no full tile anywhere, so skip the tile bookkeeping
            for n in range(n_total):
                for m in range(m_lo, m_hi):
                    exact = _dot(xg[m], wg[n]) + bias_g[n]
                    stored = wrap_to_bits(exact, acc_bits)
                    task_wrapped += stored != exact
                    out_g[n, m] = stored
        else:
            for p0 in range(0, n_total, panel):
                p1 = min(p0 + panel, n_total)
                for m0 in range(m_lo, m_hi, _TILE):
                    rows_here = min(_TILE, m_hi - m0)
                    for n0 in range(p0, p1, _TILE):
                        cols_here = min(_TILE, p1 - n0)
                        if rows_here == _TILE and cols_here == _TILE:
                            _tile_sums(xg, wg, m0, n0, sums)
                        else:
                            _edge_sums(xg, wg, m0, n0, rows_here, cols_here, sums)
                        task_wrapped += _store_tile(sums, rows_here, cols_here, bias_g, acc_bits, out_g, m0, n0)
        wrapped[task] = task_wrapped
        finish_task(counters)
        task = claim_task(counters)


@njit(cache=True, nogil=True)
def _grouped_gemm_vnni_kernel(x, w, bias64, acc_bits, out, panel, chunks, wrapped, counters):
    """_grouped_gemm_kernel for uint8 x and an int32 out on an AVX-512 VNNI CPU: full tiles through vpdpbusd.

    K must be a multiple of 64 (the caller zero-pads it: zero products change no sum) and at
    most _VNNI_CHUNK, so every product sum is exact in int32 before the bias is added in int64.
    """
    groups, m_total, k_total = x.shape
    n_total = w.shape[1]
    blocks = k_total // _VNNI_BLOCK
    half = np.int64(1) << (acc_bits - 1)
    mask = (np.int64(1) << acc_bits) - 1
    task = claim_task(counters)
    while task < groups * chunks:
        g = task // chunks
        m_lo, m_hi = _rows_range(task, chunks, m_total)
        xg, wg, bias_g, out_g = x[g], w[g], bias64[g], out[g]
        task_wrapped = 0
        for p0 in range(0, n_total, panel):
            p1 = min(p0 + panel, n_total)
            for m0 in range(m_lo, m_hi, _TILE):
                rows_here = min(_TILE, m_hi - m0)
                for n0 in range(p0, p1, _TILE):
                    cols_here = min(_TILE, p1 - n0)
                    if rows_here == _TILE and cols_here == _TILE:
                        task_wrapped += _vnni_tile(xg, wg, m0, n0, blocks, bias_g, half, mask, out_g, n0, m0)
                        continue
                    for j in range(cols_here):
                        for i in range(rows_here):
                            exact = _dot(xg[m0 + i], wg[n0 + j]) + bias_g[n0 + j]
                            stored = wrap_to_bits(exact, acc_bits)
                            task_wrapped += stored != exact
                            out_g[n0 + j, m0 + i] = stored
        wrapped[task] = task_wrapped
        finish_task(counters)
        task = claim_task(counters)


@njit(cache=True)
def _requantize_strip(acc, rows, width, multiplier, right, half, zero_point, qmin, qmax, out, m0, c0):
    """out[m0 + i, c0 + j] = clamp(round(acc[i, j] * multiplier / 2**right) + zero_point, qmin, qmax), channel c0 + j.

    The rounding of :func:`tpusim.quant.fixed_point.requantize` (half away from zero), per channel.
    """
    # Slices indexed from 0 let LLVM drop the negative-index wrap and vectorise along the channels.
    scale, bits, rounding = multiplier[c0 : c0 + width], right[c0 : c0 + width], half[c0 : c0 + width]
    for i in range(rows):
        src = acc[i, :width]
        dst = out[m0 + i, c0 : c0 + width]
        for j in range(width):
            dst[j] = requantize_value(src[j], scale[j], bits[j], rounding[j], zero_point, qmin, qmax)


@njit(cache=True, nogil=True)
def _requantized_gemm_kernel(x, w, bias64, acc_bits, multiplier, right, half_r, zero_point, qmin, qmax, out, panel,
                             chunks, wrapped, counters):
    """_grouped_gemm_kernel's sums, requantized a strip of four rows at a time into out (M, G*N)."""
    groups, m_total, _ = x.shape
    n_g = w.shape[1]
    sums = np.empty((_TILE, _TILE), np.int64)
    acc = np.empty((_TILE, panel), np.int32)
    task = claim_task(counters)
    while task < groups * chunks:
        g = task // chunks
        m_lo, m_hi = _rows_range(task, chunks, m_total)
        xg, wg, bias_g = x[g], w[g], bias64[g]
        task_wrapped = 0
        for p0 in range(0, n_g, panel):
            p1 = min(p0 + panel, n_g)
            for m0 in range(m_lo, m_hi, _TILE):
                rows_here = min(_TILE, m_hi - m0)
                for n0 in range(p0, p1, _TILE):
                    cols_here = min(_TILE, p1 - n0)
                    if rows_here == _TILE and cols_here == _TILE:
                        _tile_sums(xg, wg, m0, n0, sums)
                    else:
                        _edge_sums(xg, wg, m0, n0, rows_here, cols_here, sums)
                    for i in range(rows_here):
                        for j in range(cols_here):
                            exact = sums[i, j] + bias_g[n0 + j]
                            stored = wrap_to_bits(exact, acc_bits)
                            task_wrapped += stored != exact
                            acc[i, n0 - p0 + j] = stored
                _requantize_strip(acc, rows_here, p1 - p0, multiplier, right, half_r, zero_point, qmin, qmax,
                                  out, m0, g * n_g + p0)
        wrapped[task] = task_wrapped
        finish_task(counters)
        task = claim_task(counters)


@njit(cache=True, nogil=True)
def _requantized_gemm_vnni_kernel(x, w, bias64, acc_bits, multiplier, right, half_r, zero_point, qmin, qmax, out,
                                  panel, chunks, wrapped, counters):
    """_grouped_gemm_vnni_kernel's sums, requantized a strip of four rows at a time into out (M, G*N)."""
    groups, m_total, k_total = x.shape
    n_g = w.shape[1]
    blocks = k_total // _VNNI_BLOCK
    half = np.int64(1) << (acc_bits - 1)
    mask = (np.int64(1) << acc_bits) - 1
    acc = np.empty((_TILE, panel), np.int32)
    task = claim_task(counters)
    while task < groups * chunks:
        g = task // chunks
        m_lo, m_hi = _rows_range(task, chunks, m_total)
        xg, wg, bias_g = x[g], w[g], bias64[g]
        task_wrapped = 0
        for p0 in range(0, n_g, panel):
            p1 = min(p0 + panel, n_g)
            for m0 in range(m_lo, m_hi, _TILE):
                rows_here = min(_TILE, m_hi - m0)
                for n0 in range(p0, p1, _TILE):
                    cols_here = min(_TILE, p1 - n0)
                    if rows_here == _TILE and cols_here == _TILE:
                        task_wrapped += _vnni_tile_rows(xg, wg, m0, n0, blocks, bias_g, half, mask, acc, 0, n0 - p0)
                        continue
                    for i in range(rows_here):
                        for j in range(cols_here):
                            exact = _dot(xg[m0 + i], wg[n0 + j]) + bias_g[n0 + j]
                            stored = wrap_to_bits(exact, acc_bits)
                            task_wrapped += stored != exact
                            acc[i, n0 - p0 + j] = stored
                _requantize_strip(acc, rows_here, p1 - p0, multiplier, right, half_r, zero_point, qmin, qmax,
                                  out, m0, g * n_g + p0)
        wrapped[task] = task_wrapped
        finish_task(counters)
        task = claim_task(counters)


_ROWS = 6  # pixels per broadcast tile: 6 x 4 accumulators, 4 weight vectors and a broadcast fill 29 of 32 zmm
_VECTORS = 4  # 16-channel weight vectors per broadcast tile
_LANES = _VNNI_BLOCK // 4  # int32 lanes of a zmm: one output channel each
_TILE_CHANNELS = _VECTORS * _LANES


@intrinsic
def _broadcast_tile(typingctx, x, packed, m0, m_last, v0, quads, out, out_col):
    """Raw int32 sums of pixels m0 .. m0 + 5 against channels 16 v0 .. 16 v0 + 63, into out[r, out_col + c].

    packed is (vectors, quads, 64) int8: packed[v, q, 4 l + t] = w[16 v + l, 4 q + t]. Each step over
    four k loads four weight vectors, broadcasts each pixel's four activation bytes to every lane and
    issues 24 vpdpbusd: lane l of accumulator (r, v) sums output channel 16 v + l of pixel m0 + r, so
    nothing is reduced across lanes and the stores are channels-last rows. Pixels past m_last re-read
    pixel m_last (their sums are never used). Sums wrap modulo 2**32: exact while K * 255 * 128 < 2**31.
    """
    sig = types.void(x, packed, m0, m_last, v0, quads, out, out_col)

    def codegen(context, builder, signature, args):
        byte, i32, i64 = ir.IntType(8), ir.IntType(32), ir.IntType(64)
        x_arr, w_arr, out_arr = (context.make_array(signature.args[a])(context, builder, args[a]) for a in (0, 1, 6))
        x_stride = cgutils.unpack_tuple(builder, x_arr.strides, 2)[0]
        out_stride = cgutils.unpack_tuple(builder, out_arr.strides, 2)[0]
        m0, m_last, v0, quads, out_col = args[2], args[3], args[4], args[5], args[7]

        def pixel(r):
            row = builder.add(m0, i64(r))
            row = builder.select(builder.icmp_signed("<", row, m_last), row, m_last)
            return builder.gep(x_arr.data, [builder.mul(row, x_stride)], source_etype=byte)

        pixels = [pixel(r) for r in range(_ROWS)]
        vector_bytes = builder.mul(quads, i64(_VNNI_BLOCK))
        vectors = [builder.gep(w_arr.data, [builder.mul(builder.add(v0, i64(v)), vector_bytes)], source_etype=byte)
                   for v in range(_VECTORS)]
        accs = [[cgutils.alloca_once_value(builder, ir.Constant(_I32X16, None)) for _ in range(_VECTORS)]
                for _ in range(_ROWS)]
        dpbusd = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(_I32X16, [_I32X16, _I8X64, _I8X64]), "llvm.x86.avx512.vpdpbusd.512")
        spread = ir.Constant(ir.VectorType(i32, _LANES), None)
        with cgutils.for_range(builder, quads) as loop:
            w_offset = builder.mul(loop.index, i64(_VNNI_BLOCK))
            x_offset = builder.mul(loop.index, i64(4))
            weights = [builder.load(builder.gep(v, [w_offset], source_etype=byte), typ=_I8X64, align=1)
                       for v in vectors]
            for r in range(_ROWS):
                word = builder.load(builder.bitcast(builder.gep(pixels[r], [x_offset], source_etype=byte),
                                                    i32.as_pointer()), typ=i32, align=1)
                lanes = builder.insert_element(ir.Constant(_I32X16, None), word, i32(0))
                activations = builder.bitcast(builder.shuffle_vector(lanes, lanes, spread), _I8X64)
                for v in range(_VECTORS):
                    acc = accs[r][v]
                    builder.store(builder.call(dpbusd, [builder.load(acc), activations, weights[v]]), acc)
        for r in range(_ROWS):
            row = builder.mul(i64(r), out_stride)
            for v in range(_VECTORS):
                column = builder.mul(builder.add(out_col, i64(v * _LANES)), i64(4))
                target = builder.gep(out_arr.data, [builder.add(row, column)], source_etype=byte)
                builder.store(builder.load(accs[r][v]), builder.bitcast(target, _I32X16.as_pointer()), align=4)
        return context.get_dummy_value()

    return sig, codegen


class _EpilogueRow:
    """What both epilogue intrinsics (:func:`_requantize_lanes`, :func:`_requantize_words`) take from their
    arguments (acc, row, vectors, four constant arrays, zero_point, qmin, qmax, out, out_row, out_col): byte
    addresses in the row of raw sums and the constant arrays, and the clamped, narrowed store of ``lanes``
    outputs at a channel of the output row from out_col."""

    def __init__(self, context, builder, signature, args, lanes: int):
        self.builder, self.byte = builder, ir.IntType(8)
        self.arrays = {a: context.make_array(signature.args[a])(context, builder, args[a]) for a in (0, 3, 4, 5, 6, 10)}
        acc_stride = cgutils.unpack_tuple(builder, self.arrays[0].strides, 2)[0]
        out_stride = cgutils.unpack_tuple(builder, self.arrays[10].strides, 2)[0]
        element = context.get_data_type(signature.args[10].dtype)
        self.stored_type = ir.VectorType(element, lanes)
        self.item_bytes = element.width // 8
        row, out_row, out_col = args[1], args[11], args[12]
        self.acc_row = self.address(0, builder.mul(row, acc_stride))
        self.out_row = self.address(10, builder.add(builder.mul(out_row, out_stride),
                                                    builder.mul(out_col, ir.Constant(out_col.type, self.item_bytes))))

    def address(self, array: int, offset):
        """The byte at ``offset`` of argument ``array``'s data."""
        builder = self.builder
        return builder.gep(builder.bitcast(self.arrays[array].data, self.byte.as_pointer()), [offset],
                           source_etype=self.byte)

    def store(self, channel, value, qmin, qmax) -> None:
        """``value`` clamped to [qmin, qmax] and narrowed to the output's integers, stored from ``channel`` on."""
        builder = self.builder
        value = builder.select(builder.icmp_signed("<", value, qmin), qmin, value)
        value = builder.select(builder.icmp_signed(">", value, qmax), qmax, value)
        target = builder.gep(self.out_row, [builder.mul(channel, ir.Constant(channel.type, self.item_bytes))],
                             source_etype=self.byte)
        builder.store(builder.trunc(value, self.stored_type), builder.bitcast(target, self.stored_type.as_pointer()),
                      align=1)


_I64X16 = ir.VectorType(ir.IntType(64), _LANES)


@intrinsic
def _requantize_lanes(typingctx, acc, row, vectors, bias, multiplier, right, half, zero_point, qmin, qmax, out,
                      out_row, out_col):
    """:func:`requantize_value` of acc[row, c] + bias[c] (raw int32 sums whose biased values fit an int32) into
    out[out_row, out_col + c] for c < 16 vectors, 16 channels a step in explicit <16 x i64> vectors.

    LLVM's loop vectoriser gives the same loop 4-lane ymm steps on CPUs that prefer 256-bit vectors (Ice
    Lake, Sapphire Rapids) and keeps a full 64-bit multiply; here the backend takes zmm registers where the
    CPU has AVX-512 and multiplies the sign-extended int32 operands with ``vpmuldq``. bias, multiplier,
    right and half are int64 arrays indexed from the strip's first channel, with unit stride.
    """
    sig = types.void(acc, row, vectors, bias, multiplier, right, half, zero_point, qmin, qmax, out, out_row, out_col)

    def codegen(context, builder, signature, args):
        i32 = ir.IntType(32)
        epilogue = _EpilogueRow(context, builder, signature, args, _LANES)

        def splat(value):
            lane = builder.insert_element(ir.Constant(_I64X16, None), value, i32(0))
            return builder.shuffle_vector(lane, lane, ir.Constant(ir.VectorType(i32, _LANES), None))

        def narrowed(value):  # an int64 vector whose lanes hold int32 values: sign-extended, so vpmuldq applies
            return builder.sext(builder.trunc(value, _I32X16), _I64X16)

        zero_point, qmin, qmax = (splat(args[a]) for a in (7, 8, 9))
        sign_bit = ir.Constant(_I64X16, [63] * _LANES)
        with cgutils.for_range(builder, args[2]) as loop:
            channel = builder.mul(loop.index, ir.Constant(loop.index.type, _LANES))

            def constants(a):
                target = epilogue.address(a, builder.mul(channel, ir.Constant(channel.type, 8)))
                return builder.load(builder.bitcast(target, _I64X16.as_pointer()), typ=_I64X16, align=8)

            sums = builder.gep(epilogue.acc_row, [builder.mul(channel, ir.Constant(channel.type, 4))],
                               source_etype=epilogue.byte)
            raw = builder.load(builder.bitcast(sums, _I32X16.as_pointer()), typ=_I32X16, align=4)
            stored = narrowed(builder.add(builder.sext(raw, _I64X16), constants(3)))
            product = builder.mul(stored, narrowed(constants(4)))
            rounded = builder.ashr(builder.add(builder.add(product, constants(6)), builder.ashr(product, sign_bit)),
                                   constants(5))
            epilogue.store(channel, builder.add(rounded, zero_point), qmin, qmax)
        return context.get_dummy_value()

    return sig, codegen


@njit(cache=True)
def _finish_strip(acc, rows, width, bias, acc_bits, sums_fit, multiplier, right, half, zero_point, qmin, qmax, out,
                  m0, c0):
    """Bias, wrap and requantize acc[:rows, :width] (raw sums of channels c0..) into out[m0.., c0..]; returns wraps.

    Where ``sums_fit`` (:func:`_sums_fit`: no sum plus its bias can leave the accumulator, of at most 32 bits)
    nothing wraps, so the sum is an int32 as it stands, and its product with the int32 multiplier is one
    32 x 32 -> 64-bit multiply (``vpmuldq``) instead of a full 64-bit one, 16 channels a step
    (:func:`_requantize_lanes`)."""
    wrapped = 0
    # Slices indexed from 0 let LLVM drop the negative-index wrap and vectorise along the channels.
    start, scale = bias[:width], multiplier[c0 : c0 + width]
    bits, rounding = right[c0 : c0 + width], half[c0 : c0 + width]
    if sums_fit:
        vectors = width // _LANES
        for i in range(rows):
            _requantize_lanes(acc, i, vectors, start, scale, bits, rounding, zero_point, qmin, qmax, out, m0 + i, c0)
            src = acc[i, :width]
            dst = out[m0 + i, c0 : c0 + width]
            for j in range(vectors * _LANES, width):
                stored = np.int32(np.int64(src[j]) + start[j])
                dst[j] = requantize_value(stored, np.int32(scale[j]), bits[j], rounding[j], zero_point, qmin, qmax)
        return wrapped
    for i in range(rows):
        src = acc[i, :width]
        dst = out[m0 + i, c0 : c0 + width]
        for j in range(width):
            exact = np.int64(src[j]) + start[j]
            stored = wrap_to_bits(exact, acc_bits)
            wrapped += stored != exact
            dst[j] = requantize_value(stored, scale[j], bits[j], rounding[j], zero_point, qmin, qmax)
    return wrapped


@njit(cache=True, nogil=True)
def _requantized_broadcast_kernel(x, packed, bias64, acc_bits, sums_fit, multiplier, right, half_r, zero_point, qmin,
                                  qmax, out, panel_vectors, chunks, wrapped, counters):
    """The fused GEMM through _broadcast_tile: x (G, M, K) uint8 with K a multiple of 64, packed
    (G, vectors, K / 4, 64) with vectors a multiple of 4. A task is one group's panel of panel_vectors
    weight vectors (it stays in L2) swept by every 6-pixel strip of one chunk of the rows, claimed
    from counters (:func:`run_tasks`)."""
    groups, m_total, k_total = x.shape
    n_g = bias64.shape[1]
    quads = k_total // 4
    vectors = packed.shape[1]
    panels = -(-vectors // panel_vectors)
    tasks = groups * panels * chunks
    acc = np.empty((_ROWS, panel_vectors * _LANES), np.int32)
    task = claim_task(counters)
    while task < tasks:
        g, p, chunk = task // (panels * chunks), task // chunks % panels, task % chunks
        m_lo, m_hi = _rows_range(chunk, chunks, m_total, _ROWS)
        xg, packed_g, bias_g = x[g], packed[g].reshape(vectors, quads * _VNNI_BLOCK), bias64[g]
        v_lo = p * panel_vectors
        v_hi = min(v_lo + panel_vectors, vectors)
        c_lo, c_hi = v_lo * _LANES, min(v_hi * _LANES, n_g)
        task_wrapped = 0
        for m0 in range(m_lo, m_hi, _ROWS):
            for v0 in range(v_lo, v_hi, _VECTORS):
                _broadcast_tile(xg, packed_g, m0, m_hi - 1, v0, quads, acc, (v0 - v_lo) * _LANES)
            task_wrapped += _finish_strip(acc, min(_ROWS, m_hi - m0), c_hi - c_lo, bias_g[c_lo:], acc_bits, sums_fit,
                                          multiplier, right, half_r, zero_point, qmin, qmax, out, m0,
                                          g * n_g + c_lo)
        wrapped[task] = task_wrapped
        finish_task(counters)
        task = claim_task(counters)


# LDTILECFG operands by the rows of a block (row 0 unused): a block past the last full one loads its own.
_TILE_CONFIGS = np.stack([np.zeros(64, np.uint8)] + [amx.tile_config(rows) for rows in range(1, amx.BLOCK_ROWS + 1)])


@njit(cache=True, nogil=True)
def _requantized_amx_kernel(x, packed, bias64, acc_bits, sums_fit, multiplier, right, half_r, zero_point, qmin,
                            qmax, out, panel_vectors, chunks, wrapped, configs, counters):
    """The fused GEMM through AMX tiles (:func:`tpusim.kernels.amx.tile_block`) on the broadcast kernel's
    operands and tasks: a task is one group's panel of weight vectors swept by every 32-pixel strip of one
    chunk of the rows; the strip's int32 sums go to acc, then through the same epilogue."""
    groups, m_total, k_total = x.shape
    n_g = bias64.shape[1]
    quads = k_total // 4
    vectors = packed.shape[1]
    panels = -(-vectors // panel_vectors)
    tasks = groups * panels * chunks
    acc = np.empty((amx.BLOCK_ROWS, panel_vectors * _LANES), np.int32)
    configured = 0  # the rows of the tile config this thread has loaded
    task = claim_task(counters)
    while task < tasks:
        g, p, chunk = task // (panels * chunks), task // chunks % panels, task % chunks
        m_lo, m_hi = _rows_range(chunk, chunks, m_total, amx.BLOCK_ROWS)
        xg, packed_g, bias_g = x[g], packed[g].reshape(vectors, quads * _VNNI_BLOCK), bias64[g]
        v_lo = p * panel_vectors
        v_hi = min(v_lo + panel_vectors, vectors)
        c_lo, c_hi = v_lo * _LANES, min(v_hi * _LANES, n_g)
        task_wrapped = 0
        for m0 in range(m_lo, m_hi, amx.BLOCK_ROWS):
            rows = min(amx.BLOCK_ROWS, m_hi - m0)
            if rows != configured:
                amx.load_tile_config(configs[rows])
                configured = rows
            for v0 in range(v_lo, v_hi, amx.BLOCK_VECTORS):
                amx.tile_block(xg, packed_g, m0, np.int64(rows > amx.TILE_ROWS), v0, quads, acc, (v0 - v_lo) * _LANES)
            task_wrapped += _finish_strip(acc, rows, c_hi - c_lo, bias_g[c_lo:], acc_bits, sums_fit, multiplier, right,
                                          half_r, zero_point, qmin, qmax, out, m0, g * n_g + c_lo)
        wrapped[task] = task_wrapped
        finish_task(counters)
        task = claim_task(counters)
    if configured:
        amx.release_tiles()


def pack_broadcast_weights_reference(w_nk: np.ndarray, k_padded: int) -> np.ndarray:
    """(G, N, K) -> (G, vectors, K' / 4, 64), K' = ``k_padded``: 16 channels x 4 k per 64 bytes, channels
    zero-padded to whole tiles and K to K'. Numpy oracle of :func:`_packed_weights`."""
    groups, n_g, k_total = w_nk.shape
    vectors = -(-n_g // _TILE_CHANNELS) * _VECTORS
    padded = np.zeros((groups, vectors * _LANES, k_padded), np.int8)
    padded[:, :n_g, :k_total] = w_nk
    return np.ascontiguousarray(padded.reshape(groups, vectors, _LANES, k_padded // 4, 4).transpose(0, 1, 3, 2, 4)
                                .reshape(groups, vectors, k_padded // 4, _VNNI_BLOCK))


@njit(cache=True, nogil=True)
def _packed_weights(w_nk, out):
    """out[g, v, b, 4 l + t] = w_nk[g, 16 v + l, 4 b + t], zero past w_nk's channels and K: the layout of
    :func:`pack_broadcast_weights_reference` in one pass (numpy's zero fill, copy and transposing copy took
    VGG-11's 4096 x 25088 classifier 0.14 s, this with the bias shift 0.08 s)."""
    groups, n_g, k_total = w_nk.shape
    vectors, blocks = out.shape[1], out.shape[2]
    for g in range(groups):
        for v in range(vectors):
            for lane in range(_LANES):
                c = v * _LANES + lane
                row = w_nk[g, min(c, n_g - 1)]
                for b in range(blocks):
                    target = out[g, v, b, 4 * lane : 4 * lane + 4]
                    for t in range(4):
                        k = 4 * b + t
                        target[t] = row[k] if c < n_g and k < k_total else 0


_PAIR_ROWS = 6  # pixels per pair tile: 6 x 2 accumulators, 2 weight vectors and a broadcast fill 15 of 16 ymm
_PAIR_VECTORS = 2  # 8-channel weight vectors per pair tile
_PAIR_LANES = 8  # int32 lanes of a ymm: one output channel each
_PAIR_CHANNELS = _PAIR_VECTORS * _PAIR_LANES
_PAIR_PANEL_BYTES = 128 * 1024  # packed int8 weights a pair-tile panel holds: a quarter of a Zen 2 core's L2
_I8X16 = ir.VectorType(ir.IntType(8), 2 * _PAIR_LANES)
_I16X16 = ir.VectorType(ir.IntType(16), 2 * _PAIR_LANES)
_I32X8 = ir.VectorType(ir.IntType(32), _PAIR_LANES)
_pairs_compile = [True]  # set False for good once the AVX2 intrinsic fails to compile here


@intrinsic
def _pair_tile(typingctx, xs, packed, v0, pairs, out, out_col):
    """Raw int32 sums of the six widened pixels xs[0..5] against channels 8 v0 .. 8 v0 + 15, into out[r, out_col + c].

    xs is (6, 2 pairs) int16 (the pixels' activations, exact for int8 and uint8); packed is (vectors, pairs, 16)
    int8: packed[v, p, 2 l + t] = w[8 v + l, 2 p + t]. Each step over two k sign-extends the two weight vectors
    to int16, broadcasts each pixel's two activations to every lane and issues 12 vpmaddwd (two exact products
    per int32 lane) and adds: lane l of accumulator (r, v) sums output channel 8 v + l of pixel r, so nothing is
    reduced across lanes and the stores are channels-last rows. Sums wrap modulo 2**32: exact while
    K * 255 * 128 < 2**31.
    """
    sig = types.void(xs, packed, v0, pairs, out, out_col)

    def codegen(context, builder, signature, args):
        byte, i32, i64 = ir.IntType(8), ir.IntType(32), ir.IntType(64)
        x_arr, w_arr, out_arr = (context.make_array(signature.args[a])(context, builder, args[a]) for a in (0, 1, 4))
        x_stride = cgutils.unpack_tuple(builder, x_arr.strides, 2)[0]
        out_stride = cgutils.unpack_tuple(builder, out_arr.strides, 2)[0]
        v0, pairs, out_col = args[2], args[3], args[5]
        x_bytes = builder.bitcast(x_arr.data, byte.as_pointer())
        w_bytes = builder.bitcast(w_arr.data, byte.as_pointer())
        pixels = [builder.gep(x_bytes, [builder.mul(i64(r), x_stride)]) for r in range(_PAIR_ROWS)]
        vector_bytes = builder.mul(pairs, i64(2 * _PAIR_LANES))
        vectors = [builder.gep(w_bytes, [builder.mul(builder.add(v0, i64(v)), vector_bytes)])
                   for v in range(_PAIR_VECTORS)]
        accs = [[cgutils.alloca_once_value(builder, ir.Constant(_I32X8, None)) for _ in range(_PAIR_VECTORS)]
                for _ in range(_PAIR_ROWS)]
        madd = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(_I32X8, [_I16X16, _I16X16]), "llvm.x86.avx2.pmadd.wd")
        spread = ir.Constant(ir.VectorType(i32, _PAIR_LANES), None)
        with cgutils.for_range(builder, pairs) as loop:
            w_offset = builder.mul(loop.index, i64(2 * _PAIR_LANES))
            x_offset = builder.mul(loop.index, i64(4))
            weights = [builder.sext(builder.load(builder.bitcast(builder.gep(v, [w_offset]), _I8X16.as_pointer()),
                                                 align=1), _I16X16) for v in vectors]
            for r in range(_PAIR_ROWS):
                word = builder.load(builder.bitcast(builder.gep(pixels[r], [x_offset]), i32.as_pointer()), align=2)
                lanes = builder.insert_element(ir.Constant(_I32X8, None), word, i32(0))
                activations = builder.bitcast(builder.shuffle_vector(lanes, lanes, spread), _I16X16)
                for v in range(_PAIR_VECTORS):
                    acc = accs[r][v]
                    builder.store(builder.add(builder.load(acc), builder.call(madd, [activations, weights[v]])), acc)
        out_bytes = builder.bitcast(out_arr.data, byte.as_pointer())
        for r in range(_PAIR_ROWS):
            row = builder.mul(i64(r), out_stride)
            for v in range(_PAIR_VECTORS):
                column = builder.mul(builder.add(out_col, i64(v * _PAIR_LANES)), i64(4))
                target = builder.gep(out_bytes, [builder.add(row, column)])
                builder.store(builder.load(accs[r][v]), builder.bitcast(target, _I32X8.as_pointer()), align=4)
        return context.get_dummy_value()

    return sig, codegen


_I64X8 = ir.VectorType(ir.IntType(64), _PAIR_LANES)


@intrinsic
def _requantize_words(typingctx, acc, row, vectors, bias, multiplier, low_right, half, zero_point, qmin, qmax, out,
                      out_row, out_col):
    """:func:`requantize_value` of acc[row, c] + bias[c] into out[out_row, out_col + c] for c < 8 vectors, 8
    channels a step, where the biased sums fit an int32 and every right shift is 32 to 63.

    Then round(p / 2**right) = ((p + half - [p < 0]) >> 32) >> (right - 32), both shifts flooring: only the
    product and its rounding term need 64-bit lanes (``vpmuldq`` on the sign-extended int32 operands), and the
    rest (the shift, ``vpsravd``, zero point, clamp, narrowing) runs on int32 lanes, twice as many a register;
    AVX2 has no 64-bit arithmetic shift, which :func:`_requantize_lanes` spends several instructions a lane on
    there. bias, multiplier, low_right (right - 32) are int32 arrays and half an int64 array, indexed from the
    strip's first channel, with unit stride.
    """
    sig = types.void(acc, row, vectors, bias, multiplier, low_right, half, zero_point, qmin, qmax, out, out_row,
                     out_col)

    def codegen(context, builder, signature, args):
        i32 = ir.IntType(32)
        epilogue = _EpilogueRow(context, builder, signature, args, _PAIR_LANES)

        def splat(value):
            lane = builder.insert_element(ir.Constant(_I32X8, None), builder.trunc(value, i32), i32(0))
            return builder.shuffle_vector(lane, lane, ir.Constant(ir.VectorType(i32, _PAIR_LANES), None))

        zero_point, qmin, qmax = (splat(args[a]) for a in (7, 8, 9))
        sign_bit = ir.Constant(_I64X8, [63] * _PAIR_LANES)
        high_word = ir.Constant(_I64X8, [32] * _PAIR_LANES)
        with cgutils.for_range(builder, args[2]) as loop:
            channel = builder.mul(loop.index, ir.Constant(loop.index.type, _PAIR_LANES))

            def load(base, vector_type, width):
                target = builder.gep(base, [builder.mul(channel, ir.Constant(channel.type, width))],
                                     source_etype=epilogue.byte)
                return builder.load(builder.bitcast(target, vector_type.as_pointer()), typ=vector_type, align=width)

            def constants(a, vector_type, width):
                return load(epilogue.address(a, channel.type(0)), vector_type, width)

            stored = builder.add(load(epilogue.acc_row, _I32X8, 4), constants(3, _I32X8, 4))
            product = builder.mul(builder.sext(stored, _I64X8), builder.sext(constants(4, _I32X8, 4), _I64X8))
            rounding = builder.add(constants(6, _I64X8, 8), builder.ashr(product, sign_bit))
            high = builder.trunc(builder.lshr(builder.add(product, rounding), high_word), _I32X8)
            epilogue.store(channel, builder.add(builder.ashr(high, constants(5, _I32X8, 4)), zero_point), qmin, qmax)
        return context.get_dummy_value()

    return sig, codegen


@njit(cache=True)
def _finish_words_strip(acc, rows, width, bias, multiplier, low_right, half, zero_point, qmin, qmax, out, m0, c0):
    """:func:`_finish_strip` where the sums fit and every right shift is 32 to 63 (:func:`_word_constants`),
    through :func:`_requantize_words`; bias, multiplier and low_right are int32."""
    start, scale = bias[:width], multiplier[c0 : c0 + width]
    low, rounding = low_right[c0 : c0 + width], half[c0 : c0 + width]
    vectors = width // _PAIR_LANES
    for i in range(rows):
        _requantize_words(acc, i, vectors, start, scale, low, rounding, zero_point, qmin, qmax, out, m0 + i, c0)
        src = acc[i, :width]
        dst = out[m0 + i, c0 : c0 + width]
        for j in range(vectors * _PAIR_LANES, width):
            stored = np.int32(np.int64(src[j]) + start[j])
            dst[j] = requantize_value(stored, scale[j], np.int64(low[j]) + 32, rounding[j], zero_point, qmin, qmax)


_NO_WORD_CONSTANTS = (np.zeros((1, 0), np.int32), np.zeros(0, np.int32), np.zeros(0, np.int32))  # words off


def _word_constants(bias64: np.ndarray, multiplier: np.ndarray,
                    right: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """The int32 bias, multiplier and right shift less 32 of :func:`_finish_words_strip`, or None where a right
    shift lies outside 32..63 (callers have checked that the sums and multipliers fit, :func:`_sums_fit`)."""
    if int(right.min()) < 32 or int(right.max()) > 63:
        return None
    return bias64.astype(np.int32), multiplier.astype(np.int32), (right - 32).astype(np.int32)


@njit(cache=True, nogil=True)
def _requantized_pair_kernel(x, packed, bias64, acc_bits, sums_fit, multiplier, right, half_r, zero_point, qmin,
                             qmax, out, panel_vectors, chunks, wrapped, words, bias32, multiplier32, low_right,
                             counters):
    """The fused GEMM through _pair_tile: x (G, M, K) int8 or uint8, packed (G, vectors, ceil(K / 2), 16) with
    vectors a multiple of 2. A task is one group's panel of panel_vectors weight vectors (it stays in L2) swept
    by every 6-pixel strip of one chunk of the rows, claimed from counters (:func:`run_tasks`); each strip's
    activations are widened to int16 once per panel (a K that is odd ends in a zero pair). With ``words`` (the
    sums fit and :func:`_word_constants` gave bias32, multiplier32 and low_right) the epilogue is
    :func:`_finish_words_strip`."""
    groups, m_total, k_total = x.shape
    n_g = bias64.shape[1]
    pairs = packed.shape[2]
    vectors = packed.shape[1]
    panels = -(-vectors // panel_vectors)
    tasks = groups * panels * chunks
    acc = np.empty((_PAIR_ROWS, panel_vectors * _PAIR_LANES), np.int32)
    widened = np.zeros((_PAIR_ROWS, 2 * pairs), np.int16)
    task = claim_task(counters)
    while task < tasks:
        g, p, chunk = task // (panels * chunks), task // chunks % panels, task % chunks
        m_lo, m_hi = _rows_range(chunk, chunks, m_total, _PAIR_ROWS)
        xg, packed_g, bias_g = x[g], packed[g], bias64[g]
        v_lo = p * panel_vectors
        v_hi = min(v_lo + panel_vectors, vectors)
        c_lo, c_hi = v_lo * _PAIR_LANES, min(v_hi * _PAIR_LANES, n_g)
        task_wrapped = 0
        for m0 in range(m_lo, m_hi, _PAIR_ROWS):
            rows = min(_PAIR_ROWS, m_hi - m0)
            for r in range(rows):  # rows past the last pixel keep stale values: their sums are never read
                source, target = xg[m0 + r], widened[r, :k_total]
                for k in range(k_total):
                    target[k] = source[k]
            for v0 in range(v_lo, v_hi, _PAIR_VECTORS):
                _pair_tile(widened, packed_g, v0, pairs, acc, (v0 - v_lo) * _PAIR_LANES)
            if words:
                _finish_words_strip(acc, rows, c_hi - c_lo, bias32[g, c_lo:], multiplier32, low_right, half_r,
                                    zero_point, qmin, qmax, out, m0, g * n_g + c_lo)
            else:
                task_wrapped += _finish_strip(acc, rows, c_hi - c_lo, bias_g[c_lo:], acc_bits, sums_fit, multiplier,
                                              right, half_r, zero_point, qmin, qmax, out, m0, g * n_g + c_lo)
        wrapped[task] = task_wrapped
        finish_task(counters)
        task = claim_task(counters)


def _pack_pair_weights(w_nk: np.ndarray) -> np.ndarray:
    """(G, N, K) -> (G, vectors, ceil(K / 2), 16): 8 channels x 2 k per 16 bytes, channels zero-padded to whole
    tiles and K to whole pairs."""
    groups, n_g, k_total = w_nk.shape
    vectors = -(-n_g // _PAIR_CHANNELS) * _PAIR_VECTORS
    pairs = -(-k_total // 2)
    padded = np.zeros((groups, vectors * _PAIR_LANES, 2 * pairs), np.int8)
    padded[:, :n_g, :k_total] = w_nk
    return np.ascontiguousarray(padded.reshape(groups, vectors, _PAIR_LANES, pairs, 2).transpose(0, 1, 3, 2, 4)
                                .reshape(groups, vectors, pairs, 2 * _PAIR_LANES))


def _sums_fit(bias: np.ndarray, k_total: int, x_dtype: np.dtype, acc_bits: int, multiplier: np.ndarray) -> bool:
    """No sum of k_total products of x_dtype activations and int8 weights, plus its bias, can leave an acc_bits
    accumulator, and every multiplier is an int32: the condition of :func:`_finish_strip`'s shortcut."""
    info = np.iinfo(x_dtype)
    products = [x * w for x in (int(info.min), int(info.max)) for w in (-128, 127)]
    lowest = int(bias.min(initial=0)) + k_total * min(products)
    highest = int(bias.max(initial=0)) + k_total * max(products)
    return (acc_bits <= 32 and -(1 << (acc_bits - 1)) <= lowest and highest < 1 << (acc_bits - 1)
            and 0 <= int(multiplier.min()) and int(multiplier.max()) < 1 << 31)


def _broadcast_fits(n_g: int, m_total: int) -> bool:
    """The broadcast tile for channel counts that whole 64-channel tiles waste little of, and enough pixels."""
    return 4 * -(-n_g // _TILE_CHANNELS) * _TILE_CHANNELS <= 5 * n_g and m_total >= _ROWS


def _pair_tiles_run(k_total: int, n_g: int, acc_bits: int, use_avx2: bool) -> bool:
    """The vpmaddwd kernel's limits: int32 accumulators, sums that cannot overflow them, and channel counts that
    whole 16-channel tiles waste little of."""
    return use_avx2 and _pairs_compile[0] and acc_bits <= 32 and k_total <= _INT32_SAFE_TERMS and \
        4 * -(-n_g // _PAIR_CHANNELS) * _PAIR_CHANNELS <= 5 * n_g


_THINNEST_CHUNK = 6 * _TILE  # rows of a row chunk at the least, unless a kernel's blocks are taller


def _row_chunks(m_total: int, other_tasks: int = 1, thinnest: int = _THINNEST_CHUNK) -> int:
    """Chunks the rows are cut into for each of other_tasks (groups, weight panels): one on one thread, else
    enough for four tasks per thread (claimed one at a time, see :func:`run_tasks`), none thinner than
    ``thinnest`` rows (a few tiles)."""
    threads = thread_count()
    wanted = 1 if threads == 1 else -(-4 * threads // other_tasks)
    return max(1, min(wanted, m_total // thinnest))


def check_grouped_operands(x: np.ndarray, w_nk: np.ndarray, bias: np.ndarray | None, acc_bits: int) -> None:
    """Raise ValueError unless x is (G,M,K) int8/uint8, w_nk is (G,N,K) int8, bias is (G*N,) int32."""
    if x.ndim != 3 or x.dtype not in (np.int8, np.uint8):
        raise ValueError(f"x must be a 3-D int8 or uint8 array, got {x.dtype} {x.shape}")
    if w_nk.ndim != 3 or w_nk.dtype != np.int8:
        raise ValueError(f"w_nk must be a 3-D int8 array, got {w_nk.dtype} {w_nk.shape}")
    if x.shape[0] != w_nk.shape[0] or x.shape[2] != w_nk.shape[2]:
        raise ValueError(f"groups or inner dimensions differ: x {x.shape} vs w_nk {w_nk.shape}")
    n_total = w_nk.shape[0] * w_nk.shape[1]
    if bias is not None and (bias.dtype != np.int32 or bias.shape != (n_total,)):
        raise ValueError(f"bias must be int32 of shape ({n_total},), got {bias.dtype} {bias.shape}")
    if not 2 <= acc_bits <= 64:
        raise ValueError(f"acc_bits must be in [2, 64], got {acc_bits}")


def _vnni_runs(k_total: int, n_g: int, acc_bits: int, use_vnni: bool) -> bool:
    """Worth it for int32 accumulators, tiles of several weight rows and K that padding does not more than double."""
    k_padded = -(-k_total // _VNNI_BLOCK) * _VNNI_BLOCK
    return use_vnni and _vnni_compiles[0] and acc_bits <= 32 and n_g >= _TILE and k_padded <= min(2 * k_total,
                                                                                                   _VNNI_CHUNK)


def vnni_depth(k_total: int, n_g: int, acc_bits: int, use_vnni: bool = HAS_VNNI) -> int:
    """K as the vpdpbusd kernel takes it (whole 64-byte blocks) where it will run, else K: operands
    built this deep (zero-filled) need no padding copy."""
    return -(-k_total // _VNNI_BLOCK) * _VNNI_BLOCK if _vnni_runs(k_total, n_g, acc_bits, use_vnni) else k_total


def _vnni_operands(x: np.ndarray, w_nk: np.ndarray, bias64: np.ndarray, acc_bits: int, use_vnni: bool):
    """(x, w, bias) as the vpdpbusd kernel takes them, or None where the portable kernel should run.

    vpdpbusd takes unsigned activations: int8 x + 128 (its bits are x's with the top one flipped)
    fits uint8, and sum (x + 128) w = sum x w + 128 sum w, so the exact bias absorbs the shift. K is
    zero-padded to whole 64-byte blocks (zero products change no sum).
    """
    groups, n_g, k_total = w_nk.shape
    if not _vnni_runs(k_total, n_g, acc_bits, use_vnni):
        return None
    k_padded = vnni_depth(k_total, n_g, acc_bits, use_vnni)
    if x.dtype == np.int8:
        bias64 = bias64 - 128 * w_nk.sum(axis=2, dtype=np.int64)
        x = x.view(np.uint8) ^ np.uint8(0x80)
    if k_padded != k_total:
        x = np.concatenate([x, np.zeros((*x.shape[:2], k_padded - k_total), np.uint8)], axis=2)
        w_nk = np.concatenate([w_nk, np.zeros((groups, n_g, k_padded - k_total), np.int8)], axis=2)
    return np.ascontiguousarray(x), np.ascontiguousarray(w_nk), bias64


def _run_kernels(vnni_kernel, portable_kernel, x, w_nk, bias64, acc_bits, use_vnni, *args) -> int:
    """The vpdpbusd kernel where it applies and compiles, else the portable one; returns the wrapped count."""
    chunks = _row_chunks(x.shape[1], x.shape[0])
    wrapped = np.zeros(x.shape[0] * chunks, np.int64)
    operands = _vnni_operands(x, w_nk, bias64, acc_bits, use_vnni)
    if operands is not None:
        try:
            run_tasks(vnni_kernel, wrapped.size, *operands, acc_bits, *args,
                      _panel_rows(operands[1].shape[2], w_nk.shape[1]), chunks, wrapped)
            return int(wrapped.sum())
        except (numba.core.errors.NumbaError, RuntimeError) as exc:
            # The intrinsic's signature follows the LLVM inside llvmlite; another LLVM may refuse it.
            _vnni_compiles[0] = False
            warnings.warn(f"AVX-512 VNNI int8 kernel unavailable ({type(exc).__name__}); using the portable kernel")
    run_tasks(portable_kernel, wrapped.size, np.ascontiguousarray(x), np.ascontiguousarray(w_nk), bias64, acc_bits,
              *args, _panel_rows(w_nk.shape[2], w_nk.shape[1]), chunks, wrapped)
    return int(wrapped.sum())


def _bias64(bias: np.ndarray | None, groups: int, n_g: int) -> np.ndarray:
    return np.zeros((groups, n_g), np.int64) if bias is None else bias.astype(np.int64).reshape(groups, n_g)


def grouped_int8_gemm(x: np.ndarray, w_nk: np.ndarray, acc_bits: int = 32, bias: np.ndarray | None = None,
                      use_vnni: bool = HAS_VNNI) -> GemmResult:
    """Per group g: x[g] (M,K) int8/uint8 times w_nk[g].T, weights stored (N,K) like OIHW rows.

    bias is (G*N,) int32, group-major. The result is a (G, M, N) view of a channel-major
    (G, N, M) array, so a batch-1 conv needs no transpose to NCHW. ``use_vnni`` picks the
    vpdpbusd kernel (only where the CPU has it; tests turn it off to check the portable kernel too).
    """
    check_grouped_operands(x, w_nk, bias, acc_bits)
    groups, n_g, _ = w_nk.shape
    out = np.empty((groups, n_g, x.shape[1]), result_dtype(acc_bits))
    wrapped = _run_kernels(_grouped_gemm_vnni_kernel, _grouped_gemm_kernel, x, w_nk, _bias64(bias, groups, n_g),
                           acc_bits, use_vnni, out)
    return GemmResult(out.transpose(0, 2, 1), wrapped)


def requantized_int8_gemm(x: np.ndarray, w_nk: np.ndarray, bias: np.ndarray | None, acc_bits: int, m0: np.ndarray,
                          shift: np.ndarray, zero_point: int, qmin: int, qmax: int, out_dtype: np.dtype,
                          use_vnni: bool = HAS_VNNI, use_avx2: bool = HAS_AVX2,
                          use_amx: bool = HAS_AMX) -> tuple[np.ndarray, int]:
    """:func:`grouped_int8_gemm` with the activation unit's requantization fused in: (M, G*N) integers, wrapped count.

    Row m of the result holds all G*N output channels of pixel m (channels-last, group-major), each
    ``requantize(wrap(x[g, m] . w_nk[g, n] + bias), m0, shift, zero_point, qmin, qmax)`` exactly as
    :func:`tpusim.quant.fixed_point.requantize` computes it (m0, shift: one entry or one per channel).
    Each strip of rows is requantized while its int32 sums are still in L1, so no int32 tensor is
    written. acc_bits must be at most 32 (the activation unit reads int32). A caller that runs the
    same weights again builds a :class:`RequantizedGemm` once instead.
    """
    check_grouped_operands(x, w_nk, bias, acc_bits)
    return RequantizedGemm(w_nk, bias, acc_bits, m0, shift, zero_point, qmin, qmax, out_dtype, x.dtype, use_vnni,
                           use_avx2, use_amx)(x)


class RequantizedGemm:
    """:func:`requantized_int8_gemm` for one weight array, bias, requantization and activation dtype,
    prepared once (checks, per-channel constants, packed weights, the bias as the kernel takes it):
    a call on activations x (G, M, K) then only allocates the output and runs the kernel."""

    def __init__(self, w_nk: np.ndarray, bias: np.ndarray | None, acc_bits: int, m0: np.ndarray, shift: np.ndarray,
                 zero_point: int, qmin: int, qmax: int, out_dtype: np.dtype, x_dtype: np.dtype,
                 use_vnni: bool = HAS_VNNI, use_avx2: bool = HAS_AVX2, use_amx: bool = HAS_AMX):
        check_grouped_operands(np.empty((w_nk.shape[0], 0, w_nk.shape[2]), x_dtype), w_nk, bias, acc_bits)
        if acc_bits > 32:
            raise ValueError(f"the fused requantization reads int32 accumulators; acc_bits={acc_bits}")
        groups, n_g, k_total = w_nk.shape
        n_total = groups * n_g
        m0 = np.asarray(m0).reshape(-1)
        shift = np.asarray(shift).reshape(-1)
        if m0.shape != shift.shape or m0.size not in (1, n_total):
            raise ValueError(f"m0 {m0.shape} and shift {shift.shape} must have 1 or {n_total} entries")
        self._w_nk, self._acc_bits, self._use_vnni, self._use_amx = w_nk, acc_bits, use_vnni, use_amx
        self._x_dtype, self._out_dtype = np.dtype(x_dtype), np.dtype(out_dtype)
        self._requant = (*requantize_constants(m0, shift, n_total), np.int64(zero_point), np.int64(qmin),
                         np.int64(qmax))
        self._bias64 = _bias64(bias, groups, n_g)
        # (packed weights, bias for uint8 activations, K padded, panel, tasks per row chunk, the sums fit)
        self._broadcast = None
        if _vnni_runs(k_total, n_g, acc_bits, use_vnni):
            k_padded = vnni_depth(k_total, n_g, acc_bits, use_vnni)
            packed, shift_bias = derived_from(w_nk, ("broadcast", w_nk.shape, k_padded),
                                              lambda: _broadcast_operands(w_nk, k_padded))
            bias_u8 = self._bias64 + shift_bias if self._x_dtype == np.int8 else self._bias64
            panel = max(_VECTORS, _BROADCAST_PANEL_BYTES // (k_padded * _LANES) // _VECTORS * _VECTORS)
            self._broadcast = (packed, bias_u8, k_padded, panel, groups * -(-packed.shape[1] // panel),
                               _sums_fit(bias_u8, k_total, np.dtype(np.uint8), acc_bits, self._requant[0]))
        # (packed weights, panel, tasks per row chunk, int32 epilogue constants or None, the sums fit) where vpmaddwd
        # tiles run instead
        self._pairs = None
        if self._broadcast is None and _pair_tiles_run(k_total, n_g, acc_bits, use_avx2):
            packed = derived_from(w_nk, ("pairs", w_nk.shape), lambda: _pack_pair_weights(w_nk))
            panel = max(_PAIR_VECTORS, _PAIR_PANEL_BYTES // (packed.shape[2] * 2 * _PAIR_LANES)
                        // _PAIR_VECTORS * _PAIR_VECTORS)
            sums_fit = _sums_fit(self._bias64, k_total, self._x_dtype, acc_bits, self._requant[0])
            words = _word_constants(self._bias64, *self._requant[:2]) if sums_fit else None
            self._pairs = (packed, panel, groups * -(-packed.shape[1] // panel), words, sums_fit)

    def __call__(self, x: np.ndarray) -> tuple[np.ndarray, int]:
        """(M, G*N) output integers and the wrapped count for x (G, M, K) of the dtype given at construction."""
        w_nk = self._w_nk
        if x.dtype != self._x_dtype or x.ndim != 3 or x.shape[0] != w_nk.shape[0] or x.shape[2] != w_nk.shape[2]:
            raise ValueError(f"x must be {self._x_dtype} (G, M, K) like w_nk {w_nk.shape}, got {x.dtype} {x.shape}")
        m_total = x.shape[1]
        out = np.empty((m_total, w_nk.shape[0] * w_nk.shape[1]), self._out_dtype)
        if self._broadcast is not None and _vnni_compiles[0] and _broadcast_fits(w_nk.shape[1], m_total):
            packed, bias_u8, k_padded, panel, other_tasks, sums_fit = self._broadcast
            xb = x.view(np.uint8) ^ np.uint8(0x80) if x.dtype == np.int8 else x
            if k_padded != w_nk.shape[2]:
                xb = np.concatenate([xb, np.zeros((*x.shape[:2], k_padded - w_nk.shape[2]), np.uint8)], axis=2)
            operands = (np.ascontiguousarray(xb), packed, bias_u8, self._acc_bits, sums_fit, *self._requant, out, panel)
            if self._use_amx and _amx_compiles[0] and amx_ready():
                wrapped = _fused_run(_requantized_amx_kernel, _amx_compiles, "AMX", "AVX-512 VNNI", m_total,
                                     other_tasks, amx.BLOCK_ROWS, operands, (_TILE_CONFIGS,))
                if wrapped is not None:
                    return out, wrapped
            wrapped = _fused_run(_requantized_broadcast_kernel, _vnni_compiles, "AVX-512 VNNI", "portable", m_total,
                                 other_tasks, _THINNEST_CHUNK, operands)
            if wrapped is not None:
                return out, wrapped
        if self._pairs is not None and _pairs_compile[0] and m_total >= _PAIR_ROWS:
            packed, panel, other_tasks, words, sums_fit = self._pairs
            operands = (np.ascontiguousarray(x), packed, self._bias64, self._acc_bits, sums_fit, *self._requant, out,
                        panel)
            epilogue = (True, *words) if sums_fit and words is not None else (False, *_NO_WORD_CONSTANTS)
            wrapped = _fused_run(_requantized_pair_kernel, _pairs_compile, "AVX2", "portable", m_total, other_tasks,
                                 _THINNEST_CHUNK, operands, epilogue)
            if wrapped is not None:
                return out, wrapped
        wrapped = _run_kernels(_requantized_gemm_vnni_kernel, _requantized_gemm_kernel, x, w_nk, self._bias64,
                               self._acc_bits, self._use_vnni, *self._requant, out)
        return out, wrapped


def _fused_run(kernel, compiles: list[bool], name: str, fallback: str, m_total: int, other_tasks: int,
               thinnest: int, operands: tuple, extra: tuple = ()) -> int | None:
    """One fused kernel over other_tasks x row chunks (:func:`_row_chunks`): its wrapped count, or None where
    it does not compile here (``compiles`` then says so for good, and a warning names the kernel taking over)."""
    chunks = _row_chunks(m_total, other_tasks, thinnest)
    wrapped = np.zeros(other_tasks * chunks, np.int64)
    try:
        run_tasks(kernel, wrapped.size, *operands, chunks, wrapped, *extra)
    except (numba.core.errors.NumbaError, RuntimeError) as exc:
        compiles[0] = False
        warnings.warn(f"{name} int8 kernel unavailable ({type(exc).__name__}); using the {fallback} kernel")
        return None
    return int(wrapped.sum())


def _broadcast_operands(w_nk: np.ndarray, k_padded: int) -> tuple[np.ndarray, np.ndarray]:
    """Packed, K-padded weights and the bias shift that int8 activations moved to uint8 need (-128 sum_k w)."""
    groups, n_g, _ = w_nk.shape
    packed = np.empty((groups, -(-n_g // _TILE_CHANNELS) * _VECTORS, k_padded // 4, _VNNI_BLOCK), np.int8)
    _packed_weights(np.ascontiguousarray(w_nk), packed)
    return packed, -128 * w_nk.sum(axis=2, dtype=np.int64)


def int8_gemm(x: np.ndarray, w: np.ndarray, acc_bits: int = 32, bias: np.ndarray | None = None) -> GemmResult:
    """x (M,K) int8/uint8 times w (K,N) int8, plus optional int32 bias, in an acc_bits accumulator."""
    check_operands(x, w, bias, acc_bits)
    result = grouped_int8_gemm(x[None], np.ascontiguousarray(w.T)[None], acc_bits, bias)
    return GemmResult(np.ascontiguousarray(result.result[0]), result.wrapped_count)


def wrap_reference(exact: np.ndarray, acc_bits: int) -> np.ndarray:
    """numpy oracle of the accumulator wrap: int64 -> acc_bits two's complement."""
    if acc_bits == 64:
        return exact.copy()
    modulus = 1 << acc_bits
    half = 1 << (acc_bits - 1)
    shifted = exact.astype(object) + half  # python ints: no int64 overflow near acc_bits = 63
    return np.array(shifted % modulus - half, dtype=np.int64).reshape(exact.shape)


def int8_gemm_reference(x: np.ndarray, w: np.ndarray, acc_bits: int = 32, bias: np.ndarray | None = None) -> GemmResult:
    """Naive oracle: exact int64 matmul, then wrap and count."""
    check_operands(x, w, bias, acc_bits)
    exact = x.astype(np.int64) @ w.astype(np.int64)
    if bias is not None:
        exact = exact + bias.astype(np.int64)
    stored = wrap_reference(exact, acc_bits)
    return GemmResult(stored.astype(result_dtype(acc_bits)), int(np.count_nonzero(stored != exact)))
