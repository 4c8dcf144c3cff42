"""int8 x int8 GEMM with a finite-width two's-complement accumulator.

This is the functional model of the matrix unit's arithmetic: 8-bit operands (activations
signed or unsigned, weights signed), exact products, sums wrapped modulo ``2**acc_bits`` as
the TPU's 32-bit accumulators would. ``int8_gemm`` (and ``grouped_int8_gemm``, which takes
weights in their stored (N, K) layout and all groups of a conv at once) is the fast Numba kernel;
``int8_gemm_reference`` is the naive numpy oracle it is tested against.

Every output is a dot product of two K-contiguous rows. On CPUs with AVX-512 VNNI the kernel
uses ``vpdpbusd`` (64 uint8 x int8 products per instruction) through a small LLVM intrinsic
(int8 activations are shifted to uint8 first, the bias absorbing the shift); elsewhere, and for
shapes that do not fill its tiles, a portable loop that LLVM vectorises. Both are exact.
"""
from __future__ import annotations

import warnings

from typing import NamedTuple

import llvmlite.binding
import numba
import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

# |uint8 x int8| <= 255 * 128, so this many products always fit an int32 partial sum.
_INT32_SAFE_TERMS = (2**31 - 1) // (255 * 128)
_TILE = 4  # a tile is 4 rows of x against 4 weight rows: 16 int32 sums, each a vectorised reduction over K
_PANEL_BYTES = 128 * 1024  # weight rows swept by all row blocks before moving on: stays in L2
_VNNI_BLOCK = 64  # bytes of K per vpdpbusd operand (one zmm register)
_VNNI_CHUNK = _INT32_SAFE_TERMS // _VNNI_BLOCK * _VNNI_BLOCK  # whole blocks whose int32 sums cannot overflow
# Numba compiles for the host CPU unless told otherwise; the intrinsic exists only there.
HAS_VNNI = numba.config.CPU_NAME is None and bool(llvmlite.binding.get_host_cpu_features().get("avx512vnni"))
_vnni_compiles = [True]  # set False for good once the intrinsic fails to compile here


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


@intrinsic
def _vnni_tile(typingctx, x, w, m0, n0, blocks, bias, half, mask, out):
    """Tile (m0.., n0..) of 4 x 4 outputs, wrapped and stored channel-major; returns how many wrapped.

    out[n0 + j, m0 + i] = wrap(sum over k < 64 blocks of x[m0 + i, k] * w[n0 + j, k] + bias[n0 + j]),
    the wrap being ((v + half) & mask) - half. x is a uint8 and w an int8 2-D array, bias int64
    and out int32, all with unit inner stride. Sixteen zmm accumulators take one vpdpbusd per 64
    k each (four adjacent products per int32 lane, modulo 2**32: exact while K * 255 * 128 <
    2**31); they are reduced together, then the bias add and wrap check run in int64 lanes.
    """
    sig = types.int64(x, w, m0, n0, blocks, bias, half, mask, out)

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
        m0_bytes = builder.mul(args[2], i64(4))
        for j in range(_TILE):
            part = builder.shuffle_vector(narrow, narrow, ir.Constant(quad, list(range(_TILE * j, _TILE * j + _TILE))))
            target = row_start(out_arr.data, args[3], j, out_stride, m0_bytes)
            builder.store(part, builder.bitcast(target, quad.as_pointer()), align=4)
        return wrapped

    return sig, codegen


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
def _grouped_gemm_kernel(x, w, bias64, acc_bits, out, panel):
    """out[g] = wrap(x[g] @ w[g].T + bias64[g]).T for every group g; returns the number of wrapped outputs.

    x is (G, M, K) and w is (G, N, K), both contiguous along K; out is channel-major (G, N, M),
    which for a batch-1 conv is already NCHW. Weight rows are taken a panel at a time; every
    4-row block of x sweeps the panel in 4 x 4 tiles, edge tiles fall back to single dot products.
    """
    groups, m_total, _ = x.shape
    n_total = w.shape[1]
    sums = np.empty((_TILE, _TILE), np.int64)
    wrapped = 0
    for g in range(groups):
        xg, wg, bias_g, out_g = x[g], w[g], bias64[g], out[g]
        if n_total < _TILE:  # e.g. depthwise: no full tile anywhere, so skip the tile bookkeeping
            for n in range(n_total):
                for m in range(m_total):
                    exact = _dot(xg[m], wg[n]) + bias_g[n]
                    stored = wrap_to_bits(exact, acc_bits)
                    wrapped += stored != exact
                    out_g[n, m] = stored
            continue
        for p0 in range(0, n_total, panel):
            p1 = min(p0 + panel, n_total)
            for m0 in range(0, m_total, _TILE):
                rows_here = min(_TILE, m_total - m0)
                for n0 in range(p0, p1, _TILE):
                    cols_here = min(_TILE, p1 - n0)
                    if rows_here == _TILE and cols_here == _TILE:
                        _tile_sums(xg, wg, m0, n0, sums)
                    else:
                        _edge_sums(xg, wg, m0, n0, rows_here, cols_here, sums)
                    wrapped += _store_tile(sums, rows_here, cols_here, bias_g, acc_bits, out_g, m0, n0)
    return wrapped


