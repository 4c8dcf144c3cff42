"""Intel AMX tiles for the fused int8 GEMM (:mod:`tpusim.kernels.gemm`): ``tdpbusd`` on 16 x 64-byte tiles.

One ``tdpbusd`` multiplies a 16-pixel x 64-byte uint8 tile by a 16-quad x 16-channel int8 tile (64 bytes
a row: four k of each channel) into 16 x 16 int32 sums: 16,384 products, against 64 for one AVX-512
``vpdpbusd``. Its B operand is exactly the broadcast kernel's packed weights (``packed[v, q, 4 l + t] =
w[16 v + l, 4 q + t]``: 16 consecutive quads of one vector are one tile, rows 64 bytes apart), and its
A operand is 16 rows of the padded uint8 activations, so both kernels share their operands. Sums wrap
modulo 2**32 like ``vpdpbusd``'s; the callers keep K within the chunk that cannot overflow, so both are exact.

LLVM's AMX intrinsics take a tile type that llvmlite's IR cannot spell, so the tiles are driven by
inline assembly on fixed registers: tmm0-3 accumulate a 2 x 2 block of C tiles (32 pixels x 32
channels), tmm4-5 hold the pixels' A tiles and tmm6-7 the channels' B tiles. Linux hands a process the
8 KiB of tile state only once it asks (``arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)``; a tile
instruction before that raises SIGILL), so :func:`amx_ready` asks first and says whether it was granted.
"""
from __future__ import annotations

import ctypes
import platform
import sys

import llvmlite.binding
import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

TILE_ROWS = 16  # pixels of an A tile and of a C tile; quads of a B tile
BLOCK_ROWS = 2 * TILE_ROWS  # pixels of a 2 x 2 block of C tiles
BLOCK_VECTORS = 2  # 16-channel weight vectors of a block
TILE_BYTES = 64  # bytes a tile row holds: 64 k of a pixel, 4 k of 16 channels, 16 int32 sums

_SYS_ARCH_PRCTL = 158  # x86-64 Linux
_ARCH_REQ_XCOMP_PERM = 0x1023
_XFEATURE_XTILEDATA = 18

_features = llvmlite.binding.get_host_cpu_features()
# Numba compiles for the host CPU unless told otherwise (NUMBA_CPU_NAME); the tiles exist only there.
HAS_AMX = (numba.config.CPU_NAME is None and sys.platform == "linux" and platform.machine() == "x86_64"
           and bool(_features.get("amx-tile")) and bool(_features.get("amx-int8")))
_granted: list[bool] = []


def amx_ready() -> bool:
    """The CPU has AMX int8 and this process may use its tiles (asked for once; False where it may not)."""
    if not _granted:
        allowed = False
        if HAS_AMX:
            libc = ctypes.CDLL(None, use_errno=True)
            allowed = libc.syscall(ctypes.c_long(_SYS_ARCH_PRCTL), ctypes.c_long(_ARCH_REQ_XCOMP_PERM),
                                   ctypes.c_long(_XFEATURE_XTILEDATA)) == 0
            if allowed:
                llvmlite.binding.initialize_native_asmparser()  # LLVM assembles inline asm only with it
        _granted.append(allowed)
    return _granted[0]


def tile_config(rows: int) -> np.ndarray:
    """The 64-byte LDTILECFG operand for a block of ``rows`` (1..32) pixels: palette 1, each tile's
    bytes per row (at offset 16 + 2 t) and rows (at 48 + t). Tiles of the second row block are left
    unconfigured (0 rows) where rows <= 16, and the block then never touches them."""
    if not 1 <= rows <= BLOCK_ROWS:
        raise ValueError(f"a block holds 1 to {BLOCK_ROWS} pixels, got {rows}")
    config = np.zeros(64, np.uint8)
    config[0] = 1
    first, second = min(rows, TILE_ROWS), rows - min(rows, TILE_ROWS)
    for tile, tile_rows in ((0, first), (1, first), (2, second), (3, second), (4, first), (5, second),
                            (6, TILE_ROWS), (7, TILE_ROWS)):
        if tile_rows:
            config[16 + 2 * tile : 18 + 2 * tile] = np.array([TILE_BYTES], "<u2").view(np.uint8)
            config[48 + tile] = tile_rows
    return config


_I64 = ir.IntType(64)


def _asm(builder, text: str, args=()) -> None:
    """Inline assembly with register operands and nothing returned; it reads or writes memory."""
    constraints = ",".join(["r"] * len(args) + ["~{memory}"])
    builder.asm(ir.FunctionType(ir.VoidType(), [_I64] * len(args)), text, constraints, list(args), side_effect=True)


