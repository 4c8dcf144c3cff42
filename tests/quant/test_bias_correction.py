import dataclasses

import numpy as np

from tpusim.config import load_config
from tpusim.frontend import lower_model
from tpusim.ir import ConvAttrs, Layer
from tpusim.quant.arithmetic import dequantize, quantize, weight_qparams
from tpusim.quant.bias_correction import bias_shift, correct_bias, histogram_means, input_channel_means
from tpusim.quant.calibrate import collect_statistics, synthetic_inputs
from tpusim.quant.quantize import quantize_graph
from tpusim.workloads import build_model

QUANT = load_config("configs/tpu_v1.yaml").quant


def test_grouped_conv_shift_matches_a_naive_sum():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((6, 2, 3, 3)).astype(np.float32)  # groups=2: 3 outputs x 2 inputs per group
    layer = Layer(name="c", op="conv", inputs=("x",), output="y", input_shapes=((1, 4, 5, 5),), output_shape=(1, 6, 5, 5),
                  weight=w, bias=np.ones(6, np.float32),
                  conv=ConvAttrs(kernel=(3, 3), strides=(1, 1), pads=(1, 1, 1, 1), dilations=(1, 1), groups=2))
    w_hat = w + rng.standard_normal(w.shape).astype(np.float32) * 0.01
    mean = np.array([0.5, -1.0, 2.0, 3.0])
    expected = [sum((w_hat[n, c] - w[n, c]).sum() * mean[(n // 3) * 2 + c] for c in range(2)) for n in range(6)]
    np.testing.assert_allclose(bias_shift(layer, w_hat, mean), expected, rtol=1e-6)
    np.testing.assert_allclose(correct_bias(layer, w_hat, mean), 1.0 - np.array(expected), rtol=1e-6)


def test_corrected_gemm_has_no_mean_output_shift_on_its_calibration_data():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((8, 16)).astype(np.float32)
    layer = Layer(name="fc", op="gemm", inputs=("x",), output="y", input_shapes=((64, 16),), output_shape=(64, 8),
                  weight=w, bias=np.zeros(8, np.float32))
    x = rng.standard_normal((64, 16)) + 3.0
    qp = weight_qparams(w, "per-tensor")
    w_hat = dequantize(quantize(w, qp), qp).astype(np.float64)
    corrected = correct_bias(layer, w_hat, x.mean(axis=0)).astype(np.float64)
    shift_before = (x @ w_hat.T - x @ w.T).mean(axis=0)
    shift_after = (x @ w_hat.T + corrected - x @ w.T).mean(axis=0)
    assert np.abs(shift_before).max() > 1e-3
    np.testing.assert_allclose(shift_after, 0.0, atol=1e-5)


def test_histogram_mean_and_channel_means():
    model = build_model("tiny_cnn")
    graph = lower_model(model, "tiny_cnn")
    data = synthetic_inputs(graph.input_shape[1:], 2, seed=0)
    stats = collect_statistics(model, graph, data, 2048)
    means = input_channel_means(graph, data.inputs)
    for layer in graph.matrix_layers:
        name = layer.inputs[0]
        assert means[name].shape == (layer.input_shapes[0][1],)
        # the histogram's per-tensor mean is within a bin width of the exact mean over all channels
        assert abs(float(histogram_means(stats)[name]) - means[name].mean()) <= stats[name].bin_width
    corrected = quantize_graph(graph, stats, dataclasses.replace(QUANT, bias_correction=True, weights="per-tensor"),
                               input_means=means)
    plain = quantize_graph(graph, stats, dataclasses.replace(QUANT, weights="per-tensor"))
    for c, p in zip(corrected.layers, plain.layers):
        if c.layer.is_matrix:
            w_hat = dequantize(c.weight_q, c.weight_qparams)
            np.testing.assert_allclose(c.layer.bias, correct_bias(p.layer, w_hat, means[c.layer.inputs[0]]), rtol=1e-6)
    assert corrected.graph.layers[0].bias is not graph.layers[0].bias
