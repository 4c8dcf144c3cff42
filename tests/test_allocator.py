"""tpusim.allocator: the processes tpusim starts for itself keep the memory they free for their next allocations."""
from __future__ import annotations

import ctypes
import os
import platform
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from tpusim.allocator import keep_freed_memory
from tpusim.sweeps import pool_map

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="tunes glibc's malloc only")

_BLOCK = 4 << 20


def faults_of_freed_blocks_used_again(_: object = None) -> int:
    """Page faults of ten rounds of three 4 MiB blocks allocated, written and freed, after one such round.
    glibc by default gives the 12 MiB back to the kernel each round (its heap's top passes twice the largest
    block freed), and every page faults in again; kept, they fault in once."""
    libc = ctypes.CDLL(None)
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]

    def use_and_free() -> None:
        blocks = [libc.malloc(_BLOCK) for _ in range(3)]
        for block in blocks:
            ctypes.memset(block, 1, _BLOCK)
        for block in blocks:
            libc.free(block)

    use_and_free()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        use_and_free()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def _in_a_new_process(tuned: bool) -> int:
    code = (f"from test_allocator import faults_of_freed_blocks_used_again, keep_freed_memory\n"
            f"{'keep_freed_memory()' if tuned else ''}\nprint(faults_of_freed_blocks_used_again())")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 0, result.stderr
    return int(result.stdout.split()[-1])


def test_freed_memory_is_used_again_instead_of_faulting_in_again():
    plain, tuned = _in_a_new_process(tuned=False), _in_a_new_process(tuned=True)
    # at least a fault a block a round (one a 4 KiB page here; one a 2 MiB page where every mapping gets huge pages)
    assert plain >= 10 * 3 and plain > 10 * tuned
    assert tuned < 100


def test_a_sweep_worker_keeps_the_memory_it_frees(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]))
    [(_, faults)] = pool_map(faults_of_freed_blocks_used_again, [None], jobs=1)
    assert faults < 100