@intrinsic
def load_tile_config(typingctx, config):
    """LDTILECFG from a :func:`tile_config` array (this thread's tile shapes; every tile zeroed)."""
    sig = types.void(config)

    def codegen(context, builder, signature, args):
        data = context.make_array(signature.args[0])(context, builder, args[0]).data
        _asm(builder, "ldtilecfg ($0)", [builder.ptrtoint(data, _I64)])
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def release_tiles(typingctx):
    """TILERELEASE: the tile state goes back to its initial, unsaved state."""
    sig = types.void()

    def codegen(context, builder, signature, args):
        _asm(builder, "tilerelease")
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def tile_block(typingctx, x, packed, m0, two_row_tiles, v0, quads, out, out_col):
    """Raw int32 sums of pixels m0 .. m0 + 31 (m0 .. m0 + 15 unless two_row_tiles) against the 32
    channels of weight vectors v0 and v0 + 1, into out[r, out_col + c], under a loaded tile config.

    x is (pixels, 4 quads) uint8, packed (vectors, 64 quads) int8 rows; quads is a multiple of 16.
    The tile config's rows say how many pixels each A tile loads and each C tile stores, so no row
    past the block's pixels is read or written.
    """
    sig = types.void(x, packed, m0, two_row_tiles, v0, quads, out, out_col)

    def codegen(context, builder, signature, args):
        x_arr, w_arr, out_arr = (context.make_array(signature.args[a])(context, builder, args[a]) for a in (0, 1, 6))
        x_stride = cgutils.unpack_tuple(builder, x_arr.strides, 2)[0]
        w_stride = cgutils.unpack_tuple(builder, w_arr.strides, 2)[0]
        out_stride = cgutils.unpack_tuple(builder, out_arr.strides, 2)[0]
        m0, two, v0, quads, out_col = args[2], args[3], args[4], args[5], args[7]
        two = builder.icmp_unsigned("!=", two, ir.Constant(two.type, 0))
        x_base, w_base, out_base = (builder.ptrtoint(a.data, _I64) for a in (x_arr, w_arr, out_arr))
        pixels = builder.add(x_base, builder.mul(m0, x_stride))
        pixels_2 = builder.add(pixels, builder.mul(_I64(TILE_ROWS), x_stride))
        channels = builder.add(w_base, builder.mul(v0, w_stride))
        channels_2 = builder.add(channels, w_stride)
        _asm(builder, "tilezero %tmm0")
        _asm(builder, "tilezero %tmm1")
        with builder.if_then(two):  # tiles of the second row block exist only where the config gave them rows
            _asm(builder, "tilezero %tmm2")
            _asm(builder, "tilezero %tmm3")
        tile_stride = _I64(TILE_BYTES)
        with cgutils.for_range(builder, builder.udiv(quads, _I64(TILE_ROWS))) as loop:
            k_offset = builder.mul(loop.index, _I64(TILE_BYTES))  # 64 k of the pixels = 16 quads of the weights
            w_offset = builder.mul(k_offset, _I64(TILE_ROWS))
            _asm(builder, "tileloadd ($0,$1,1), %tmm4", [builder.add(pixels, k_offset), x_stride])
            _asm(builder, "tileloadd ($0,$1,1), %tmm6", [builder.add(channels, w_offset), tile_stride])
            _asm(builder, "tdpbusd %tmm6, %tmm4, %tmm0")
            _asm(builder, "tileloadd ($0,$1,1), %tmm7", [builder.add(channels_2, w_offset), tile_stride])
            _asm(builder, "tdpbusd %tmm7, %tmm4, %tmm1")
            with builder.if_then(two):
                _asm(builder, "tileloadd ($0,$1,1), %tmm5", [builder.add(pixels_2, k_offset), x_stride])
                _asm(builder, "tdpbusd %tmm6, %tmm5, %tmm2")
                _asm(builder, "tdpbusd %tmm7, %tmm5, %tmm3")
        column = builder.add(out_base, builder.mul(out_col, _I64(4)))
        lower_rows = builder.add(column, builder.mul(_I64(TILE_ROWS), out_stride))
        _asm(builder, "tilestored %tmm0, ($0,$1,1)", [column, out_stride])
        _asm(builder, "tilestored %tmm1, ($0,$1,1)", [builder.add(column, _I64(TILE_BYTES)), out_stride])
        with builder.if_then(two):
            _asm(builder, "tilestored %tmm2, ($0,$1,1)", [lower_rows, out_stride])
            _asm(builder, "tilestored %tmm3, ($0,$1,1)", [builder.add(lower_rows, _I64(TILE_BYTES)), out_stride])
        return context.get_dummy_value()

    return sig, codegen
