"""What the recurrent ops (LSTM, GRU) share: lowering, the integer arithmetic, the per-step instruction
stream and the rewrite that makes PyTorch's time-major exports batch-first.

**Lowering.** An ONNX ``LSTM``/``GRU`` node (ONNX gate order: LSTM ``i, o, f, c``; GRU ``z, r, h``;
``forward``, ``reverse`` or ``bidirectional``; ``layout`` 0 or 1; stacked layers are separate nodes)
becomes one layer: ``weight`` is ``[W | R]`` per direction, shape (D, G*H, I + H); ``bias`` the ONNX
``B`` = ``[Wb | Rb]``, (D, 2*G*H); ``sequence_lens``, the initial states and the attributes are layer
attrs. The output is ``Y``. Only the default activations (Sigmoid, Tanh, Tanh) are accepted, no
``clip``, no ``input_forget`` and no non-zero peepholes (PyTorch exports none of them); reading ``Y_h``
or ``Y_c`` is refused in one line (take the last step of ``Y``).

**Batch-first.** tpusim's batch is axis 0 of every activation. PyTorch exports ``batch_first=True``
models as ``Transpose(1,0,2) -> LSTM(layout=0) -> Squeeze / Transpose+Reshape -> Transpose(1,0,2)``,
whose middle tensors are time-major. A registered model rewrite (:func:`batch_first`) turns each such
chain into ``LSTM(layout=1)`` on the batch-first tensor and a free ``Reshape`` of its output, keeping the
name of ``Y`` (ONNX Runtime's calibration run of the original model observes the same values, permuted).
A model whose graph input itself is time-major is refused (its axis 0 is the sequence, not the batch).

**Integers** (8-bit x and h, int8 weights, int32 accumulators, int16 inside the cell, in the spirit of
TFLite's 8x8->16 integer LSTM; written from the ONNX equations, not from any implementation):

- ``x_t W^T`` and ``h_{t-1} R^T`` are separate GEMMs on the array with int32 accumulators; each starts
  from its own int32 bias (the ONNX biases on ``s_x s_W`` resp. ``s_h s_R``, minus the folded zero-point
  term ``z sum W_q``) and is requantized per gate channel by a dyadic multiplier into **int16 Q5.10**
  (range +-32, step 2^-10). The two parts are added in int32 by the activation unit. Splitting them is
  what lets the input GEMM be hoisted over all steps (its Q5.10 results wait in the unified buffer) and
  gives the same integers whether it is hoisted or not.
- Sigmoid and tanh are **tables with linear interpolation** (fixed point, no float): 257 nodes over
  [-8, 8] (every 1/16) holding round(f(x) 2^15), the input clamped to [-8, 8], one integer
  multiply-add between two nodes; outputs are int16 **Q0.15**. Worst-case error inside [-8, 8] 6e-5
  (sigmoid) and 4e-4 (tanh); beyond it the input saturates (1 - sigmoid(8) = 3.4e-4). An int8 h step is
  about 1/128 of h's range, 20 times more.
- The LSTM cell state is **int16 with a power-of-two scale** chosen so that it cannot saturate:
  |c_t| < |c_0| + t (f, i, |g| < 1), so Q(k).(15-k) with 2^k >= steps + max|c_0| (Q4.11 for 16 steps,
  Q7.8 for 100). ``f c`` and ``i g`` are exact integer products rounded once (half away from zero).
- ``h_t = o tanh(c_t)`` (a Q0.30 product) is requantized to Y's 8-bit grid: the recurrent input of
  the next step is exactly the int8 Y the chip writes. GRU: ``h_t = (1 - z) n + z h_{t-1}`` in Q0.30 with
  ``h_{t-1}`` rescaled to Q0.15; ``linear_before_reset=0`` multiplies ``r`` into h on h's grid and runs
  ``R_h`` as a second, dependent GEMM of the step.
- A non-zero initial state gets its own symmetric int8 grid (it need not lie inside the range Y was
  calibrated on); step 0's drains use that grid's multipliers. A zero one costs nothing: step 0 has no
  recurrent multiply on the chip (its accumulators would hold exactly the bias).

**Timing** (``emit``: the op schedules itself). Per step and direction: the recurrent GEMM (M = batch,
K = H, N = G*H) with its tiles fetched from the weight memory **every step** -- TPU v1 has no on-chip
weight store beyond the 4-tile FIFO, so only a single-tile R that nothing displaces between steps stays
in the array -- then the gate drains (requantize, add the input part, sigmoid/tanh: one pass per
accumulator row and lanes-wide column block) and the cell/hidden passes (one pass per lanes elements
each). The input GEMM runs per step or, with ``mapping.recurrent_input: hoisted``, once per block of
steps (M = steps x batch, one weight load; blocks as large as the unified buffer allows). Step t+1's
recurrent multiply reads h_t from the unified buffer, so the engine's RAW tracking on UbRegions makes it
wait for step t's hidden pass: the RAW stall of the breakdown. Bidirectional layers interleave the two
directions step by step, so one direction's multiply overlaps the other's activation passes. With a
direct unified-buffer -> FIFO path (``computed_weights.path: direct``, which TPU v1 lacks) the weights
fetched every step are brought on chip once (over PCIe) and read from the unified buffer. When a
layer's buffers do not fit beside its input and output, its output goes to host memory step by step (a
spill: the sub-batcher then runs smaller batches) and, if need be, the batch runs in row groups.

Report: the layer's GEMM is M = steps x batch, K = I + H, N = G*H, groups = directions (so M K N groups
is its MAC count); layers.csv's ``steps`` column is M / batch.
"""
from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import onnx
from onnx import helper, numpy_helper

from tpusim.errors import ModelError, TpusimError
from tpusim.frontend.context import node_attrs
from tpusim.ir import GemmShape, Layer
from tpusim.frontend.canonical import static_shapes
from tpusim.ops import register_rewrite
from tpusim.ops.base import ExecOptions, Op, VectorCost, vectors

if TYPE_CHECKING:  # annotations only
    from tpusim.quant.arithmetic import QParams
    from tpusim.quant.qlayer import QLayer, Requant


GATE_FRAC = 10            # gate pre-activations: int16 Q5.10
UNIT_FRAC = 15            # gate outputs, tanh(c), GRU's h_{t-1}: int16 Q0.15
ONE = 1 << UNIT_FRAC
INT16_MIN, INT16_MAX = -(1 << 15), (1 << 15) - 1
TABLE_STEP_LOG2 = 4       # table nodes every 2^-4 = 1/16
TABLE_LIMIT = 8           # over [-8, 8]: 257 nodes
INTERMEDIATE_BYTES = 2    # int16 gate pre-activations, gates and cell state in the unified buffer



# ----------------------------------------------------------------------------------- fixed point

def _table(fn) -> np.ndarray:
    x = np.arange(2 * TABLE_LIMIT * (1 << TABLE_STEP_LOG2) + 1, dtype=np.float64) / (1 << TABLE_STEP_LOG2) - TABLE_LIMIT
    nodes = np.clip(np.rint(fn(x) * ONE), -(ONE - 1), ONE - 1).astype(np.int64)
    return np.append(nodes, nodes[-1])  # x = +8 exactly interpolates towards itself


SIGMOID_TABLE = _table(lambda x: 1.0 / (1.0 + np.exp(-x)))
TANH_TABLE = _table(np.tanh)


def rounding_shift(values: np.ndarray, bits: int) -> np.ndarray:
    """``values / 2**bits`` rounded half away from zero, in int64 (bits >= 1)."""
    v = np.asarray(values, np.int64)
    half = np.int64(1) << (bits - 1)
    return np.where(v >= 0, (v + half) >> bits, -((half - v) >> bits))


