"""Add of two activations (residual connections), with numpy broadcasting; Add of a constant.

Lowering (:mod:`tpusim.ops._binary`): a scalar or per-output-channel constant after a Conv/Gemm/MatMul
is that layer's bias; after an ``affine`` layer it is that layer's shift; another per-channel constant
makes an ``affine`` layer; another scalar is a step of a table (a function of one tensor); two
functions of one tensor (``x + f(x)``) are one table.

Integers: both inputs are rescaled into a common fixed-point domain (``(q - z) << ADD_LEFT_SHIFT``
times ``s_i / (2 max(s_a, s_b))``), summed (a broadcast operand is reused along the broadcast axes)
and requantized. :class:`tpusim.ops.sub.Sub` is the same layer with the second input's rescale
negated. Vector unit: one pass per input vector (each operand is read once; a broadcast operand is
read once and held), and every input element is requantized once.
"""
from __future__ import annotations

import numpy as np

from tpusim import jit
from tpusim.derived import derived_from
from tpusim.ops import register
from tpusim.ops._binary import binary_passes, lower_binary
from tpusim.ops.base import Op, VectorCost

# Headroom bits of the add's common domain: |q - z| <= 255 shifted by 20 stays below 2**28, so the
# two rescaled inputs and their sum (or difference) fit an int32, and 20 fractional bits make the
# rescale error negligible next to the output's rounding (TensorFlow Lite uses the same layout for
# 8-bit add).
ADD_LEFT_SHIFT = 20


@register
class Add(Op):
    name = "add"
    onnx_types = ("Add",)
    in_place = True
    fusable = True
    signs = (1, 1)  # the sign each input's rescaled value enters the sum with

    def lower(self, ctx, node):
        lower_binary(ctx, node, self.name, self.name)

    def reference(self, layer, inputs):
        return inputs[0] + inputs[1] if self.signs[1] > 0 else inputs[0] - inputs[1]

    def quantize(self, layer, in_qps, y_qp, quant, input_mean):
        from tpusim.quant.qlayer import Requant, plain_qlayer, scalar
        scales = [scalar(qp.scale) for qp in in_qps]
        twice_max = 2.0 * max(scales)
        rescales = tuple(Requant.of(s / twice_max) for s in scales)
        requant = Requant.of(twice_max / (2.0**ADD_LEFT_SHIFT * scalar(y_qp.scale)))
        return plain_qlayer(layer, in_qps, y_qp, requant=requant, input_rescales=rescales)

    def execute(self, ql, inputs, options):
        if all(q.shape == ql.layer.output_shape for q in inputs):
            fused = derived_from(ql, ("add", self.signs), lambda: _FusedAdd.of(ql, self.signs))
            if fused is not None and fused.takes(inputs):
                return fused(inputs), 0
        return _rescaled_sum(ql, self.signs, inputs, ql.layer.output_shape), 0

    def vector_cost(self, layer, in_elements, out_elements, lanes, int8):
        passes = binary_passes(in_elements, out_elements, lanes)
        return VectorCost(f"{layer.op}+{layer.activation.label}", "none", passes,
                          activation_ops=out_elements if layer.activation.kind != "none" else 0,
                          requant_ops=sum(in_elements) if int8 else 0)

    def export(self, b, layer, inputs, weight, bias, y):
        b.node("Add" if self.signs[1] > 0 else "Sub", inputs, y, layer.name)


_ADD_BLOCK = 16384  # elements per parallel task of the add kernel
_TO_CHANNELS_LAST, _FROM_CHANNELS_LAST = (0, 2, 3, 1), (0, 3, 1, 2)  # NCHW axes of channels-last memory, and back


@jit.kernel(cache=True)
def _add_block(a, b, z_a, z_b, m_a, m_b, m_y, s_a, s_b, s_y, negate_b, zero_point, qmin, qmax, out):
    """The requantizations of :func:`tpusim.quant.fixed_point.requantize`, rounding half away from zero
    branch-free: round(p / 2**r) = (p + 2**(r - 1) - [p < 0]) >> r, the shift rounding down (for p < 0,
    -floor((|p| + h) / n) = floor((p + h - 1) / n) with n = 2**r, h = n / 2). The caller has checked that
    neither term can reach half the int32 range, so the general path's clamps and int32 wrap never act."""
    r_a, r_b, r_y = 31 + s_a, 31 + s_b, 31 + s_y
    h_a, h_b, h_y = np.int64(1) << (r_a - 1), np.int64(1) << (r_b - 1), np.int64(1) << (r_y - 1)
    for i in range(a.size):
        p_a = ((np.int64(a[i]) - z_a) << ADD_LEFT_SHIFT) * m_a
        p_b = ((np.int64(b[i]) - z_b) << ADD_LEFT_SHIFT) * m_b
        term_a = (p_a + h_a + (p_a >> 63)) >> r_a
        term_b = (p_b + h_b + (p_b >> 63)) >> r_b
        p = (term_a - term_b if negate_b else term_a + term_b) * m_y
        out[i] = min(max(((p + h_y + (p >> 63)) >> r_y) + zero_point, qmin), qmax)