@njit(cache=True)
def _grouped_gemm_vnni_kernel(x, w, bias64, acc_bits, out, panel):
    """_grouped_gemm_kernel for uint8 x and an int32 out on an AVX-512 VNNI CPU: full tiles through vpdpbusd.

    K must be a multiple of 64 (the caller zero-pads it: zero products change no sum) and at
    most _VNNI_CHUNK, so every product sum is exact in int32 before the bias is added in int64.
    """
    groups, m_total, k_total = x.shape
    n_total = w.shape[1]
    blocks = k_total // _VNNI_BLOCK
    half = np.int64(1) << (acc_bits - 1)
    mask = (np.int64(1) << acc_bits) - 1
    wrapped = 0
    for g in range(groups):
        xg, wg, bias_g, out_g = x[g], w[g], bias64[g], out[g]
        for p0 in range(0, n_total, panel):
            p1 = min(p0 + panel, n_total)
            for m0 in range(0, m_total, _TILE):
                rows_here = min(_TILE, m_total - m0)
                for n0 in range(p0, p1, _TILE):
                    cols_here = min(_TILE, p1 - n0)
                    if rows_here == _TILE and cols_here == _TILE:
                        wrapped += _vnni_tile(xg, wg, m0, n0, blocks, bias_g, half, mask, out_g)
                        continue
                    for j in range(cols_here):
                        for i in range(rows_here):
                            exact = _dot(xg[m0 + i], wg[n0 + j]) + bias_g[n0 + j]
                            stored = wrap_to_bits(exact, acc_bits)
                            wrapped += stored != exact
                            out_g[n0 + j, m0 + i] = stored
    return wrapped


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


def grouped_int8_gemm(x: np.ndarray, w_nk: np.ndarray, acc_bits: int = 32, bias: np.ndarray | None = None,
                      use_vnni: bool = HAS_VNNI) -> GemmResult:
    """Per group g: x[g] (M,K) int8/uint8 times w_nk[g].T, weights stored (N,K) like OIHW rows.

    bias is (G*N,) int32, group-major. The result is a (G, M, N) view of a channel-major
    (G, N, M) array, so a batch-1 conv needs no transpose to NCHW. ``use_vnni`` picks the
    vpdpbusd kernel (only where the CPU has it; tests turn it off to check the portable kernel too).
    """
    check_grouped_operands(x, w_nk, bias, acc_bits)
    groups, n_g, k_total = w_nk.shape
    bias64 = np.zeros((groups, n_g), np.int64) if bias is None else bias.astype(np.int64).reshape(groups, n_g)
    out = np.empty((groups, n_g, x.shape[1]), result_dtype(acc_bits))
    k_padded = -(-k_total // _VNNI_BLOCK) * _VNNI_BLOCK
    # Worth it for int32 accumulators, tiles of several weight rows and K that padding does not more than double.
    if use_vnni and _vnni_compiles[0] and acc_bits <= 32 and n_g >= _TILE and k_padded <= min(2 * k_total, _VNNI_CHUNK):
        vnni_x, vnni_w, vnni_bias = x, w_nk, bias64
        if x.dtype == np.int8:
            # vpdpbusd takes unsigned activations: x + 128 (its bits are x's with the top one flipped)
            # fits uint8, and sum (x + 128) w = sum x w + 128 sum w, so the exact bias absorbs the shift.
            vnni_bias = bias64 - 128 * w_nk.sum(axis=2, dtype=np.int64)
            vnni_x = x.view(np.uint8) ^ np.uint8(0x80)
        if k_padded != k_total:
            vnni_x = np.concatenate([vnni_x, np.zeros((*x.shape[:2], k_padded - k_total), np.uint8)], axis=2)
            vnni_w = np.concatenate([vnni_w, np.zeros((groups, n_g, k_padded - k_total), np.int8)], axis=2)
        try:
            wrapped = _grouped_gemm_vnni_kernel(np.ascontiguousarray(vnni_x), np.ascontiguousarray(vnni_w), vnni_bias,
                                                acc_bits, out, _panel_rows(k_padded, n_g))
            return GemmResult(out.transpose(0, 2, 1), int(wrapped))
        except (numba.core.errors.NumbaError, RuntimeError) as exc:
            # The intrinsic's signature follows the LLVM inside llvmlite; another LLVM may refuse it.
            _vnni_compiles[0] = False
            warnings.warn(f"AVX-512 VNNI int8 kernel unavailable ({type(exc).__name__}); using the portable kernel")
    wrapped = _grouped_gemm_kernel(np.ascontiguousarray(x), np.ascontiguousarray(w_nk), bias64, acc_bits, out,
                                   _panel_rows(k_total, n_g))
    return GemmResult(out.transpose(0, 2, 1), int(wrapped))


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