def lookup(q: np.ndarray, frac_bits: int, table: np.ndarray) -> np.ndarray:
    """f(q 2^-frac_bits) in Q0.15 from a 257-node table, linearly interpolated in integers."""
    limit = np.int64(TABLE_LIMIT) << frac_bits
    u = np.clip(np.asarray(q, np.int64), -limit, limit) + limit   # (x + 8) 2^frac_bits, in [0, 16 2^frac_bits]
    shift = frac_bits - TABLE_STEP_LOG2
    if shift <= 0:
        return table[u << -shift]
    index = u >> shift
    lo = table[index]
    return lo + rounding_shift((table[index + 1] - lo) * (u & ((1 << shift) - 1)), shift)


def requant16(acc: np.ndarray, r: Requant) -> np.ndarray:
    """int32 accumulators (rows, channels) -> int16-saturated Q5.10 (held in int64)."""
    from tpusim.quant.fixed_point import requantize
    return requantize(acc, r.m0, r.shift, 0, INT16_MIN, INT16_MAX, channel_axis=-1).astype(np.int64)


def requant_out(product: np.ndarray, r: Requant, qp: QParams) -> np.ndarray:
    """A Q0.30 product onto an 8-bit activation grid."""
    from tpusim.quant.fixed_point import requantize
    return requantize(np.asarray(product, np.int64).astype(np.int32), r.m0, r.shift, int(qp.zero_point), qp.qmin,
                      qp.qmax).astype(np.int64)


def cell_frac_bits(steps: int, c0_max: float) -> int:
    """Fraction bits of the int16 cell state: the largest with |c| < steps + max|c_0| <= 2^(15 - frac)."""
    bound = steps + float(c0_max)
    k = max(0, math.ceil(math.log2(bound))) if bound > 1 else 0
    if k > 15:
        raise ModelError(f"an int16 cell state cannot hold {steps} steps (bound {bound:g})")
    return 15 - k


# ----------------------------------------------------------------------------------- layer view

@dataclass(frozen=True)
class Dims:
    steps_total: int   # T
    batch: int         # B
    inputs: int        # I
    hidden: int        # H
    directions: int    # D
    gates: int         # G
    layout: int

    @property
    def gh(self) -> int:
        return self.gates * self.hidden


def dims_of(layer: Layer, gates: int) -> Dims:
    shape = layer.input_shapes[0]
    layout = int(layer.attr("layout", 0))
    t, b = (shape[0], shape[1]) if layout == 0 else (shape[1], shape[0])
    d, gh, k = layer.weight.shape
    h = gh // gates
    return Dims(t, b, k - h, h, d, gates, layout)


def sequence_lengths(layer: Layer, dims: Dims) -> np.ndarray:
    """Per batch element, the number of valid steps (T when the node has no sequence_lens)."""
    lens = layer.attr("sequence_lens")
    if lens is None:
        return np.full(dims.batch, dims.steps_total, np.int64)
    # A model exported at another batch than this run's: its lengths repeat over the run's batch rows.
    return np.resize(np.asarray(lens, np.int64).reshape(-1), dims.batch)


def steps_run(layer: Layer, dims: Dims) -> int:
    """Steps the hardware runs: the longest sequence."""
    return int(sequence_lengths(layer, dims).max(initial=0))


def time_major(x: np.ndarray, layout: int) -> np.ndarray:
    return x if layout == 0 else np.swapaxes(x, 0, 1)


def state(layer: Layer, name: str, dims: Dims) -> np.ndarray | None:
    """Initial state (D, B, H), its rows repeated over the run's batch, or None."""
    value = layer.attr(name)
    if value is None:
        return None
    value = np.asarray(value, np.float32)
    rows = np.resize(np.arange(value.shape[1]), dims.batch)
    return value[:, rows]


def step_times(lens: np.ndarray, steps: int, reverse: bool) -> tuple[np.ndarray, np.ndarray]:
    """(time index (steps, B), valid (steps, B)): step s of each batch element, in its direction."""
    s = np.arange(steps)[:, None]
    valid = s < lens[None, :]
    t = (lens[None, :] - 1 - s) if reverse else np.broadcast_to(s, valid.shape)
    return np.where(valid, t, 0), valid


def direction_reversed(layer: Layer, d: int) -> bool:
    return layer.attr("direction") == "reverse" or (layer.attr("direction") == "bidirectional" and d == 1)


# ----------------------------------------------------------------------------------- integer layer

@dataclass(frozen=True, eq=False)
class DirectionInts:
    """One direction as the chip stores it."""

    w_q: np.ndarray          # (G*H, I) int8
    r_q: np.ndarray          # (G*H, H) int8
    w_qp: QParams
    r_qp: QParams
    bias_x: np.ndarray       # (G*H,) int32: input GEMM accumulator start
    bias_h: np.ndarray       # (G*H,) int32: recurrent GEMM accumulator start (GRU lbr=0: its R_h part too)
    rq_x: Requant            # input accumulators -> Q5.10
    rq_h: Requant            # recurrent accumulators -> Q5.10
    c0: np.ndarray | None    # (B0, H) cell state integers (LSTM)
    h0: "Previous"           # the initial state: on its own symmetric int8 grid (Y's grid when it is zero)


@dataclass(frozen=True, eq=False)
class Previous:
    """h_{t-1} as step t's arithmetic reads it: 8-bit integers on a grid, the recurrent GEMM's int32 bias
    and Q5.10 multipliers for that grid, and h_{t-1} in Q0.15 (None: derive it from the integers).

    Step 0 reads the initial state, which need not lie inside the range Y was calibrated on; it gets a
    grid of its own (the multiplier of step 0's drains differs, a scale vector the activation unit reads
    once). Every later step reads Y's own integers."""

    q: np.ndarray
    qp: QParams
    bias: np.ndarray
    rq: Requant
    q15: np.ndarray | None = None


@dataclass(frozen=True, eq=False)
class RecurrentInts:
    directions: tuple[DirectionInts, ...]
    rq_out: Requant           # Q0.30 -> Y's grid
    rq_hp: Requant            # Y's integers (centred) -> Q0.15 (GRU)
    cell_frac: int            # LSTM cell state fraction bits


def _weight_qp(w: np.ndarray, granularity: str, name: str) -> QParams:
    from tpusim.quant.arithmetic import weight_qparams
    return weight_qparams(w, granularity, axis=0, name=name)


def _acc_bias(real: np.ndarray, w_q: np.ndarray, w_qp: QParams, s_in: float, z_in: int, name: str) -> np.ndarray:
    from tpusim.quant.arithmetic import bias_to_int32
    from tpusim.quant.qlayer import INT32_MAX, INT32_MIN
    s_w = np.broadcast_to(w_qp.scale, (w_q.shape[0],))
    b = bias_to_int32(real, s_w, s_in).astype(np.int64) - z_in * w_q.astype(np.int64).sum(axis=1)
    if b.min() < INT32_MIN or b.max() > INT32_MAX:
        raise ModelError(f"{name}: bias with the folded zero-point term does not fit an int32 accumulator")
    return b.astype(np.int32)


def _gate_requant(s_in: float, w_qp: QParams, channels: int) -> Requant:
    from tpusim.quant.qlayer import Requant
    return Requant.of(s_in * np.broadcast_to(w_qp.scale, (channels,)) * (1 << GATE_FRAC))


def matmul_nk(a: np.ndarray, w: np.ndarray) -> np.ndarray:
    """a (M, K) times w (N, K) transposed, in float32 without BLAS threads: a recurrent step's product
    is small, and a threaded BLAS on a loaded machine spends 10-100x its work synchronising."""
    return np.einsum("mk,nk->mn", a, w, optimize=False)


def gemm_q510(x_q: np.ndarray, w_q: np.ndarray, bias: np.ndarray, r: Requant,
              options: ExecOptions) -> tuple[np.ndarray, int]:
    """(M, K) 8-bit inputs x (N, K) int8 weights on the matrix unit, requantized to Q5.10 (M, N)."""
    from tpusim.ops._matrix import accumulate

    acc, wrapped = accumulate(np.ascontiguousarray(x_q)[None], np.ascontiguousarray(w_q)[None], bias, options.acc_bits,
                              options.engine)
    return requant16(acc[0], r), wrapped


