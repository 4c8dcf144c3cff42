"""The workload builder: the same model bytes whichever BLAS kernel the CPU picks."""
from __future__ import annotations

import gc
import os
import platform
import subprocess
import sys

import numpy as np
import pytest

from tpusim.workloads.builder import INPUT_NAME, STATISTIC_BITS, GraphBuilder, round_statistic

_PRINT_DIGESTS = """
import hashlib
from tpusim.workloads import build_model
for name in ("tiny_cnn", "mlp", "bert_tiny"):
    print(name, hashlib.sha256(build_model(name).SerializeToString()).hexdigest())
"""


def test_round_statistic_keeps_twelve_significant_bits() -> None:
    assert STATISTIC_BITS == 12
    # 1.2345 = 0.617250 * 2^1; 0.617250 * 4096 = 2528.26 -> 2528; 2528 / 2048 = 1.234375
    assert round_statistic(1.2345) == 1.234375
    assert round_statistic(-1.2345) == -1.234375
    assert round_statistic(0.0) == 0.0
    values = np.array([1.0, 2.0**-30, 1000.0])
    np.testing.assert_array_equal(round_statistic(values), values)  # powers of two and short mantissas stay
    # Just above 1 the step is 2^-11: past half of it rounds up, less rounds down.
    assert round_statistic(1.0 + 2.0**-12 + 2.0**-40) == 1.0 + 2.0**-11
    assert round_statistic(1.0 + 2.0**-13) == 1.0


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="OpenBLAS's x86 kernel names")
def test_built_in_models_do_not_depend_on_the_blas_kernel() -> None:
    """OpenBLAS picks its kernels by CPU; Prescott's (SSE3) sums in another order than the AVX2 and
    AVX-512 ones a modern CPU gets. In float32 the generator's files differed between the two."""
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_CORETYPE"}
    digests = [
        subprocess.run([sys.executable, "-c", _PRINT_DIGESTS], env=env | extra, capture_output=True, text=True,
                       check=True).stdout
        for extra in ({}, {"OPENBLAS_CORETYPE": "Prescott"})
    ]
    assert digests[0].count("\n") == 3
    assert digests[0] == digests[1]


def test_the_builder_keeps_a_sample_value_while_the_model_code_holds_its_name() -> None:
    sample = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)
    b = GraphBuilder(sample, seed=0)
    y = b.relu(b.conv(INPUT_NAME, 4, 3, name="conv"))  # the conv's name is dropped at once
    kept = b.value(y).copy()
    z = b.relu(y)
    gc.collect()
    with pytest.raises(KeyError):
        b.value("conv")
    np.testing.assert_array_equal(b.value(y), kept)  # (still held)
    model = b.finish(z, graph_name="g", doc="", seed=0, generator_version=0)
    assert list(model.activation_std) == [INPUT_NAME, "conv", y, "output"]  # every tensor's, dropped or not
    assert model.activation_std["conv"] > 0 and model.activation_std[y] == float(kept.std())
