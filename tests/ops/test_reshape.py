import numpy as np
import pytest

from onnx_graphs import GraphBuilder, run_onnxruntime
from op_checks import check_all_stages

from tpusim.errors import ModelError
from tpusim.frontend import lower_model, run_reference


def _tokens(target, allowzero: int = 1):
    # The dynamo exporter's patch embedding: Conv -> Reshape(allowzero=1) to a hard-coded [1, C, H*W].
    g = GraphBuilder((1, 3, 8, 8))
    x = g.conv(g.input_name, 3, 16, k=4, strides=[4, 4])  # (1, 16, 2, 2)
    r = g.node("Reshape", [x, g.const(np.array(target, np.int64))], allowzero=allowzero)
    return g.model(g.node("MatMul", [r, g.weight((4, 5))]), batch_dim=1)


def test_5d_reshape_and_back_through_every_stage():
    # [N, C, H, W] -> [N, g, C/g, H, W], an op on the 5-D tensor (the first 2 channels of each group), and back.
    g = GraphBuilder((1, 4, 6, 6))
    x = g.conv(g.input_name, 4, 8, pads=[1, 1, 1, 1])
    r = g.node("Reshape", [x, g.const(np.array([0, 2, 4, 6, 6], np.int64))])
    r = g.node("Slice", [r] + [g.const(np.array([v], np.int64)) for v in (0, 2, 2)])
    y = g.conv(g.node("Reshape", [r, g.const(np.array([-1, 4, 6, 6], np.int64))]), 4, 2)
    graph = check_all_stages(g.model(y), (1, 4, 6, 6), {"reshape", "slice"})
    assert [(layer.op, layer.output_shape) for layer in graph.layers] == [
        ("conv", (1, 8, 6, 6)), ("reshape", (1, 2, 4, 6, 6)), ("slice", (1, 2, 2, 6, 6)), ("reshape", (1, 4, 6, 6)),
        ("conv", (1, 2, 4, 4))]


def test_a_hard_coded_batch_holding_one_sample_follows_the_run_batch():
    model = _tokens([1, 16, 4])
    graph = check_all_stages(model, (1, 3, 8, 8), {"reshape"})
    assert [layer.op for layer in graph.layers] == ["conv", "reshape", "gemm"]
    # At batch 3 the target's 1 is the batch: each sample computes what the batch-1 model does.
    graph = lower_model(model, "r.onnx", batch=3)
    assert graph.layers[1].output_shape == (3, 16, 4)
    x = np.random.default_rng(10).standard_normal((3, 3, 8, 8)).astype(np.float32)
    ours = run_reference(graph, x)[graph.outputs[0]]
    theirs = np.concatenate([run_onnxruntime(model, x[i : i + 1])[0] for i in range(3)])
    np.testing.assert_allclose(ours, theirs, atol=1e-4 * float(np.ptp(theirs)))


def test_a_target_that_moves_samples_into_the_batch_is_refused():
    # A file exported for one sample may put any dim first when it runs as exported (torchvision's ViT
    # runs its attention sequence-first); at another batch the leading dim must stay the batch.
    model = _tokens([2, 8, 4], allowzero=0)
    graph = lower_model(model, "r.onnx")
    assert graph.layers[1].output_shape == (2, 8, 4)
    x = np.random.default_rng(11).standard_normal((1, 3, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(run_reference(graph, x)[graph.outputs[0]], run_onnxruntime(model, x)[0], atol=1e-5)
    with pytest.raises(ModelError, match="does not keep the batch dimension first|cannot reshape"):
        lower_model(model, "r.onnx", batch=2)
