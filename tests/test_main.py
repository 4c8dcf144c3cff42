"""The console script's entry point (``tpusim.__main__``): what it does around the command line."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

TPU_V1 = str(Path(__file__).resolve().parents[1] / "configs" / "tpu_v1.yaml")


def test_a_finished_command_leaves_its_objects_out_of_the_shutdowns_garbage_collections(tmp_path):
    code = "import gc, sys; from tpusim.__main__ import main; code = main(); print(gc.get_freeze_count()); sys.exit(code)"
    argv = ["run", TPU_V1, "--model", "tiny_cnn", "--no-quantize", "--out", str(tmp_path / "out")]
    result = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120)
    frozen = int(result.stdout.split()[-1])
    assert result.returncode == 0 and (tmp_path / "out" / "summary.json").exists()
    assert frozen > 10_000  # numpy, onnx, numba and the run's result: everything alive at the end
