"""GRU (ONNX gates z, r, h; linear_before_reset 0 or 1; forward, reverse, bidirectional; sequence_lens;
initial state; PyTorch's exports) step by step like the LSTM: the recurrent GEMM per step with its
weights fetched again, a second dependent GEMM when the reset comes before R_h; int8 x and h,
sigmoid/tanh by interpolated table (shared machinery: ``tpusim/ops/_recurrent.py``).

Per step and direction: the gate drains of the recurrent GEMM (requantize to Q5.10, add the input
projection, sigmoid for z and r; the h-gate columns are only requantized), then with
``linear_before_reset=1`` (PyTorch's) a candidate pass ``n = tanh(x_h + r (h R_h^T + Rb_h))`` (3 ops per
element) and the hidden pass ``h = (1 - z) n + z h_{t-1}`` requantized to 8 bits (4 ops). With
``linear_before_reset=0`` the recurrent GEMM covers z and r only; a reset pass writes ``r * h_{t-1}`` on
h's grid, a second GEMM multiplies it by R_h (a second dependence inside the step) and its drains give n.
"""
from __future__ import annotations

import numpy as np

from tpusim.ops import register
from tpusim.ops._recurrent import (GATE_FRAC, ONE, SIGMOID_TABLE, TANH_TABLE, RecurrentOp, lookup, matmul_nk,
                                   requant_out, rounding_shift)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return np.float32(1) / (np.float32(1) + np.exp(-x))


def _lbr(layer) -> bool:
    return bool(layer.attr("linear_before_reset", 0))


@register
class GRU(RecurrentOp):
    name = "gru"
    onnx_types = ("GRU",)
    onnx_type = "GRU"
    gates = 3

    def default_activations(self):
        return ("sigmoid", "tanh")

    def lower_attrs(self, ctx, node, attrs):
        return (("linear_before_reset", int(bool(attrs.get("linear_before_reset", 0)))),)

    def export_attrs(self, layer):
        return {"linear_before_reset": int(_lbr(layer))}

    def bias_split(self, layer, wb, rb, dims):
        if not _lbr(layer):
            return wb + rb, np.zeros_like(rb)
        h = dims.hidden
        keep = np.concatenate([np.ones(2 * h, np.float32), np.zeros(h, np.float32)])
        return wb + rb * keep, rb * (1 - keep)

    def float_cell(self, layer, gx, h, c, r, rb, dims):
        hidden = dims.hidden
        z = _sigmoid(gx[:, :hidden] + matmul_nk(h, r[:hidden]) + rb[:hidden])
        reset = _sigmoid(gx[:, hidden : 2 * hidden] + matmul_nk(h, r[hidden : 2 * hidden]) + rb[hidden : 2 * hidden])
        if _lbr(layer):
            n = np.tanh(gx[:, 2 * hidden :] + reset * (matmul_nk(h, r[2 * hidden :]) + rb[2 * hidden :]))
        else:
            n = np.tanh(gx[:, 2 * hidden :] + matmul_nk(reset * h, r[2 * hidden :]) + rb[2 * hidden :])
        return (np.float32(1) - z) * n + z * h, c

    def int_cell(self, layer, zx, prev, c, di, ints, y_qp, options):
        from tpusim.quant.fixed_point import requantize
        hidden = prev.q.shape[1]
        lbr = _lbr(layer)
        zh, wrapped = self.recurrent_q510(prev.q, prev, di, slice(None) if lbr else slice(0, 2 * hidden), options)
        z = lookup(zx[:, :hidden] + zh[:, :hidden], GATE_FRAC, SIGMOID_TABLE)
        reset = lookup(zx[:, hidden : 2 * hidden] + zh[:, hidden : 2 * hidden], GATE_FRAC, SIGMOID_TABLE)
        z_prev = int(prev.qp.zero_point)
        if lbr:
            n_pre = zx[:, 2 * hidden :] + rounding_shift(reset * zh[:, 2 * hidden :], 15)
        else:  # r * h_{t-1} on h_{t-1}'s own grid, then its product with R_h
            reset_h = np.clip(rounding_shift(reset * (prev.q - z_prev), 15) + z_prev, prev.qp.qmin, prev.qp.qmax)
            zn, more = self.recurrent_q510(reset_h, prev, di, slice(2 * hidden, 3 * hidden), options)
            wrapped += more
            n_pre = zx[:, 2 * hidden :] + zn
        n = lookup(n_pre, GATE_FRAC, TANH_TABLE)
        h_prev = prev.q15
        if h_prev is None:
            h_prev = requantize((prev.q - z_prev).astype(np.int32), ints.rq_hp.m0, ints.rq_hp.shift, 0, -(ONE - 1),
                                ONE - 1).astype(np.int64)
        h_new = requant_out((ONE - z) * n + z * h_prev, ints.rq_out, y_qp)
        return h_new, c, wrapped

    def recurrent_gemms(self, layer, dims):
        return (dims.gh,) if _lbr(layer) else (2 * dims.hidden, dims.hidden)

    def emit_tail(self, e, d, s, h_prev, y_region):
        dims = e.dims
        elements = e.batch * dims.hidden
        gates = e.gates[d]
        first = s == 0 and h_prev is None
        candidate, reset_h = e.scratch[d]
        if first:
            e.gates_without_gemm(d, s, 0, "gru_gates", 0, gates)
        else:
            e.recurrent_gemm(d, s, 0, h_prev, "gru_gates", 0, gates)
        h = dims.hidden   # gate order z, r, h: each pass reads only the gate columns it uses
        n_part = 2 * h
        if _lbr(e.layer):
            e.vector("gru_candidate", (*e.gate_columns(gates, ((h, 3 * h),)), *e.gx_share(d, s, n_part, h)),
                     candidate, elements * e.ib, elements, 3, False)
        elif first:
            e.gates_without_gemm(d, s, 1, "gru_candidate", n_part, candidate)
        else:
            e.vector("gru_reset", (*e.gate_columns(gates, ((h, 2 * h),)), h_prev), reset_h, elements * e.eb,
                     elements, 1, True)
            e.recurrent_gemm(d, s, 1, reset_h, "gru_candidate", n_part, candidate)
        z = e.gate_columns(gates, ((0, h),))
        sources = (*z, candidate) if first else (*z, candidate, h_prev)
        e.vector("gru_hidden", sources, y_region, elements * e.eb, elements, 4, True)
