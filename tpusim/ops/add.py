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
from numba import njit

from tpusim.kernels.gemm import claim_task, finish_task, run_tasks
from tpusim.ops import register
from tpusim.ops._binary import binary_passes, lower_binary
from tpusim.ops.base import Op, VectorCost
from tpusim.quant.arithmetic import storage_dtype
from tpusim.quant.qlayer import INT32_MAX, INT32_MIN, Requant, centered, plain_qlayer, rescale, rescale_output, scalar

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
        scales = [scalar(qp.scale) for qp in in_qps]
        twice_max = 2.0 * max(scales)
        rescales = tuple(Requant.of(s / twice_max) for s in scales)
        requant = Requant.of(twice_max / (2.0**ADD_LEFT_SHIFT * scalar(y_qp.scale)))
        return plain_qlayer(layer, in_qps, y_qp, requant=requant, input_rescales=rescales)

    def execute(self, ql, inputs, options):
        if all(q.shape == ql.layer.output_shape for q in inputs):
            return _fused_add(ql, inputs, self.signs), 0
        total = np.zeros(ql.layer.output_shape, np.int32)
        for q, qp, r, sign in zip(inputs, ql.input_qparams, ql.input_rescales, self.signs):
            shifted = centered(q, qp.zero_point) << ADD_LEFT_SHIFT
            term = rescale(shifted, r, 0, INT32_MIN, INT32_MAX)
            if sign > 0:
                total += term
            else:
                total -= term
        return rescale_output(ql, total), 0

    def vector_cost(self, layer, in_elements, out_elements, lanes, int8):
        passes = binary_passes(in_elements, out_elements, lanes)
        return VectorCost(f"{layer.op}+{layer.activation.label}", "none", passes,
                          activation_ops=out_elements if layer.activation.kind != "none" else 0,
                          requant_ops=sum(in_elements) if int8 else 0)

    def export(self, b, layer, inputs, weight, bias, y):
        b.node("Add" if self.signs[1] > 0 else "Sub", inputs, y, layer.name)



@njit(cache=True)
def _rescale(value, m0, shift, zero_point, qmin, qmax):
    """One value of :func:`tpusim.quant.fixed_point.requantize`: round half away from zero, then clamp."""
    product = np.int64(value) * m0
    right = 31 + shift
    half = np.int64(1) << (right - 1)
    rounded = (product + half) >> right if product >= 0 else -((half - product) >> right)
    return min(max(rounded + zero_point, qmin), qmax)


_ADD_BLOCK = 16384  # elements per parallel task of the add kernel


@njit(cache=True)
def _add_block(a, b, z_a, z_b, m_a, m_b, m_y, s_a, s_b, s_y, sign_a, sign_b, zero_point, qmin, qmax, out):
    low, high = np.int64(INT32_MIN), np.int64(INT32_MAX)
    for i in range(a.size):
        term_a = _rescale((np.int64(a[i]) - z_a) << ADD_LEFT_SHIFT, m_a, s_a, 0, low, high)
        term_b = _rescale((np.int64(b[i]) - z_b) << ADD_LEFT_SHIFT, m_b, s_b, 0, low, high)
        total = np.int32(sign_a * term_a + sign_b * term_b)
        out[i] = _rescale(total, m_y, s_y, zero_point, qmin, qmax)


@njit(cache=True, nogil=True)
def _add_kernel(a, b, zero_points, m0s, shifts, signs, zero_point, qmin, qmax, out, counters):
    """out = requant(sign_a rescale(a) + sign_b rescale(b)) element by element, the int32 sum wrapping as numpy's.

    Blocks of elements are independent tasks (slices indexed from 0, which LLVM vectorises) that the
    threads claim one at a time (:func:`tpusim.kernels.gemm.run_tasks`), so the thread count changes no value."""
    blocks = (a.size + _ADD_BLOCK - 1) // _ADD_BLOCK
    block = claim_task(counters)
    while block < blocks:
        lo, hi = block * _ADD_BLOCK, min((block + 1) * _ADD_BLOCK, a.size)
        _add_block(a[lo:hi], b[lo:hi], zero_points[0], zero_points[1], m0s[0], m0s[1], m0s[2], shifts[0], shifts[1],
                   shifts[2], signs[0], signs[1], zero_point, qmin, qmax, out[lo:hi])
        finish_task(counters)
        block = claim_task(counters)


def _fused_add(ql, inputs: list[np.ndarray], signs: tuple[int, int]) -> np.ndarray:
    """Add/Sub of two same-shape tensors in one pass; the general path above (rescale, sum, requantize) is its oracle.

    It runs over memory in the inputs' own order (the integer conv returns channels-last memory
    behind an NCHW shape), and its output keeps that order.
    """
    (a_qp, b_qp), (r_a, r_b) = ql.input_qparams, ql.input_rescales
    order = np.argsort([-stride for stride in inputs[0].strides], kind="stable")
    a, b = (q.transpose(order) for q in inputs)
    if not (a.flags.c_contiguous and b.flags.c_contiguous):
        order = np.arange(inputs[0].ndim)
        a, b = (np.ascontiguousarray(q) for q in inputs)
    out = np.empty(a.shape, storage_dtype(ql.out_qmin, ql.out_qmax))
    m0s = np.array([r_a.m0[0], r_b.m0[0], ql.requant.m0[0]], np.int64)
    shifts = np.array([r_a.shift[0], r_b.shift[0], ql.requant.shift[0]], np.int64)
    run_tasks(_add_kernel, -(-a.size // _ADD_BLOCK), a.reshape(-1), b.reshape(-1),
              np.array([int(a_qp.zero_point), int(b_qp.zero_point)], np.int64), m0s, shifts, np.array(signs, np.int64),
              np.int64(ql.output_qparams.zero_point), np.int64(ql.out_qmin), np.int64(ql.out_qmax), out.reshape(-1))
    return out.transpose(np.argsort(order))