# ----------------------------------------------------------------------------------- the op

class RecurrentOp(Op):
    """A recurrent ONNX op: subclasses give the gate count and the cell (float, integer, passes)."""

    onnx_type: ClassVar[str]
    gates: ClassVar[int]
    has_cell: ClassVar[bool] = False   # keeps a cell state beside h (LSTM)
    recurrent = True                   # layers.csv reports its steps (its GEMM's M is steps x batch)
    schedules_itself = True
    accumulates = True

    # -- lowering ----------------------------------------------------------------------------
    def lower(self, ctx, node):
        x, shape = ctx.activation_input(node)
        attrs = node_attrs(node)
        layout = int(attrs.get("layout", 0))
        if layout not in (0, 1):
            raise ctx.fail(node, f"layout={layout} is not 0 or 1")
        if len(shape) != 3:
            raise ctx.fail(node, f"expected a 3-D input, got shape {shape}")
        if layout == 0 and ctx.producer.get(x) is None:
            raise ctx.fail(node, f"reads the graph input {x!r} as (sequence, batch, features): tpusim's batch is "
                           "axis 0 "
                           "of the input; export the model with batch_first=True")
        t, b, features = (shape[0], shape[1], shape[2]) if layout == 0 else (shape[1], shape[0], shape[2])
        direction = attrs.get("direction", "forward")
        if direction not in ("forward", "reverse", "bidirectional"):
            raise ctx.fail(node, f"unknown direction {direction!r}")
        d = 2 if direction == "bidirectional" else 1
        w = ctx.constant(node, 1, "W").astype(np.float32)
        r = ctx.constant(node, 2, "R").astype(np.float32)
        if w.ndim != 3 or w.shape[0] != d or w.shape[2] != features or w.shape[1] % self.gates:
            raise ctx.fail(node, f"W of shape {w.shape} does not fit {d} direction(s), {self.gates} gates and "
                           f"{features} input features")
        h = w.shape[1] // self.gates
        if int(attrs.get("hidden_size", h)) != h:
            raise ctx.fail(node, f"hidden_size={attrs['hidden_size']} but W holds {h} units per gate")
        if r.shape != (d, self.gates * h, h):
            raise ctx.fail(node, f"R of shape {r.shape}, expected {(d, self.gates * h, h)}")
        bias = ctx.optional_constant(node, 3, "B")
        if bias is None:
            bias = np.zeros((d, 2 * self.gates * h), np.float32)
        if bias.shape != (d, 2 * self.gates * h):
            raise ctx.fail(node, f"B of shape {bias.shape}, expected {(d, 2 * self.gates * h)}")
        activations = tuple(str(a).lower() for a in attrs.get("activations", ()))
        if activations and activations != self.default_activations() * d:
            raise ctx.fail(node, f"activations {list(attrs['activations'])}: only the default "
                           f"{list(self.default_activations())} are supported")
        if attrs.get("clip") is not None:
            raise ctx.fail(node, "clip is not supported")
        lens = ctx.optional_constant(node, 4, "sequence_lens")
        if lens is not None:
            lens = np.asarray(lens, np.int64).reshape(-1)
            if lens.size == 0 or lens.min() < 0 or lens.max() > t:
                raise ctx.fail(node, f"sequence_lens {lens.tolist()} do not fit {t} steps")
            lens = None if np.all(lens == t) else tuple(int(v) for v in lens)
        states = {}
        for index, name in self.state_inputs():
            value = ctx.optional_constant(node, index, name)
            if value is None:
                continue
            value = np.asarray(value, np.float32)
            if layout == 1 and value.ndim == 3:
                value = np.swapaxes(value, 0, 1)
            if value.ndim != 3 or value.shape[0] != d or value.shape[2] != h:
                raise ctx.fail(node, f"{name} of shape {value.shape} does not fit ({d}, batch, {h})")
            if np.any(value):
                states[name] = np.ascontiguousarray(value)
        extra = self.lower_attrs(ctx, node, attrs)
        for i, name in enumerate(node.output[1:], start=1):
            if name and (ctx.consumers.get(name, 0) or name in ctx.graph_outputs):
                what = ("Y_h (the last hidden state)", "Y_c (the last cell state)")[i - 1]
                shown = name[: -len(BATCH_FIRST_SUFFIX)] if name.endswith(BATCH_FIRST_SUFFIX) else name
                raise ctx.fail(node, f"output {shown!r}, {what}, is read: tpusim computes Y only (take the last step "
                               "of Y instead, e.g. y[:, -1:])")
        if not node.output[0]:
            raise ctx.fail(node, "has no Y output")
        out_shape = (t, d, b, h) if layout == 0 else (b, t, d, h)
        weight = np.ascontiguousarray(np.concatenate([w, r], axis=2))
        layer_attrs = (("hidden", h), ("direction", direction), ("layout", layout), ("sequence_lens", lens),
                       *((name, value) for name, value in states.items()), *extra)
        ctx.add_simple(node, self.name, [(x, shape)], out_shape, weight=weight,
                       bias=np.ascontiguousarray(bias.astype(np.float32)), attrs=layer_attrs)

    def default_activations(self) -> tuple[str, ...]:
        raise NotImplementedError

    def state_inputs(self) -> tuple[tuple[int, str], ...]:
        return ((5, "initial_h"),)

    def lower_attrs(self, ctx, node, attrs) -> tuple:
        return ()

    # -- shared views ------------------------------------------------------------------------
    def dims(self, layer: Layer) -> Dims:
        return dims_of(layer, self.gates)

    def split(self, layer: Layer, d: int):
        dims = self.dims(layer)
        w = layer.weight[d, :, : dims.inputs]
        r = layer.weight[d, :, dims.inputs :]
        wb = layer.bias[d, : dims.gh]
        rb = layer.bias[d, dims.gh :]
        return w, r, wb, rb

    # -- FP32 reference ------------------------------------------------------------------------
    def reference(self, layer, inputs):
        dims = self.dims(layer)
        x = time_major(inputs[0].astype(np.float32), dims.layout)
        dims = dataclasses.replace(dims, batch=x.shape[1])
        lens = sequence_lengths(layer, dims)
        steps = steps_run(layer, dims)
        y = np.zeros((dims.steps_total, dims.directions, dims.batch, dims.hidden), np.float32)
        h0 = state(layer, "initial_h", dims)
        c0 = state(layer, "initial_c", dims)
        batch = np.arange(dims.batch)
        for d in range(dims.directions):
            w, r, wb, rb = self.split(layer, d)
            times, valid = step_times(lens, steps, direction_reversed(layer, d))
            h = np.zeros((dims.batch, dims.hidden), np.float32) if h0 is None else h0[d].copy()
            c = np.zeros((dims.batch, dims.hidden), np.float32) if c0 is None else c0[d].copy()
            xs = x[times, batch[None, :]].reshape(steps * dims.batch, dims.inputs)
            gxs = (xs @ w.T + wb).reshape(steps, dims.batch, dims.gh)
            for s in range(steps):
                h_new, c_new = self.float_cell(layer, gxs[s], h, c, r, rb, dims)
                ok = valid[s][:, None]
                h = np.where(ok, h_new, h)
                c = np.where(ok, c_new, c)
                y[times[s][valid[s]], d, batch[valid[s]]] = h_new[valid[s]]
        return np.ascontiguousarray(y if dims.layout == 0 else y.transpose(2, 0, 1, 3))

    def float_cell(self, layer, gx, h, c, r, rb, dims: Dims):
        raise NotImplementedError

    # -- quantization --------------------------------------------------------------------------
    def quantize(self, layer, in_qps, y_qp, quant, input_mean):
        from tpusim.quant.arithmetic import activation_qparams, quantize
        from tpusim.quant.qlayer import Requant, plain_qlayer, scalar
        dims = self.dims(layer)
        x_qp = in_qps[0]
        s_x, z_x = scalar(x_qp.scale), int(x_qp.zero_point)
        s_h, z_h = scalar(y_qp.scale), int(y_qp.zero_point)
        h0 = state(layer, "initial_h", dims)
        c0 = state(layer, "initial_c", dims)
        steps = max(1, steps_run(layer, dims))
        cell_frac = cell_frac_bits(steps, 0.0 if c0 is None else float(np.abs(c0).max()))
        directions = []
        for d in range(dims.directions):
            w, r, wb, rb = self.split(layer, d)
            where = f"{layer.name} (direction {d})"
            w_qp = _weight_qp(w, quant.weights, f"{where} W")
            r_qp = _weight_qp(r, quant.weights, f"{where} R")
            w_q, r_q = quantize(w, w_qp), quantize(r, r_qp)
            bx_real, bh_real = self.bias_split(layer, wb, rb, dims)
            bias_h = _acc_bias(bh_real, r_q, r_qp, s_h, z_h, f"{where} recurrent GEMM")
            rq_h = _gate_requant(s_h, r_qp, dims.gh)
            if h0 is None:
                first = Previous(np.full((1, dims.hidden), z_h, np.int64), y_qp, bias_h, rq_h,
                                 np.zeros((1, dims.hidden), np.int64))
            else:
                h0_d = np.asarray(h0[d], np.float32)
                amax = float(np.abs(h0_d).max())
                h0_qp = activation_qparams(-amax, amax, "symmetric-int8")
                s_0 = scalar(h0_qp.scale)
                first = Previous(quantize(h0_d, h0_qp).astype(np.int64), h0_qp,
                                 _acc_bias(bh_real, r_q, r_qp, s_0, 0, f"{where} recurrent GEMM (initial state)"),
                                 _gate_requant(s_0, r_qp, dims.gh),
                                 np.clip(np.rint(h0_d.astype(np.float64) * ONE), -(ONE - 1), ONE - 1).astype(np.int64))
            c0_q = None
            if c0 is not None:
                c0_q = np.clip(np.rint(np.asarray(c0[d], np.float64) * (1 << cell_frac)), INT16_MIN, INT16_MAX)
                c0_q = c0_q.astype(np.int64)
            directions.append(DirectionInts(
                w_q=w_q, r_q=r_q, w_qp=w_qp, r_qp=r_qp,
                bias_x=_acc_bias(bx_real, w_q, w_qp, s_x, z_x, f"{where} input GEMM"),
                bias_h=bias_h, rq_x=_gate_requant(s_x, w_qp, dims.gh), rq_h=rq_h, c0=c0_q, h0=first,
            ))
        ints = RecurrentInts(tuple(directions), Requant.of(2.0 ** -30 / s_h), Requant.of(s_h * ONE), cell_frac)
        # The integers ride on the layer (QLayer has no field for a recurrent layer's parameters); the
        # QDQ export reads the int8 weights from there too.
        qlayer_layer = dataclasses.replace(layer, attrs=layer.attrs + (("integers", ints),))
        return plain_qlayer(qlayer_layer, in_qps, y_qp)

    def bias_split(self, layer, wb, rb, dims: Dims) -> tuple[np.ndarray, np.ndarray]:
        """(real bias added to the input GEMM, real bias added to the recurrent GEMM), per gate channel."""
        return wb + rb, np.zeros_like(rb)

    # -- integer execution ---------------------------------------------------------------------
    def execute(self, ql: QLayer, inputs, options: ExecOptions):
        layer = ql.layer
        ints: RecurrentInts = layer.attr("integers")
        dims = self.dims(layer)
        y_qp = ql.output_qparams
        x = time_major(inputs[0], dims.layout)
        dims = dataclasses.replace(dims, batch=x.shape[1])
        lens = sequence_lengths(layer, dims)
        steps = steps_run(layer, dims)
        y = np.full((dims.steps_total, dims.directions, dims.batch, dims.hidden), int(y_qp.zero_point), np.int64)
        batch = np.arange(dims.batch)
        wrapped = 0
        for d, di in enumerate(ints.directions):
            times, valid = step_times(lens, steps, direction_reversed(layer, d))
            xs = x[times, batch[None, :]].reshape(steps * dims.batch, dims.inputs)
            zx, count = gemm_q510(xs, di.w_q, di.bias_x, di.rq_x, options)
            wrapped += count
            zx = zx.reshape(steps, dims.batch, dims.gh)
            full = (dims.batch, dims.hidden)
            rows = lambda v: v[np.resize(np.arange(v.shape[0]), dims.batch)]  # noqa: E731  (the run's batch)
            first = dataclasses.replace(di.h0, q=rows(di.h0.q), q15=rows(di.h0.q15))
            h = first.q
            c = np.zeros(full, np.int64) if di.c0 is None else rows(di.c0)
            for s in range(steps):
                # Rows past their sequence keep their state; rows of a zero-length sequence are never read.
                prev = first if s == 0 else Previous(h, y_qp, di.bias_h, di.rq_h)
                h_new, c_new, count = self.int_cell(layer, zx[s], prev, c, di, ints, y_qp, options)
                wrapped += count
                ok = valid[s][:, None]
                h = np.where(ok, h_new, h)
                c = np.where(ok, c_new, c)
                y[times[s][valid[s]], d, batch[valid[s]]] = h_new[valid[s]]
        if dims.layout == 1:
            y = y.transpose(2, 0, 1, 3)
        return np.ascontiguousarray(y.astype(y_qp.storage_dtype)), wrapped

    def int_cell(self, layer, zx, prev: Previous, c, di: DirectionInts, ints: RecurrentInts, y_qp: QParams,
                 options: ExecOptions):
        """One step on the integers: (h_t on Y's grid, c_t, wrapped accumulations)."""
        raise NotImplementedError

    def recurrent_q510(self, q, prev: Previous, di: DirectionInts, rows: slice, options: ExecOptions):
        """8-bit ``q`` on ``prev``'s grid times R's gate rows ``rows``: (Q5.10 (B, rows), wrapped accumulations)."""
        return gemm_q510(q.astype(prev.qp.storage_dtype), di.r_q[rows], prev.bias[rows], _rows(prev.rq, rows), options)

    # -- vector cost (the tiler never asks: the op emits its own instructions) -----------------
    def vector_cost(self, layer, in_elements, out_elements, lanes, int8):
        dims = self.dims(layer)
        steps = steps_run(layer, dims)
        elements = dims.batch * dims.hidden
        passes = steps * dims.directions * (dims.batch * vectors(dims.gh, lanes) + self.tail_passes(elements, lanes))
        return VectorCost(self.name, "none", passes, activation_ops=steps * dims.directions * dims.batch * dims.gh * 2)

    def tail_passes(self, elements: int, lanes: int) -> int:
        return 2 * vectors(elements, lanes)

    # -- ONNX export ---------------------------------------------------------------------------
    def export(self, b, layer, inputs, weight, bias, y):
        dims = self.dims(layer)
        name = layer.name
        ints: RecurrentInts | None = layer.attr("integers")
        if ints is None:
            w_name = b.const(f"{name}_rnn_W", np.ascontiguousarray(layer.weight[:, :, : dims.inputs]))
            r_name = b.const(f"{name}_rnn_R", np.ascontiguousarray(layer.weight[:, :, dims.inputs :]))
        else:
            w_name = _dequantized(b, f"{name}_rnn_W", [di.w_q for di in ints.directions],
                                  [di.w_qp for di in ints.directions])
            r_name = _dequantized(b, f"{name}_rnn_R", [di.r_q for di in ints.directions],
                                  [di.r_qp for di in ints.directions])
        node_inputs = [inputs[0], w_name, r_name, b.const(f"{name}_rnn_B", layer.bias)]
        lens = layer.attr("sequence_lens")
        lens_value = None if lens is None else np.broadcast_to(np.asarray(lens, np.int32), (dims.batch,)).copy()
        node_inputs.append(b.const(f"{name}_rnn_lens", lens_value) if lens is not None else "")
        for _, state_name in self.state_inputs():
            value = state(layer, state_name, dims)
            node_inputs.append("" if value is None
                               else b.const(f"{name}_rnn_{state_name}", np.ascontiguousarray(value)))
        while node_inputs and node_inputs[-1] == "":
            node_inputs.pop()
        x = node_inputs[0]
        if dims.layout == 1:   # ONNX Runtime runs layout 0 only
            x = b.node("Transpose", [x], f"{y}__time_major_x", f"{name}_x_T", perm=[1, 0, 2])
        node_inputs[0] = x
        out = y if dims.layout == 0 else f"{y}__time_major"
        b.nodes.append(helper.make_node(self.onnx_type, node_inputs, [out], name=name, hidden_size=dims.hidden,
                                        direction=layer.attr("direction"), **self.export_attrs(layer)))
        if dims.layout == 1:
            b.node("Transpose", [out], y, f"{name}_y_T", perm=[2, 0, 1, 3])

    def export_attrs(self, layer) -> dict:
        return {}

    # -- timing ----------------------------------------------------------------------------------
    def emit(self, compiler, index, layer, out, is_output):
        _Emitter(self, compiler, index, layer, out, is_output).run()

    def recurrent_gemms(self, layer: Layer, dims: Dims) -> tuple[int, ...]:
        """Output columns of each dependent recurrent GEMM of a step (LSTM, GRU lbr=1: one of G*H)."""
        return (dims.gh,)

    def emit_tail(self, e: "_Emitter", d: int, first: bool, h_prev, y_region) -> None:
        raise NotImplementedError


