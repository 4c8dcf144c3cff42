"""The built-in ``lstm`` workload: a stacked LSTM in the shape class of the TPU v1 paper's LSTM0.

LSTM0 (Jouppi et al. 2017, Table 1) has 52 M weights in 58 layers (24 FC, 34 vector) and ran at
batch 64; the paper gives no hidden size or sequence length. Six stacked LSTM layers of 1024 units on
1024-wide inputs hold 6 x 4 x 1024 x (1024 + 1024) = 50.3 M weights (each layer's four gates are four
FC layers of the paper's count, its sigmoids, tanhs and products the vector layers), and a 1600-way
output layer on the last step brings the total to 52.0 M. The sequence length (32 steps) is our choice.

The graph is what ``torch.onnx.export`` writes for ``nn.LSTM(1024, 1024, num_layers=6, batch_first=True)``
followed by ``nn.Linear`` on ``y[:, -1:]``: a Transpose to time-major, one ``LSTM`` node per layer with a
``Squeeze`` after it, a Transpose back, Slice, Flatten, Gemm. Weights are PyTorch's ``U(-1/sqrt(H),
1/sqrt(H))`` with a log-normal spread per gate row (trained gates differ in scale, so per-channel
quantization matters); each layer's W is rescaled until the input part of the gate pre-activations has a
standard deviation near 1 on the seeded sample (a trained LSTM's gates are neither saturated nor all at
0.5), R keeps torch's scale so that the recurrence stays contractive; the forget-gate bias starts at 1,
as is common practice.
"""
from __future__ import annotations

import numpy as np
from onnx import helper

from tpusim.workloads import GENERATOR_VERSION
from tpusim.workloads.builder import GeneratedModel, GraphBuilder, round_statistic
from tpusim.workloads.models import LOGIT_STD, _streams

LAYERS = 6
HIDDEN = 1024
FEATURES = 1024
STEPS = 32
CLASSES = 1600
SAMPLE_BATCH = 2
ROW_SIGMA = 0.3        # log-normal spread of the weight scale between gate rows
FORGET_BIAS = 1.0
GATE_STD = 1.0         # target std of the gate pre-activations on the sample


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return np.float32(1) / (np.float32(1) + np.exp(-x))


def lstm_forward(x: np.ndarray, w: np.ndarray, r: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ONNX LSTM (one forward direction, zero initial state, gates i, o, f, c) on time-major x (T, B, I):
    (Y (T, B, H), every step's gate pre-activations (T, B, 4H))."""
    hidden = r.shape[1]
    steps, batch, features = x.shape
    h = np.zeros((batch, hidden), x.dtype)
    c = np.zeros_like(h)
    gx = (x.reshape(steps * batch, features) @ w.T).reshape(steps, batch, 4 * hidden)
    gx += b[: 4 * hidden] + b[4 * hidden :]
    ys, pre = [], []
    for t in range(steps):
        z = gx[t] + np.einsum("bk,nk->bn", h, r, optimize=False)   # no BLAS threads for a small product
        i, o, f, g = np.split(z, 4, axis=1)
        c = _sigmoid(f) * c + _sigmoid(i) * np.tanh(g)
        h = _sigmoid(o) * np.tanh(c)
        ys.append(h)
        pre.append(z)
    return np.stack(ys), np.stack(pre)


class _Builder(GraphBuilder):
    """The workload builder with the ops a PyTorch LSTM export uses."""

    def transpose(self, x: str, perm: list[int]) -> str:
        return self._simple("Transpose", [x], np.ascontiguousarray(self.value(x).transpose(perm)), perm=perm)

    def lstm(self, x: str, hidden: int, *, name: str) -> str:
        """One LSTM layer on time-major x (T, B, I) and the Squeeze of its direction axis: (T, B, H)."""
        x_value = self.value(x)
        features = x_value.shape[2]
        bound = 1.0 / np.sqrt(hidden)
        rows = self._rng.lognormal(0.0, ROW_SIGMA, (4 * hidden, 1))
        rows /= np.sqrt(np.mean(rows**2))
        w = self._rng.uniform(-bound, bound, (4 * hidden, features)) * rows
        r = self._rng.uniform(-bound, bound, (4 * hidden, hidden)) * rows
        b = self._rng.uniform(-bound, bound, 8 * hidden)
        b[2 * hidden : 3 * hidden] = FORGET_BIAS                  # Wb of the forget gate (ONNX order i, o, f, c)
        b[6 * hidden : 7 * hidden] = 0.0                           # its Rb
        w, r, b = (v.astype(np.float32) for v in (w, r, b))
        # Only W is rescaled: R keeps torch's scale (spectral radius ~0.6), so the recurrence is
        # contractive, as a trained LSTM's is; scaling R up as well makes the synthetic network chaotic
        # (any perturbation, int8 rounding included, grows step by step, which no trained LSTM does).
        _, pre = lstm_forward(x_value, w, r * np.float32(0), b)
        w = w * np.float32(round_statistic(GATE_STD / float((pre - pre.mean(axis=(0, 1))).std())))
        y, _ = lstm_forward(x_value, w, r, b)
        names = [self._initializer(f"{name}.{p}", v[None]) for p, v in (("W", w), ("R", r), ("B", b))]
        y_name = f"{name}.Y"
        self._nodes.append(helper.make_node("LSTM", [x, *names], [y_name], name=name, hidden_size=hidden))
        self._store(y_name, y[:, None])
        axes = self._initializer_int(f"{name}.squeeze_axes", np.array([1], np.int64))
        return self._simple("Squeeze", [y_name, axes], y)

    def last_step(self, x: str) -> str:
        """``y[:, -1:]`` of a batch-first (B, T, H) tensor, as a Slice."""
        consts = [self._initializer_int(f"last_step.{k}", np.array([v], np.int64))
                  for k, v in (("starts", -1), ("ends", np.iinfo(np.int64).max), ("axes", 1))]
        return self._simple("Slice", [x, *consts], self.value(x)[:, -1:])

    def _initializer_int(self, name: str, array: np.ndarray) -> str:
        from onnx import numpy_helper

        self._initializers.append(numpy_helper.from_array(array, name))
        return name


def lstm(seed: int) -> GeneratedModel:
    """LSTM0-class stacked LSTM: 6 x LSTM(1024) over 32 steps, 1600-way output layer on the last step."""
    weight_seed, data_rng = _streams(seed)
    sample = data_rng.standard_normal((SAMPLE_BATCH, STEPS, FEATURES)).astype(np.float32)
    b = _Builder(sample, weight_seed)
    x = b.transpose("input", [1, 0, 2])
    for layer in range(LAYERS):
        x = b.lstm(x, HIDDEN, name=f"lstm.{layer}")
    x = b.flatten(b.last_step(b.transpose(x, [1, 0, 2])))
    out = b.gemm(x, CLASSES, name="fc", target_std=LOGIT_STD)
    doc = (f"LSTM0-class stacked LSTM: {LAYERS} x LSTM({HIDDEN}) on {FEATURES}-wide inputs over {STEPS} steps, "
           f"{CLASSES}-way output layer; synthetic weights")
    return b.finish(out, graph_name="lstm", doc=doc, seed=seed, generator_version=GENERATOR_VERSION)