@jit.kernel(cache=True, nogil=True, imports={"claim_task": "tpusim.kernels.gemm", "finish_task": "tpusim.kernels.gemm"})
def _add_kernel(a, b, zero_points, m0s, shifts, negate_b, zero_point, qmin, qmax, out, counters):
    """out = requant(rescale(a) +- rescale(b)) element by element.

    Blocks of elements are independent tasks (slices indexed from 0, which LLVM vectorises) that the
    threads claim one at a time (:func:`tpusim.kernels.gemm.run_tasks`), so the thread count changes no value."""
    blocks = (a.size + _ADD_BLOCK - 1) // _ADD_BLOCK
    block = claim_task(counters)
    while block < blocks:
        lo, hi = block * _ADD_BLOCK, min((block + 1) * _ADD_BLOCK, a.size)
        _add_block(a[lo:hi], b[lo:hi], zero_points[0], zero_points[1], m0s[0], m0s[1], m0s[2], shifts[0], shifts[1],
                   shifts[2], negate_b, zero_point, qmin, qmax, out[lo:hi])
        finish_task(counters)
        block = claim_task(counters)


def _rescaled_sum(ql, signs: tuple[int, int], inputs: list[np.ndarray], shape: tuple[int, ...]) -> np.ndarray:
    """The general path, broadcasting: each input rescaled into the common domain, summed in int32 (clamped
    and wrapping as the activation unit's int32 datapath does), requantized; the fused kernels' oracle."""
    from tpusim.quant.qlayer import INT32_MAX, INT32_MIN, centered, rescale, rescale_output
    total = np.zeros(shape, np.int32)
    for q, qp, r, sign in zip(inputs, ql.input_qparams, ql.input_rescales, signs):
        shifted = centered(q, qp.zero_point) << ADD_LEFT_SHIFT
        term = rescale(shifted, r, 0, INT32_MIN, INT32_MAX)
        if sign > 0:
            total += term
        else:
            total -= term
    return rescale_output(ql, total)


@jit.kernel(cache=True)
def _look_up_block(a, b, table, out):
    for i in range(a.size):
        out[i] = table[(np.int64(a[i]) << 8) | np.int64(b[i])]


@jit.kernel(cache=True, nogil=True, imports={"claim_task": "tpusim.kernels.gemm", "finish_task": "tpusim.kernels.gemm"})
def _table_kernel(a, b, table, out, counters):
    """out = table[a << 8 | b] element by element (a, b: uint8 views of the inputs), blocks of elements
    claimed as :func:`_add_kernel`'s are."""
    blocks = (a.size + _ADD_BLOCK - 1) // _ADD_BLOCK
    block = claim_task(counters)
    while block < blocks:
        lo, hi = block * _ADD_BLOCK, min((block + 1) * _ADD_BLOCK, a.size)
        _look_up_block(a[lo:hi], b[lo:hi], table, out[lo:hi])
        finish_task(counters)
        block = claim_task(counters)


def _sum_table(ql, signs: tuple[int, int]) -> np.ndarray:
    """The layer's output for every pair of input bytes, by the general path: entry a << 8 | b is the output
    for the inputs whose bytes are a and b (two's complement for int8)."""
    a, b = np.meshgrid(*(np.arange(256, dtype=np.uint8).view(qp.storage_dtype) for qp in ql.input_qparams),
                       indexing="ij")
    return _rescaled_sum(ql, signs, [a, b], a.shape).reshape(-1)