def _rows(r: Requant, rows: slice) -> Requant:
    from tpusim.quant.qlayer import Requant
    if r.channels == 1:
        return r
    return Requant(m0=r.m0[rows], shift=r.shift[rows], real=r.real[rows])


def _dequantized(b, name: str, values: list[np.ndarray], qps: list[QParams]) -> str:
    """int8 (D, N, K) weights through one DequantizeLinear (per channel over the D*N rows), reshaped back."""
    from tpusim.quant.qlayer import scalar
    stacked = np.stack(values)
    d, n, k = stacked.shape
    per_channel = qps[0].axis is not None
    if per_channel:
        scale = np.concatenate([np.asarray(qp.scale, np.float32).reshape(-1) for qp in qps])
        flat = b.const(f"{name}_quantized", stacked.reshape(d * n, k))
        deq = b.node("DequantizeLinear", [flat, b.const(f"{name}_scale", scale),
                                          b.const(f"{name}_zero_point", np.zeros(d * n, np.int8))],
                     f"{name}_dq_flat", f"{name}_DQ", axis=0)
        return b.node("Reshape", [deq, b.const(f"{name}_shape", np.array([d, n, k], np.int64))], f"{name}_dq",
                      f"{name}_DQ_reshape")
    if d == 1:
        return b.node("DequantizeLinear", [b.const(f"{name}_quantized", stacked),
                                           b.const(f"{name}_scale", np.float32(scalar(qps[0].scale))),
                                           b.const(f"{name}_zero_point", np.int8(0))], f"{name}_dq", f"{name}_DQ")
    parts = []
    for i, (v, qp) in enumerate(zip(values, qps)):
        parts.append(b.node("DequantizeLinear", [b.const(f"{name}_{i}_quantized", v[None]),
                                                 b.const(f"{name}_{i}_scale", np.float32(scalar(qp.scale))),
                                                 b.const(f"{name}_{i}_zero_point", np.int8(0))],
                            f"{name}_{i}_dq", f"{name}_{i}_DQ"))
    return b.node("Concat", parts, f"{name}_dq", f"{name}_DQ_concat", axis=0)


