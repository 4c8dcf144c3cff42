"""MatMul of two activations (attention's ``Q K^T`` and ``P V``: an ONNX MatMul whose second operand is
computed, which :mod:`tpusim.ops.gemm` hands over), batched over the leading dims (heads), with numpy
broadcasting, its stationary operand routed to the array through the host (TPU v1) or directly.

Two model rewrites for the attention exporters write: :func:`drop_softmax_nan_guard` removes the
``Where(IsNaN(p), 0, p)`` torch puts after an attention softmax, and :func:`fold_batched_transposes`
makes torch's ``Reshape -> Transpose -> Reshape`` transpose of K one Transpose.

Matrix unit: each of the G batch entries (batch x heads) is a GEMM ``[M, K] x [K, N]``; the second
operand is the array's stationary "weights". TPU v1 loads weights only from its weight memory, which
only the host writes, so by default (``computed_weights.path: host``) the operand makes a round trip:
unified buffer -> host (``WriteHostMemory``), host -> weight memory over PCIe
(``WriteWeightMemory``), then weight memory -> FIFO as ordinary tiles (``ReadWeights``). With
``path: direct`` (later TPUs) each tile goes from the unified buffer to the FIFO at
``direct_bytes_per_cycle`` (``ReadWeightsFromUb``). Tiles are laid out as for a grouped conv: with
``mapping.pack_groups`` as many heads as fit share a tile block-diagonally.

Integers: both operands on their own grids (per tensor), zero points exact. The array holds
``b8 = q_b - 128`` for a uint8 operand (``q_b`` for an int8 one) and computes ``sum_k q_a b8`` on the
int8 GEMM of :mod:`tpusim.kernels.gemm` (or the PE-level array); the accumulators start at
``-z_a sum_k b8`` per column; then, with ``c = 128 - z_b`` (``-z_b`` for int8), the activation unit
adds ``c (sum_k q_a - K z_a)`` per row, giving ``sum_k (q_a - z_a)(q_b - z_b)`` exactly, and requantizes
by ``s_a s_b / s_y`` (one dyadic multiplier; a scalar factor on an operand that only the MatMul reads,
torch's ``d ** -0.25`` on Q and K, joins that multiplier instead of costing a table layer).

Cost beyond the multiply: one requantization per output element; with asymmetric activations the row
sums of the streamed operand take one more pass over it in the activation unit, and on the direct
path the column sums one pass over the stationary operand (the host computes them during the round
trip). An operand or output that does not fit the unified buffer is refused, not spilled.
"""
from __future__ import annotations

import math

import numpy as np
import onnx

from tpusim import jit
from tpusim.errors import TpusimError
from tpusim.ir import GemmShape
from tpusim.mapping.isa import (
    Activate,
    LayerMapping,
    MatrixMultiply,
    ReadWeights,
    ReadWeightsFromUb,
    UbRegion,
    WriteHostMemory,
    WriteWeightMemory,
)
from tpusim.frontend.canonical import static_shapes
from tpusim.ops import register, register_rewrite
from tpusim.ops._binary import broadcast_shape
from tpusim.ops._matrix import accumulate
from tpusim.ops.base import Op, vectors

REQUANT_SCALAR_BYTES = 5  # one multiplier + one shift: the output's single requantization


def gemm_view(layer) -> GemmShape:
    """(G, M, K, N) of the batched product: G GEMMs of [M, K] x [K, N]."""
    a, b = layer.input_shapes
    return GemmShape(m=a[-2], k=a[-1], n=b[-1], groups=math.prod(layer.output_shape[:-2]))


