"""The console script's entry point (``tpusim.__main__``): what it does around the command line."""
from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

TPU_V1 = str(Path(__file__).resolve().parents[1] / "configs" / "tpu_v1.yaml")


def test_a_finished_command_leaves_its_objects_out_of_the_shutdowns_garbage_collections(tmp_path):
    code = "import gc, sys; from tpusim.__main__ import main; code = main(); print(gc.get_freeze_count()); sys.exit(code)"
    argv = ["run", TPU_V1, "--model", "tiny_cnn", "--no-quantize", "--out", str(tmp_path / "out")]
    result = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120)
    frozen = int(result.stdout.split()[-1])
    assert result.returncode == 0 and (tmp_path / "out" / "summary.json").exists()
    assert frozen > 10_000  # numpy, onnx, numba and the run's result: everything alive at the end


def test_blas_threads_sleep_at_once_unless_the_user_set_otherwise(tmp_path):
    # OpenBLAS reads the setting when it loads: the entry point sets it before anything imports numpy
    code = ("import os, sys; from tpusim.__main__ import main; assert 'numpy' not in sys.modules; code = main(); "
            "print(os.environ['OPENBLAS_THREAD_TIMEOUT']); sys.exit(code)")
    argv = ["run", TPU_V1, "--model", "tiny_cnn", "--no-quantize", "--out", str(tmp_path / "out")]
    env = {name: value for name, value in os.environ.items() if name != "OPENBLAS_THREAD_TIMEOUT"}
    for users, expected in ((None, "4"), ("20", "20")):
        run_env = env if users is None else {**env, "OPENBLAS_THREAD_TIMEOUT": users}
        result = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120,
                                env=run_env)
        assert result.returncode == 0, result.stderr
        assert result.stdout.split()[-1] == expected


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="tunes glibc's malloc only")
def test_the_command_keeps_the_memory_it_frees_for_its_next_allocations():
    code = ("import sys; from tpusim.__main__ import main; from test_allocator import faults_of_freed_blocks_used_again\n"
            "sys.argv[1:] = ['--help']\ntry:\n    main()\nexcept SystemExit:\n    pass\n"
            "print(faults_of_freed_blocks_used_again())")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 0, result.stderr
    assert int(result.stdout.split()[-1]) < 100


def test_a_ctrl_c_lost_in_a_callback_from_c_arrives_after_it():
    # A KeyboardInterrupt raised where Python cannot propagate it (here a __del__; in a run, llvmlite's object
    # cache called back while Numba compiles) reaches the unraisable hook, which sends it again: it must then
    # interrupt the main thread's next Python work, not be printed as an exception the hook itself ignored.
    # The child takes Python's own SIGINT handler: started from a shell's background job, SIGINT comes ignored,
    # and Python keeps it so (the resent interrupt would then never arrive: the test failed so, run with `&`).
    code = """
import signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)
from tpusim import __main__ as entry
sys.unraisablehook = entry._raise_lost_interrupts
class Interrupted:
    def __del__(self):
        raise KeyboardInterrupt
Interrupted()
start = time.monotonic()
try:
    time.sleep(30)
except KeyboardInterrupt:
    print("interrupted", time.monotonic() - start < 5)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert (result.stdout.strip(), result.stderr) == ("interrupted True", "")  # at once, not once the sleep is over