# ----------------------------------------------------------------------------------- instruction stream

class _Emitter:
    """The instructions of one recurrent layer (see the module docstring, *Timing*).

    Unified-buffer use: Y (the layer's output) holds step t's h of direction d in a block of batch x H
    bytes at (t D + d), time-major whatever the ONNX layout (the bytes are the tiler's; their order
    inside is ours). Beside it the layer keeps, per direction, the cell state, a gate buffer, two step
    buffers and the Q5.10 input projection of a block of steps. When these do not fit next to the input
    and output, the batch is processed in row groups, each a full pass over the steps (re-fetching the
    weights); an input or output that does not fit at all is streamed from / to host memory (spill)."""

    def __init__(self, op: RecurrentOp, compiler, index: int, layer: Layer, out, is_output: bool):
        from tpusim.mapping.tiler import column_tiles

        self.op, self.c, self.li, self.layer, self.out, self.is_output = op, compiler, index, layer, out, is_output
        self.dims = dims = op.dims(layer)
        self.steps = steps_run(layer, dims)
        self.eb = compiler.eb
        self.ib = INTERMEDIATE_BYTES if compiler.int8 else compiler.eb
        self.lanes = compiler.lanes
        self.requant = compiler._requant_mode()
        self.extra_pass = (self.requant == "per-channel"
                           and compiler.cfg.activation_unit.per_channel_requant == "extra_pass")
        rows, cols, eb = compiler.rows, compiler.cols, compiler.eb
        self.w_tiles = column_tiles(dims.inputs, dims.gh, 1, rows, cols, eb, False)[0]
        self.w_col_starts = [sum(t.n_cols for t in self.w_tiles[:n]) for n in range(len(self.w_tiles))]
        self.r_tiles = [column_tiles(dims.hidden, n, 1, rows, cols, eb, False)[0]
                        for n in op.recurrent_gemms(layer, dims)]
        self.inp = compiler.tensors[compiler.resolve(layer.inputs[0])]
        self.in_host = self.inp.ub_addr is None
        self.out_host = out.ub_addr is None
        self.hoisted = compiler.cfg.mapping.recurrent_input == "hoisted"
        self.allocated: list[tuple[int, int]] = []
        self.array_tile = None   # the weight tile now in the array: (kind, direction, column tile, fold)
        self.fetched = self.streamed = self.useful = 0
        self.scale_fetched: set = set()
        self.on_chip: dict[tuple[str, int], object] = {}
        self.code = compiler.code
        self.b0, self.batch = 0, dims.batch   # the row group being emitted: rows [b0, b0 + batch)

    # -- unified buffer -----------------------------------------------------------------------
    def fail(self, what: str) -> TpusimError:
        return TpusimError(f"layer {self.layer.name!r}: {what}")

    def alloc(self, nbytes: int):
        from tpusim.mapping.isa import UbRegion

        addr = self.c.ub.alloc(nbytes)
        if addr is None:
            return None
        self.allocated.append((addr, nbytes))
        return UbRegion(addr, nbytes)

    def free_all(self) -> None:
        for addr, nbytes in self.allocated:
            self.c.ub.free(addr, nbytes)
        self.allocated = []

    def buffers(self, rows: int) -> bool:
        """Allocate the per-row-group buffers for ``rows`` batch rows (one step of input projection); False
        (and nothing allocated) when they do not fit."""
        dims = self.dims
        d_count, h = dims.directions, dims.hidden
        h_bytes = rows * h * self.eb
        wanted = {
            "h0": [h_bytes if self.layer.attr("initial_h") is not None else 0] * d_count,
            "cell": [rows * h * self.ib if self.op.has_cell else 0] * d_count,
            "gates": [rows * dims.gh * self.ib] * d_count,
            "scratch0": [rows * h * max(self.ib, self.eb)] * d_count,
            "scratch1": [rows * h * max(self.ib, self.eb)] * d_count,
            "ring0": [h_bytes if self.out_host else 0] * d_count,
            "ring1": [h_bytes if self.out_host else 0] * d_count,
            "gx": [rows * dims.gh * self.ib] * d_count,
            "x": [rows * dims.inputs * self.eb if self.in_host else 0],
        }
        got: dict[str, list] = {}
        for name, sizes in wanted.items():
            got[name] = []
            for size in sizes:
                region = self.alloc(size) if size else None
                if size and region is None:
                    self.free_all()
                    return False
                got[name].append(region)
        self.h0, self.cell, self.gates = got["h0"], got["cell"], got["gates"]
        self.scratch = [list(pair) for pair in zip(got["scratch0"], got["scratch1"])]
        self.y_ring = [list(pair) for pair in zip(got["ring0"], got["ring1"])]
        self.gx, self.x_stage = got["gx"], got["x"][0]
        return True

    def keep_weights_on_chip(self) -> None:
        """With a direct unified-buffer -> weight-FIFO path (``computed_weights.path: direct``; TPU v1 has none),
        weights fetched every step (R, and W when the input GEMM runs per step) are brought on chip once,
        from host memory, and read from the unified buffer each step -- when they fit beside the activations."""
        from tpusim.mapping.isa import ReadHostMemory

        if self.c.cfg.computed_weights.path != "direct" or self.on_chip:
            return
        dims = self.dims
        kinds = [("R", dims.gh * dims.hidden)] + ([] if self.hoisted else [("W", dims.gh * dims.inputs)])
        for kind, count in kinds:
            for d in range(dims.directions):
                region = self.alloc(count * self.eb)
                if region is None:
                    return
                self.on_chip[(kind, d)] = region
                self.code.append(ReadHostMemory(self.li, self.c._host_alloc(region.nbytes), region, spill=False))

    def y_region(self, t: int, d: int):
        """Where step t's h of direction d (this row group's rows) lives: its block of Y, or a staging slot
        when Y is in host memory."""
        from tpusim.mapping.isa import UbRegion

        if self.out_host:
            return self.y_ring[d][t % 2]
        dims = self.dims
        block = ((t * dims.directions + d) * dims.batch + self.b0) * dims.hidden * self.eb
        return UbRegion(self.out.ub_addr + block, self.batch * dims.hidden * self.eb)

    def write_out(self, y, t: int, d: int) -> None:
        """A host-resident output: step t's h of direction d goes to host memory."""
        from tpusim.mapping.isa import WriteHostMemory

        if self.out_host:
            dims = self.dims
            offset = ((t * dims.directions + d) * dims.batch + self.b0) * dims.hidden * self.eb
            self.code.append(WriteHostMemory(self.li, y, self.out.host_addr + offset, spill=not self.is_output))

    def x_region(self, t0: int, count: int):
        """This row group's input rows of steps [t0, t0 + count): read from host memory into the staging
        buffer first when the input does not fit the unified buffer. (Rows of one step are contiguous in
        time-major input; for a layout-1 input the region spans the whole input, a conservative dependence.)"""
        from tpusim.mapping.isa import ReadHostMemory, UbRegion

        dims = self.dims
        row_bytes = dims.inputs * self.eb
        if self.in_host:
            region = UbRegion(self.x_stage.addr, count * self.batch * row_bytes)
            for t in range(t0, t0 + count):
                self.code.append(ReadHostMemory(self.li, self.inp.host_addr + (t * dims.batch + self.b0) * row_bytes,
                                                UbRegion(region.addr + (t - t0) * self.batch * row_bytes,
                                                         self.batch * row_bytes),
                                                spill=not self.inp.graph_input))
            return region
        if dims.layout == 1 or self.batch != dims.batch:
            return UbRegion(self.inp.ub_addr, self.inp.nbytes)
        return UbRegion(self.inp.ub_addr + t0 * dims.batch * row_bytes, count * dims.batch * row_bytes)

    def gx_share(self, d: int, s: int, first_col: int, n_cols: int) -> tuple:
        """The regions of step ``s``'s input projection (direction d) holding gate columns
        ``[first_col, first_col + n_cols)``. The buffer is laid out by column tile of W, each tile's rows
        contiguous, so that an input-GEMM drain writes, and a gate drain of the same columns reads, one
        region; a column range that cuts a W tile reads it row by row."""
        from tpusim.mapping.isa import UbRegion

        block_rows = self.gx[d].nbytes // (self.dims.gh * self.ib)
        row0 = (s % self.block) * self.batch
        end = first_col + n_cols
        regions = []
        for start, tile in zip(self.w_col_starts, self.w_tiles):
            width = tile.n_cols
            lo, hi = max(first_col, start), min(end, start + width)
            if lo >= hi:
                continue
            tile_base = self.gx[d].addr + start * block_rows * self.ib
            if (lo, hi) == (start, start + width):
                regions.append(UbRegion(tile_base + row0 * width * self.ib, self.batch * width * self.ib))
            else:
                regions.extend(UbRegion(tile_base + ((row0 + b) * width + lo - start) * self.ib, (hi - lo) * self.ib)
                               for b in range(self.batch))
        return tuple(regions)

    def gate_columns(self, gates, spans: tuple) -> tuple:
        """The regions of the (batch x gates H) ``gates`` buffer holding column ``spans`` [lo, hi): one per
        batch row and span, so that a pass reads only the gates it uses."""
        from tpusim.mapping.isa import UbRegion

        row_bytes = self.dims.gh * self.ib
        return tuple(UbRegion(gates.addr + b * row_bytes + lo * self.ib, (hi - lo) * self.ib)
                     for b in range(self.batch) for lo, hi in spans)

    # -- instructions ---------------------------------------------------------------------------
    def scale_bytes(self, n_cols: int) -> int:
        """Requantization scale-vector bytes of a drain: per channel, each column tile's vector every time
        (the steps alternate between tiles); per tensor, one multiplier for the layer."""
        from tpusim.mapping.tiler import REQUANT_VECTOR_BYTES

        if self.requant == "per-channel":
            return n_cols * REQUANT_VECTOR_BYTES
        if self.requant == "per-tensor" and not self.scale_fetched:
            self.scale_fetched.add("tensor")
            return REQUANT_VECTOR_BYTES
        return 0

    def gemm(self, kind: str, d: int, tiles, dram_addr: int, src, m_rows: int, drain) -> None:
        """Stream ``m_rows`` rows of ``src`` through ``tiles`` (chunked to an accumulator half), calling
        ``drain(tile index, tile, first row, rows, acc address)`` after each chunk's last K fold. A tile
        already in the array (a single-tile R that nothing displaced since the last step) is not fetched."""
        from tpusim.mapping.isa import MatrixMultiply, ReadWeights, ReadWeightsFromUb, UbRegion

        chunk = self.c.acc_chunk
        addr = dram_addr
        base = self.r_addr[d] if kind[0] == "R" else self.w_addr[d]
        store = self.on_chip.get((kind[0], d))
        for n, tile in enumerate(tiles):
            for m0 in range(0, m_rows, chunk):
                rows = min(chunk, m_rows - m0)
                acc = self.c._next_acc_addr(rows)
                fold_addr = addr
                for f, fold in enumerate(tile.folds):
                    key = (kind, d, n, f)
                    load = self.array_tile != key
                    if load:
                        if store is not None:
                            self.code.append(ReadWeightsFromUb(self.li, UbRegion(store.addr + fold_addr - base,
                                                                                 fold.nbytes),
                                                               fold.nbytes, fold.k_rows, fold.n_cols))
                        else:
                            self.code.append(ReadWeights(self.li, fold_addr, fold.nbytes, fold.k_rows, fold.n_cols))
                        self.fetched += 1
                        self.array_tile = key
                    self.code.append(MatrixMultiply(self.li, src, acc, rows, fold.k_rows, fold.n_cols,
                                                    fold.macs_per_row, rows * fold.k_rows * self.eb,
                                                    load_weights=load, accumulate=f > 0))
                    self.streamed += rows
                    self.useful += rows * fold.macs_per_row
                    fold_addr += fold.nbytes
                drain(n, tile, m0, rows, acc)
            addr += sum(fold.nbytes for fold in tile.folds)

    def drain(self, acc: int, rows: int, n_cols: int, sources: tuple, dst, out_bytes: int, function: str,
              ops_per_element: int) -> None:
        """The activation unit reads ``rows`` accumulator rows (and ``sources``), requantizes them, applies
        ``ops_per_element`` element ops (a gate drain: add the input part, look the nonlinearity up), writes
        ``dst``."""
        from tpusim.mapping.isa import Activate

        passes = rows * -(-n_cols // self.lanes)
        elements = rows * n_cols
        requant_ops = elements if self.requant != "none" else 0
        if self.extra_pass:
            passes *= 2
            requant_ops *= 2
        self.code.append(Activate(
            self.li, function, "none", self.requant, acc, rows, n_cols, sources, dst, out_bytes, passes,
            activation_ops=elements * ops_per_element, pool_ops=0, requant_ops=requant_ops,
            requant_scale_bytes=self.scale_bytes(n_cols), extra_requant_pass=self.extra_pass))

    def vector(self, function: str, sources: tuple, dst, out_bytes: int, elements: int, ops_per_element: int,
               requant: bool) -> None:
        """An activation-unit pass over ``elements`` unified-buffer elements (one lanes-wide vector a cycle)."""
        from tpusim.mapping.isa import Activate

        self.code.append(Activate(
            self.li, function, "none", "none", 0, 0, 0, sources, dst, out_bytes, vectors(elements, self.lanes),
            activation_ops=elements * ops_per_element, pool_ops=0,
            requant_ops=elements if requant and self.c.int8 else 0, requant_scale_bytes=0))

    # -- the layer -----------------------------------------------------------------------------
    def run(self) -> None:
        from tpusim.mapping.isa import LayerMapping, ReadHostMemory, UbRegion

        dims, c, layer = self.dims, self.c, self.layer
        D, B, H = dims.directions, dims.batch, dims.hidden
        base = c.dram_top
        c.dram_top += layer.weight_count * self.eb
        self.w_addr = [base + d * dims.gh * (dims.inputs + H) * self.eb for d in range(D)]
        self.r_addr = [self.w_addr[d] + dims.gh * dims.inputs * self.eb for d in range(D)]
        rows = B
        while not self.buffers(rows):
            if rows == B and not self.out_host:
                # The whole batch's buffers do not fit beside the input and output: the output goes to host
                # memory (a spill, so the sub-batcher runs smaller batches instead), then row groups if need be.
                c.ub.free(self.out.ub_addr, self.out.nbytes)
                self.out.ub_addr, self.out_host = None, True
                continue
            if rows == 1:
                raise self.fail(f"the unified buffer ({c.cfg.unified_buffer.capacity_bytes} bytes) has no room for the "
                                "buffers of one batch row beside its input")
            rows = -(-rows // 2)
        self.free_all()
        groups = [(b0, min(rows, B - b0)) for b0 in range(0, B, rows)]
        c0 = layer.attr("initial_c") is not None
        for b0, count in groups:
            self.b0, self.batch = b0, count
            self.buffers(count)
            self.keep_weights_on_chip()
            for d in range(D):
                if self.h0[d] is not None:
                    self.code.append(ReadHostMemory(self.li, c._host_alloc(self.h0[d].nbytes), self.h0[d], spill=False))
                if c0 and self.cell[d] is not None:
                    self.code.append(ReadHostMemory(self.li, c._host_alloc(self.cell[d].nbytes), self.cell[d],
                                                    spill=False))
            self.cell_loaded = [c0] * D
            self.grow_to_block()
            self.steps_of_group()
            self.free_all()
            self.on_chip = {}
        if self.steps < dims.steps_total:   # steps past the longest sequence: Y is zero there
            h_bytes = B * H * self.eb
            if self.out_host:
                self.b0, self.batch = 0, min(rows, B)
                zero = self.alloc(self.batch * H * self.eb)
                self.vector("zeros", (), zero, zero.nbytes, zero.nbytes // self.eb, 0, False)
                for b0, count in groups:
                    self.b0, self.batch = b0, count
                    for t in range(self.steps, dims.steps_total):
                        for d in range(D):
                            self.write_out(UbRegion(zero.addr, count * H * self.eb), t, d)
                self.free_all()
            else:
                tail = UbRegion(self.out.ub_addr + self.steps * D * h_bytes,
                                (dims.steps_total - self.steps) * D * h_bytes)
                self.vector("zeros", (), tail, tail.nbytes, tail.nbytes // self.eb, 0, False)
        gemm = GemmShape(m=self.steps * B, k=dims.inputs + H, n=dims.gh, groups=D)
        k_folds = len(self.w_tiles[0].folds) + sum(len(t[0].folds) for t in self.r_tiles)
        utilization = self.useful / (self.streamed * c.rows * c.cols) if self.streamed else 0.0
        c.mappings.append(LayerMapping(layer.name, layer.op, gemm, len(self.r_tiles[0]), k_folds,
                                       self.steps * len(groups), 1, self.fetched, self.in_host or self.out_host,
                                       utilization))

    def grow_to_block(self) -> None:
        """Steps per hoisted input GEMM (``self.block``): as many as the free unified buffer holds (1 when
        per step); the one-step input-projection (and input staging) buffers grow to that block."""
        self.block = 1
        if not self.hoisted or self.steps == 1:
            return
        one_step = [r for r in self.gx + [self.x_stage] if r is not None]
        for region in one_step:
            self.c.ub.free(region.addr, region.nbytes)
            self.allocated.remove((region.addr, region.nbytes))
        per_step = sum(r.nbytes for r in one_step)
        room = self.c.ub.largest_free() - self.c.ub.align * (len(one_step) + 1)
        block = max(1, min(self.steps, room // per_step))
        while True:
            regions = [self.alloc(block * r.nbytes) for r in one_step]
            if all(r is not None for r in regions) or block == 1:
                break
            for r in regions:
                if r is not None:
                    self.c.ub.free(r.addr, r.nbytes)
                    self.allocated.remove((r.addr, r.nbytes))
            block = max(1, block // 2)
        self.block = block
        self.gx = regions[: len(self.gx)]
        if self.x_stage is not None:
            self.x_stage = regions[-1]

    def steps_of_group(self) -> None:
        dims = self.dims
        for s in range(self.steps):
            if s % self.block == 0:
                count = min(self.block, self.steps - s)
                for d in range(dims.directions):
                    self.input_gemm(d, s, count)
            for d in range(dims.directions):
                t = self.time(d, s)
                h_prev = self.h0[d] if s == 0 else self.y_region(self.time(d, s - 1), d)
                y = self.y_region(t, d)
                self.op.emit_tail(self, d, s, h_prev, y)
                self.write_out(y, t, d)

    def time(self, d: int, s: int) -> int:
        return self.steps - 1 - s if direction_reversed(self.layer, d) else s

    def input_gemm(self, d: int, s: int, count: int) -> None:
        """x W^T for steps [s, s + count) of direction d into the Q5.10 input-projection buffer."""
        from tpusim.mapping.isa import UbRegion

        dims = self.dims
        times = [self.time(d, j) for j in range(s, s + count)]
        src = self.x_region(min(times), count)
        block_rows = self.gx[d].nbytes // (dims.gh * self.ib)

        def drain(n, tile, m0, rows, acc):   # tile n's rows are contiguous (see gx_share)
            tile_base = self.gx[d].addr + self.w_col_starts[n] * block_rows * self.ib
            dst = UbRegion(tile_base + m0 * tile.n_cols * self.ib, rows * tile.n_cols * self.ib)
            self.drain(acc, rows, tile.n_cols, (), dst, dst.nbytes, "requant", 0)

        self.gemm("W", d, self.w_tiles, self.w_addr[d], src, count * self.batch, drain)

    def r_col_starts(self, which: int, first_col: int) -> list[int]:
        tiles = self.r_tiles[which]
        return [first_col + sum(t.n_cols for t in tiles[:n]) for n in range(len(tiles))]

    def recurrent_gemm(self, d: int, s: int, which: int, src, gate_fn: str, first_col: int, dst) -> None:
        """Recurrent GEMM ``which`` of direction d on ``src`` (h_{t-1}, or r*h for GRU's R_h) and its drains,
        each adding its own columns of step ``s``'s input projection."""
        dims = self.dims
        addr = self.r_addr[d] + first_col * dims.hidden * self.eb
        starts = self.r_col_starts(which, first_col)

        def drain(n, tile, m0, rows, acc):
            self.drain(acc, rows, tile.n_cols, self.gx_share(d, s, starts[n], tile.n_cols), dst,
                       rows * tile.n_cols * self.ib, gate_fn, 2)

        self.gemm(f"R{which}", d, self.r_tiles[which], addr, src, self.batch, drain)

    def gates_without_gemm(self, d: int, s: int, which: int, gate_fn: str, first_col: int, dst) -> None:
        """Step 0 with a zero initial state: no recurrent multiply, the drains read the input part only."""
        for start, tile in zip(self.r_col_starts(which, first_col), self.r_tiles[which]):
            self.vector(gate_fn, self.gx_share(d, s, start, tile.n_cols), dst, self.batch * tile.n_cols * self.ib,
                        self.batch * tile.n_cols, 2, False)


# ----------------------------------------------------------------------------------- the rewrite

RECURRENT_TYPES = ("LSTM", "GRU")
BATCH_FIRST_SUFFIX = "__batch_first"


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _set_attr(node: onnx.NodeProto, name: str, value) -> None:
    for a in list(node.attribute):
        if a.name == name:
            node.attribute.remove(a)
    node.attribute.append(helper.make_attribute(name, value))


def _perm(node: onnx.NodeProto) -> tuple[int, ...] | None:
    p = _attr(node, "perm")
    return None if p is None else tuple(int(v) for v in p)


def batch_first(model: onnx.ModelProto) -> onnx.ModelProto:
    """PyTorch's time-major recurrent chains made batch-first (see the module docstring), in place; unchanged
    when there is nothing to do."""
    g = model.graph
    if not any(n.op_type in RECURRENT_TYPES and int(_attr(n, "layout", 0)) == 0 for n in g.node):
        return model
    inits = {t.name: t for t in g.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for n in g.node:
        for i in n.input:
            if i:
                consumers[i].append(n)
    graph_outputs = {o.name for o in g.output}
    shapes = static_shapes(model.graph)

    def const(name: str) -> np.ndarray | None:
        return numpy_helper.to_array(inits[name]) if name in inits else None

    new_inits: list[onnx.TensorProto] = []

    def add_const(name: str, value: np.ndarray) -> str:
        new_inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    bf_of: dict[str, str] = {}                    # time-major tensor -> the tensor holding its values batch-first
    changed: set[str] = set()                     # names that now hold batch-first values (were time-major)
    flipped: dict[str, tuple[int, int]] = {}      # Y of a flipped node (now (B, T, D, H)) -> (D, H)
    pending: dict[int, str] = {}                  # id(Reshape node) -> the flipped Y it now reshapes directly
    out: list[onnx.NodeProto] = []

    def copy(n: onnx.NodeProto) -> onnx.NodeProto:
        node = onnx.NodeProto()
        node.CopyFrom(n)
        return node

    # Every tensor keeps its original name, so that ONNX Runtime's calibration run of the original model
    # can observe it: a name whose values become batch-first is read only through the patterns below,
    # else nothing is rewritten (a time-major tensor cannot be restored without a new name).
    for n in g.node:
        if n.op_type == "Transpose" and _perm(n) == (1, 0, 2) and n.input[0] in changed:
            # time-major -> batch-first: the values already are batch-first
            out.append(helper.make_node("Identity", [n.input[0]], [n.output[0]], name=n.name))
            continue
        if n.op_type == "Transpose" and _perm(n) == (1, 0, 2) and n.input[0] not in changed:
            out.append(copy(n))
            bf_of[n.output[0]] = n.input[0]
            continue
        states = [i for i in range(5, len(n.input)) if n.input[i]]
        if (n.op_type in RECURRENT_TYPES and int(_attr(n, "layout", 0)) == 0 and n.input[0] in bf_of
                and n.output[0] and n.output[0] not in graph_outputs and all(n.input[i] in inits for i in states)):
            node = copy(n)
            node.input[0] = bf_of[n.input[0]]
            for i in states:
                value = const(n.input[i])
                if i in (5, 6) and value.ndim == 3:
                    node.input[i] = add_const(f"{n.input[i]}__{n.name}_batch_first", np.swapaxes(value, 0, 1))
            _set_attr(node, "layout", 1)
            out.append(node)
            for k in range(1, len(node.output)):   # Y_h / Y_c read: back to (D, B, H) for their readers
                name = node.output[k]              # (the lowering then refuses them, naming the node)
                if name and (consumers.get(name) or name in graph_outputs):
                    node.output[k] = f"{name}{BATCH_FIRST_SUFFIX}"
                    out.append(helper.make_node("Transpose", [node.output[k]], [name], name=f"{name}__restore",
                                                perm=[1, 0, 2]))
            direction = _attr(n, "direction", "forward")
            direction = direction.decode() if isinstance(direction, bytes) else direction
            hidden = int(_attr(n, "hidden_size", const(n.input[2]).shape[-1] if n.input[2] in inits else 0))
            flipped[n.output[0]] = (2 if direction == "bidirectional" else 1, hidden)
            changed.add(n.output[0])
            continue
        if n.op_type == "Squeeze" and n.input[0] in flipped and flipped[n.input[0]][0] == 1:
            axes = _attr(n, "axes")
            if axes is None and len(n.input) > 1 and n.input[1]:
                axes = const(n.input[1])
            if axes is not None and [int(a) for a in np.asarray(axes).reshape(-1)] == [1]:
                shape = add_const(f"{n.output[0]}__batch_first_shape", np.array([0, 0, -1]))
                out.append(helper.make_node("Reshape", [n.input[0], shape], [n.output[0]], name=n.name))
                bf_of[n.output[0]] = n.output[0]
                changed.add(n.output[0])
                continue
        if n.op_type == "Transpose" and _perm(n) == (0, 2, 1, 3) and n.input[0] in flipped:
            readers = consumers.get(n.output[0], [])
            if len(readers) == 1 and readers[0].op_type == "Reshape" and n.output[0] not in graph_outputs:
                target = const(readers[0].input[1]) if len(readers[0].input) > 1 else None
                d, h = flipped[n.input[0]]
                y_shape = shapes.get(n.input[0])  # the original (T, D, B, H)
                if (target is not None and target.size == 3 and int(target[-1]) in (-1, d * h)
                        and int(target[0]) in ((0,) if y_shape is None else (0, y_shape[0]))):
                    pending[id(readers[0])] = n.input[0]
                    continue
        if n.op_type == "Reshape" and id(n) in pending:
            shape = add_const(f"{n.output[0]}__batch_first_shape", np.array([0, 0, -1]))
            out.append(helper.make_node("Reshape", [pending.pop(id(n)), shape], [n.output[0]], name=n.name))
            bf_of[n.output[0]] = n.output[0]
            changed.add(n.output[0])
            continue
        if any(name in changed for name in n.input) or any(name in flipped for name in n.output):
            return model   # a time-major reader this rewrite does not know: leave the model as it is
        out.append(copy(n))
    if changed & graph_outputs:
        return model
    if not flipped:
        return model
    read = {i for m in out for i in m.input if i}
    kept = [m for m in out if not (m.op_type == "Transpose" and _perm(m) == (1, 0, 2) and m.output[0] not in read
                                   and m.output[0] not in graph_outputs)]
    del g.node[:]
    g.node.extend(kept)
    g.initializer.extend(new_inits)
    keep_info = [vi for vi in g.value_info if vi.name not in changed]
    del g.value_info[:]
    g.value_info.extend(keep_info)
    return model


register_rewrite(batch_first)
