"""LSTM (ONNX gates i, o, f, c; forward, reverse, bidirectional; sequence_lens; initial states; PyTorch's
stacked, batch-first exports) step by step: per step the recurrent GEMM with batch as M, its weights
fetched again, the input GEMM hoisted over the steps or per step; int8 x and h, int16 cell state,
sigmoid/tanh by interpolated table (shared machinery: ``tpusim/ops/_recurrent.py``).

Per step and direction the activation unit makes three kinds of pass: the gate drains (per accumulator
row and lanes-wide block of the 4H gate columns: requantize to Q5.10, add the input projection, sigmoid
or tanh by interpolated table: 2 element ops), the cell pass ``c = f c + i g`` (one pass per lanes
elements of B x H: 3 ops) and the hidden pass ``h = o tanh(c)`` requantized to 8 bits (2 ops, one
requantization per element).
"""
from __future__ import annotations

import numpy as np

from tpusim.ops import register
from tpusim.ops._recurrent import (GATE_FRAC, INT16_MAX, INT16_MIN, SIGMOID_TABLE, TANH_TABLE, RecurrentOp, lookup,
                                   matmul_nk, requant_out, rounding_shift)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return np.float32(1) / (np.float32(1) + np.exp(-x))


@register
class LSTM(RecurrentOp):
    name = "lstm"
    onnx_types = ("LSTM",)
    onnx_type = "LSTM"
    gates = 4
    has_cell = True

    def default_activations(self):
        return ("sigmoid", "tanh", "tanh")

    def state_inputs(self):
        return ((5, "initial_h"), (6, "initial_c"))

    def lower_attrs(self, ctx, node, attrs):
        if int(attrs.get("input_forget", 0)):
            raise ctx.fail(node, "input_forget=1 (coupled input and forget gates) is not supported")
        peepholes = ctx.optional_constant(node, 7, "P (peepholes)")
        if peepholes is not None and np.any(peepholes):
            raise ctx.fail(node, "peephole weights P are not supported")
        return ()

    def float_cell(self, layer, gx, h, c, r, rb, dims):
        z = gx + matmul_nk(h, r) + rb
        i, o, f, g = np.split(z, 4, axis=1)
        c_new = _sigmoid(f) * c + _sigmoid(i) * np.tanh(g)
        return _sigmoid(o) * np.tanh(c_new), c_new

    def int_cell(self, layer, zx, prev, c, di, ints, y_qp, options):
        zh, wrapped = self.recurrent_q510(prev.q, prev, di, slice(None), options)
        z = zx + zh
        i, o, f, g = np.split(z, 4, axis=1)
        i, o, f = (lookup(v, GATE_FRAC, SIGMOID_TABLE) for v in (i, o, f))
        g = lookup(g, GATE_FRAC, TANH_TABLE)
        frac = ints.cell_frac
        c_new = np.clip(rounding_shift(f * c, 15) + rounding_shift(i * g, 30 - frac), INT16_MIN, INT16_MAX)
        h_new = requant_out(o * lookup(c_new, frac, TANH_TABLE), ints.rq_out, y_qp)
        return h_new, c_new, wrapped

    def emit_tail(self, e, d, s, h_prev, y_region):
        dims = e.dims
        elements = e.batch * dims.hidden
        gates = e.gates[d]
        if s == 0 and h_prev is None:
            e.gates_without_gemm(d, s, 0, "lstm_gates", 0, gates)
        else:
            e.recurrent_gemm(d, s, 0, h_prev, "lstm_gates", 0, gates)
        cell = e.cell[d]
        h = dims.hidden   # gate order i, o, f, c: the cell pass reads i, f and c, the hidden pass o
        cell_gates = e.gate_columns(gates, ((0, h), (2 * h, 4 * h)))
        sources = (*cell_gates, cell) if s > 0 or e.cell_loaded[d] else cell_gates
        e.vector("lstm_cell", sources, cell, elements * e.ib, elements, 3, False)
        e.vector("lstm_hidden", (*e.gate_columns(gates, ((h, 2 * h),)), cell), y_region, elements * e.eb, elements,
                 2, True)