def _operands(layer, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both operands broadcast to the output's batch dims, as (G, M, K) and (G, K, N)."""
    g = gemm_view(layer)
    batch = tuple(layer.output_shape[:-2])
    a = np.ascontiguousarray(np.broadcast_to(a, batch + tuple(a.shape[-2:])).reshape(g.groups, g.m, g.k))
    b = np.ascontiguousarray(np.broadcast_to(b, batch + tuple(b.shape[-2:])).reshape(g.groups, g.k, g.n))
    return a, b


@register
class MatMul(Op):
    name = "matmul"
    schedules_itself = True
    accumulates = True

    def lower(self, ctx, node):
        (a, shape_a), (b, shape_b) = ctx.activation_input(node, 0), ctx.activation_input(node, 1)
        scale = 1.0
        if a != b:  # fold a scalar factor on either operand (torch scales both Q and K by d ** -0.25)
            a, factor_a = _absorb_scalar_factor(ctx, a)
            b, factor_b = _absorb_scalar_factor(ctx, b)
            scale = factor_a * factor_b
        if len(shape_a) < 2 or len(shape_b) < 2:
            raise ctx.fail(node, f"operands of rank {len(shape_a)} and {len(shape_b)}: both need rank >= 2")
        if shape_a[-1] != shape_b[-2]:
            raise ctx.fail(node, f"shapes {tuple(shape_a)} and {tuple(shape_b)} do not multiply")
        batch = broadcast_shape(ctx, node, [shape_a[:-2], shape_b[:-2]])
        out = tuple(batch) + (shape_a[-2], shape_b[-1])
        ctx.add_simple(node, self.name, [(a, shape_a), (b, shape_b)], out,
                       attrs=(("scale", scale),) if scale != 1.0 else ())

    def reference(self, layer, inputs):
        y = np.matmul(inputs[0], inputs[1])
        scale = layer.attr("scale")
        return y if scale is None else y * np.float32(scale)

    def quantize(self, layer, in_qps, y_qp, quant, input_mean):
        from tpusim.quant.qlayer import Requant, plain_qlayer, scalar
        s_a, s_b = (scalar(qp.scale) for qp in in_qps)
        factor = float(np.float32(layer.attr("scale", 1.0)))
        return plain_qlayer(layer, in_qps, y_qp, requant=Requant.of(s_a * s_b * factor / scalar(y_qp.scale)))

    def execute(self, ql, inputs, options):
        from tpusim.kernels.rounding import requantize_constants
        from tpusim.quant.arithmetic import storage_dtype
        acc, wrapped, row_terms = _accumulated(ql, inputs, options)
        # Read in the accumulators' memory order (the int8 GEMM's (G, M, N) result is a view of (G, N, M) memory);
        # the output is written C-contiguous, as the float ops after attention (softmax) sum it in that order.
        columns_major = not acc.flags.c_contiguous and acc.transpose(0, 2, 1).flags.c_contiguous
        memory = acc.transpose(0, 2, 1) if columns_major else np.ascontiguousarray(acc)
        out = np.empty(acc.shape, storage_dtype(ql.out_qmin, ql.out_qmax))
        wrapped += _rows_added_requantized(memory, row_terms, *requantize_constants(ql.requant.m0, ql.requant.shift,
                                                                                    acc.shape[2]),
                                           np.int64(ql.output_qparams.zero_point), np.int64(ql.out_qmin),
                                           np.int64(ql.out_qmax), out.transpose(0, 2, 1) if columns_major else out,
                                           columns_major)
        return out.reshape(ql.layer.output_shape), wrapped

    def emit(self, compiler, index, layer, out, is_output):
        _emit(compiler, index, layer, out)

    def export(self, b, layer, inputs, weight, bias, y):
        scale = layer.attr("scale")
        if scale is None:
            b.node("MatMul", inputs, y, layer.name)
            return
        product = b.node("MatMul", inputs, f"{y}__product", layer.name)
        factor = b.const(f"{layer.name}__factor", np.array(scale, np.float32))  # not <name>_scale: the Q/DQ scales'
        b.node("Mul", [product, factor], y, f"{layer.name}__factor")


def _accumulated(ql, inputs, options) -> tuple[np.ndarray, int, np.ndarray]:
    """The matrix unit's (G, M, N) int32 accumulators, ``sum_k q_a b8 - z_a sum_k b8``, how many of their sums
    wrapped, and the (G, M) int64 term the activation unit adds to each row, ``c (sum_k q_a - K z_a)``."""
    layer = ql.layer
    g = gemm_view(layer)
    qa, qb = _operands(layer, inputs[0], inputs[1])
    a_qp, b_qp = ql.input_qparams
    z_a, z_b = int(a_qp.zero_point), int(b_qp.zero_point)
    offset = 128 if qb.dtype == np.uint8 else 0
    b8 = (qb.astype(np.int16) - offset).astype(np.int8)
    w_nk = np.ascontiguousarray(b8.transpose(0, 2, 1))
    col_sums = w_nk.sum(axis=2, dtype=np.int64)
    acc, wrapped = accumulate(qa, w_nk, (-z_a * col_sums).astype(np.int32).reshape(-1), options.acc_bits,
                              options.engine)
    c = offset - z_b
    rows = c * (qa.sum(axis=2, dtype=np.int64) - g.k * z_a) if c else np.zeros(acc.shape[:2], np.int64)
    return acc, wrapped, rows


@jit.kernel(cache=True, nogil=True, imports={"requantize_value": "tpusim.kernels.rounding"})
def _rows_added_requantized(acc, rows, multiplier, right, half, zero_point, qmin, qmax, out, columns_major):
    """out = requantize(acc + the row's term) with column n's constants, the sum added in int32 and wrapping like
    the accumulators (the activation unit's adder); returns how many of the sums wrapped. acc and out are (G, M, N),
    or (G, N, M) when ``columns_major``; the inner loop runs along acc's memory (C-contiguous)."""
    wrapped = 0
    for g in range(acc.shape[0]):
        for i in range(acc.shape[1]):
            src, dst = acc[g, i], out[g, i]
            for j in range(src.size):
                m, n = (j, i) if columns_major else (i, j)
                exact = np.int64(src[j]) + rows[g, m]
                value = np.int64(np.int32(exact))  # (two's complement wrap-around)
                wrapped += np.int64(value != exact)
                dst[j] = requantize_value(value, multiplier[n], right[n], half[n], zero_point, qmin, qmax)
    return wrapped


def matmul_reference(ql, inputs, options) -> tuple[np.ndarray, int]:
    """Numpy oracle of :meth:`MatMul.execute`'s activation unit: the rows' term added in int64, wrapped to
    int32 and counted, then requantized."""
    from tpusim.quant.qlayer import INT32_MAX, INT32_MIN, rescale_output
    acc, wrapped, rows = _accumulated(ql, inputs, options)
    exact = acc.astype(np.int64) + rows[:, :, None]
    wrapped += int(np.count_nonzero((exact < INT32_MIN) | (exact > INT32_MAX)))
    acc = (((exact - INT32_MIN) & 0xFFFFFFFF) + INT32_MIN).astype(np.int32)
    return rescale_output(ql, acc.reshape(ql.layer.output_shape), -1), wrapped


def _absorb_scalar_factor(ctx, tensor: str) -> tuple[str, float]:
    """(source, c) when ``tensor`` is ``c * source`` (or ``source / c``) computed by a table layer that only
    this MatMul reads: the factor then joins the MatMul's requantization instead of costing a vector pass
    and a rounding of its own. (``tensor``, 1.0) otherwise."""
    record = ctx.sole_producer(tensor)
    if record is None or record.op != "unary" or record.activation.kind != "none":
        return tensor, 1.0
    tree = dict(record.attrs).get("expr")
    factor = None
    if isinstance(tree, tuple) and len(tree) == 3 and tree[0] in ("mul", "div"):
        x, c = (tree[1], tree[2]) if tree[1] == ("x",) else (tree[2], tree[1])
        if x == ("x",) and isinstance(c, tuple) and c[0] == "c" and (tree[0] == "mul" or tree[2] is c):
            factor = c[1] if tree[0] == "mul" else (1.0 / c[1] if c[1] else None)
    if factor is None or not np.isfinite(factor):
        return tensor, 1.0
    ctx.records.remove(record)
    del ctx.producer[record.output]
    return record.inputs[0], float(factor)


def _emit(compiler, li: int, layer, out) -> None:
    from tpusim.mapping.tiler import column_tiles  # the tiler imports the op registry: import it late

    cfg = compiler.cfg
    g = gemm_view(layer)
    eb, rows_r, cols_c, lanes = compiler.eb, compiler.rows, compiler.cols, compiler.lanes
    a = compiler.tensors[compiler.resolve(layer.inputs[0])]
    b = compiler.tensors[compiler.resolve(layer.inputs[1])]
    if a.ub_addr is None or out.ub_addr is None:
        raise TpusimError(f"layer {layer.name!r}: a MatMul operand or output of {max(a.nbytes, out.nbytes)} bytes "
                          "does not fit the unified buffer (attention spilled to the host is not supported)")
    tiles, per_tile = column_tiles(g.k, g.n, g.groups, rows_r, cols_c, eb, cfg.mapping.pack_groups)
    int8 = compiler.int8
    requant = "per-tensor" if int8 else "none"
    asymmetric = int8 and cfg.quant.activations == "asymmetric-uint8"
    direct = cfg.computed_weights.path == "direct" and b.ub_addr is not None
    stationary = g.groups * g.k * g.n * eb
    weight_base = compiler.dram_top
    if not direct:
        compiler.dram_top += stationary
        if b.ub_addr is not None:
            compiler.code.append(WriteHostMemory(li, UbRegion(b.ub_addr, b.nbytes), b.host_addr, spill=False))
        compiler.code.append(WriteWeightMemory(li, b.host_addr, weight_base, stationary))
    b_src = UbRegion(b.ub_addr, b.nbytes) if direct else None
    chunk = compiler.acc_chunk
    m_chunks = -(-g.m // chunk)
    a_group_bytes, out_group_bytes = g.m * g.k * eb, g.m * g.n * eb
    a_shared = a.nbytes < g.groups * a_group_bytes  # broadcast over the batch dims: every group reads all of it
    fetched = streamed_rows = useful = 0
    weight_addr = weight_base
    tiles_per_group = len(tiles) // g.groups if per_tile <= 1 else 1
    for t, tile in enumerate(tiles):
        if per_tile > 1:  # heads packed block-diagonally: tile t holds groups t * per_tile ...
            first_group, groups_here, n_offset = t * per_tile, tile.n_cols // g.n, 0
        else:             # one head per tile, its N over ceil(N / cols) column tiles
            first_group, n_index = divmod(t, tiles_per_group)
            groups_here, n_offset = 1, n_index * cols_c
        tile_weights = weight_addr
        for c in range(m_chunks):
            m0, rows = c * chunk, min(chunk, g.m - c * chunk)
            if a_shared:
                src = UbRegion(a.ub_addr, a.nbytes)
            else:
                src = UbRegion(a.ub_addr + first_group * a_group_bytes, groups_here * a_group_bytes)
            acc_addr = compiler._next_acc_addr(rows)
            addr = tile_weights
            for f, fold in enumerate(tile.folds):
                load = c == 0 or len(tile.folds) > 1
                if load:
                    if direct:
                        compiler.code.append(ReadWeightsFromUb(li, b_src, fold.nbytes, fold.k_rows, fold.n_cols))
                    else:
                        compiler.code.append(ReadWeights(li, addr, fold.nbytes, fold.k_rows, fold.n_cols))
                    fetched += 1
                compiler.code.append(MatrixMultiply(
                    li, src, acc_addr, rows, fold.k_rows, fold.n_cols, fold.macs_per_row, rows * fold.k_rows * eb,
                    load_weights=load, accumulate=f > 0,
                ))
                addr += fold.nbytes
                streamed_rows += rows
                useful += rows * fold.macs_per_row
            elements = rows * tile.n_cols
            passes = rows * -(-tile.n_cols // lanes)
            extra_ops = 0
            if asymmetric and n_offset == 0:
                # Row sums of the streamed operand for the zero-point term, once per row of each group.
                passes += vectors(groups_here * rows * g.k, lanes)
                extra_ops += groups_here * rows * g.k
            if asymmetric and direct and c == 0 and n_offset == 0:
                passes += vectors(groups_here * g.k * g.n, lanes)  # column sums of the stationary tile
                extra_ops += groups_here * g.k * g.n
            dst = UbRegion(out.ub_addr + first_group * out_group_bytes + m0 * g.n * eb,
                           (groups_here - 1) * out_group_bytes + rows * g.n * eb)
            compiler.code.append(Activate(
                li, "matmul", "none", requant, acc_addr, rows, tile.n_cols, (), dst, elements * eb, passes,
                activation_ops=extra_ops + (elements if asymmetric else 0), pool_ops=0,
                requant_ops=elements if requant != "none" else 0,
                requant_scale_bytes=REQUANT_SCALAR_BYTES if requant != "none" and t == 0 and c == 0 else 0,
            ))
        weight_addr = tile_weights + sum(fold.nbytes for fold in tile.folds)
    k_folds = max(len(t.folds) for t in tiles)
    compiler.mappings.append(LayerMapping(layer.name, layer.op, g, len(tiles), k_folds, m_chunks, per_tile, fetched,
                                          False, useful / (streamed_rows * rows_r * cols_c)))


# -- torch's guard after an attention softmax --------------------------------------------------------

@register_rewrite
def drop_softmax_nan_guard(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` rewritten in place without ``Where(IsNaN(p), 0, p)`` after a Softmax ``p`` (what torch's
    scaled_dot_product_attention exports for rows that a mask blocks entirely): a softmax of finite
    scores is never NaN, so the Where's readers read ``p``."""
    from onnx import numpy_helper

    graph = model.graph
    producer = {o: n for n in graph.node for o in n.output}
    constants = {t.name: t for t in graph.initializer}
    outputs = {o.name for o in graph.output}
    rename: dict[str, str] = {}
    for node in graph.node:
        if node.op_type != "Where" or len(node.input) != 3 or node.output[0] in outputs:
            continue
        cond, zero, p = node.input
        guard = producer.get(cond)
        if guard is None or guard.op_type != "IsNaN" or guard.input[0] != p:
            continue
        if p not in producer or producer[p].op_type != "Softmax" or zero not in constants:
            continue
        value = numpy_helper.to_array(constants[zero])
        if value.size != 1 or float(value.reshape(-1)[0]) != 0.0:
            continue
        rename[node.output[0]] = p
    if not rename:
        return model
    kept = [n for n in graph.node if not (n.op_type == "Where" and n.output[0] in rename)]
    read = {name for n in kept for name in n.input}
    kept = [n for n in kept if not (n.op_type == "IsNaN" and n.output[0] not in read)]
    del graph.node[:]
    for n in kept:
        n.input[:] = [rename.get(name, name) for name in n.input]
    graph.node.extend(kept)
    return model


# -- torch's batched transpose: Reshape to 3-D, Transpose, Reshape back ------------------------------

@register_rewrite
def fold_batched_transposes(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` rewritten in place so that ``Reshape(x: L + T -> [prod(L)] + T) -> Transpose(perm, perm[0] = 0)
    -> Reshape(-> L + T permuted)`` (how torch's exporter transposes K for ``Q K^T``: it merges batch and
    heads, transposes, and splits them again) is one Transpose of ``x`` keeping the dims L, written to the
    last Reshape's output (the chain must be only reader of its first two outputs)."""
    from onnx import helper

    graph = model.graph
    shapes = static_shapes(graph)
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    outputs = {o.name for o in graph.output}
    replaced: dict[int, onnx.NodeProto] = {}
    dropped: set[int] = set()
    for node in graph.node:
        if node.op_type != "Reshape":
            continue
        x, merged = node.input[0], node.output[0]
        follow = readers.get(merged, [])
        if len(follow) != 1 or follow[0].op_type != "Transpose" or merged in outputs:
            continue
        transpose = follow[0]
        back = readers.get(transpose.output[0], [])
        if len(back) != 1 or back[0].op_type != "Reshape" or transpose.output[0] in outputs:
            continue
        split = back[0]
        if not all(n in shapes for n in (x, merged, transpose.output[0], split.output[0])):
            continue
        xs, ms, ts, ys = (shapes[n] for n in (x, merged, transpose.output[0], split.output[0]))
        perm = next((list(a.ints) for a in transpose.attribute if a.name == "perm"), list(range(len(ms)))[::-1])
        lead = len(xs) - len(ms) + 1
        if lead < 2 or perm[0] != 0 or xs[lead:] != ms[1:] or math.prod(xs[:lead]) != ms[0]:
            continue
        if ys != xs[:lead] + ts[1:]:
            continue
        full = list(range(lead)) + [lead - 1 + p for p in perm[1:]]
        replaced[id(split)] = helper.make_node("Transpose", [x], [split.output[0]], name=split.name or transpose.name,
                                               perm=full)
        dropped.update((id(node), id(transpose)))
    if replaced:
        kept = [replaced.get(id(n), n) for n in graph.node if id(n) not in dropped]
        del graph.node[:]
        graph.node.extend(kept)
    return model