def _add_constants(ql, signs: tuple[int, int]) -> tuple | None:
    """The add kernel's constant arguments after the two inputs, or None where its shortcuts would not hold:
    a first input subtracted, or a rescaled input that could reach half the int32 range (``quantize``'s
    s_i / (2 max(s_a, s_b)) <= 1/2 keeps every term below 2**28)."""
    (a_qp, b_qp), (r_a, r_b) = ql.input_qparams, ql.input_rescales
    for qp, r in ((a_qp, r_a), (b_qp, r_b)):
        largest = max(abs(qp.qmin - int(qp.zero_point)), abs(qp.qmax - int(qp.zero_point))) << ADD_LEFT_SHIFT
        if (largest * int(r.m0[0]) >> (31 + int(r.shift[0]))) + 1 >= 2**30:
            return None
    if signs[0] != 1:
        return None
    return (np.array([int(a_qp.zero_point), int(b_qp.zero_point)], np.int64),
            np.array([r_a.m0[0], r_b.m0[0], ql.requant.m0[0]], np.int64),
            np.array([r_a.shift[0], r_b.shift[0], ql.requant.shift[0]], np.int64), signs[1] < 0,
            np.int64(ql.output_qparams.zero_point), np.int64(ql.out_qmin), np.int64(ql.out_qmax))


class _FusedAdd:
    """Add/Sub of two same-shape tensors in one pass, prepared once per layer; the general path
    (:func:`_rescaled_sum`) is its oracle.

    Two 8-bit inputs take their outputs from a 64 KiB table of every pair of input bytes (:func:`_sum_table`),
    built once by the general path; others, where the arithmetic kernel's shortcuts hold, :func:`_add_kernel`,
    which computes each output with int64 rescales. The table is the faster on every CPU measured
    (``benchmarks/bench_residual_add.py``: ResNet-50's 16 adds, two threads): on an AVX2 Zen 3, where an int64
    product is several instructions a lane, 2.9-3.7 against 5.6-7.3 ms; on an AMX Xeon, whose AVX-512 DQ
    multiplies int64 lanes (``vpmullq``), 1.40 against 2.20 ms. Either kernel runs over memory in the inputs' own
    order (the integer conv returns channels-last memory behind an NCHW shape), and its output keeps that order.
    """

    def __init__(self, kernel, constants: tuple, in_dtypes: tuple[np.dtype, np.dtype], out_dtype: np.dtype):
        from tpusim.kernels.gemm import run_tasks
        self._kernel, self._constants, self._in_dtypes, self._out_dtype = kernel, constants, in_dtypes, out_dtype
        self._looks_up = kernel is _table_kernel
        self._run_tasks = run_tasks  # (bound here: an import per call costs more than the lookup)

    @classmethod
    def of(cls, ql, signs: tuple[int, int], table: bool = True) -> "_FusedAdd | None":
        """The layer's fused add, or None where neither kernel applies: an input wider than 8 bits and the
        arithmetic kernel's shortcuts not holding (:func:`_add_constants`). ``table=False`` takes the arithmetic
        kernel wherever its shortcuts hold (the table stays where they do not), as tests and benchmarks do."""
        from tpusim.quant.arithmetic import storage_dtype
        in_dtypes = tuple(qp.storage_dtype for qp in ql.input_qparams)
        out_dtype = storage_dtype(ql.out_qmin, ql.out_qmax)
        constants = _add_constants(ql, signs)
        if all(dtype.itemsize == 1 for dtype in in_dtypes) and (table or constants is None):
            return cls(_table_kernel, (_sum_table(ql, signs),), in_dtypes, out_dtype)
        if constants is not None:
            return cls(_add_kernel, constants, in_dtypes, out_dtype)
        return None

    def takes(self, inputs: list[np.ndarray]) -> bool:
        """The inputs have the dtypes the kernel was prepared for (a table is indexed by their bytes)."""
        return not self._looks_up or (inputs[0].dtype, inputs[1].dtype) == self._in_dtypes

    def __call__(self, inputs: list[np.ndarray]) -> np.ndarray:
        a, b = inputs
        if a.ndim == 4 and a.strides[1] == a.itemsize and b.strides == a.strides and a.strides[2] > a.strides[3]:
            order, back = _TO_CHANNELS_LAST, _FROM_CHANNELS_LAST  # as the integer conv leaves its outputs
        else:
            order = np.argsort([-stride for stride in a.strides], kind="stable")
            back = np.argsort(order)
        a, b = (q.transpose(order) for q in inputs)
        if not (a.flags.c_contiguous and b.flags.c_contiguous):
            back = np.arange(inputs[0].ndim)
            a, b = (np.ascontiguousarray(q) for q in inputs)
        out = np.empty(a.shape, self._out_dtype)
        a, b = a.reshape(-1), b.reshape(-1)
        if self._looks_up:
            a, b = a.view(np.uint8), b.view(np.uint8)
        self._run_tasks(self._kernel, -(-a.size // _ADD_BLOCK), a, b, *self._constants, out.reshape(-1))
        return out.transpose(back)
