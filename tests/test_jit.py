import subprocess
import sys
import textwrap
import threading

import numpy as np

from tpusim.jit import LazyKernel, kernel


@kernel(cache=False)
def _doubled(a, i):
    return a[i] * 2


@kernel(cache=False, nogil=True, imports={"sqrt": "math"})
def _sum_doubled_roots(a):
    total = 0.0
    for i in range(a.size):
        total += sqrt(_doubled(a, i))  # noqa: F821  (bound when the kernel compiles)
    return total


def test_a_kernel_is_compiled_on_its_first_call_and_computes_as_its_python_function():
    a = np.arange(1.0, 9.0)
    assert isinstance(_sum_doubled_roots, LazyKernel) and _sum_doubled_roots._compiled is None
    assert _sum_doubled_roots(a) == _sum_doubled_roots.py_func(a)  # the inner kernel typed as a dispatcher
    assert _sum_doubled_roots._compiled is not None and _doubled._compiled is not None
    assert _sum_doubled_roots.__name__ == "_sum_doubled_roots"
    assert len(_sum_doubled_roots.compiled.signatures) == 1  # a Numba dispatcher, compiled for float64 arrays


def test_importing_a_module_of_lazy_kernels_imports_no_numba(tmp_path):
    (tmp_path / "lazy_module.py").write_text(textwrap.dedent("""
        from tpusim.jit import kernel

        @kernel(cache=False)
        def triple(x):
            return 3 * x
    """))
    code = ("import sys; import lazy_module; before = 'numba' in sys.modules; "
            "print(before, lazy_module.triple(7), 'numba' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "21", "True"]


def test_threads_calling_first_at_once_share_one_compilation():
    @kernel(cache=False)
    def square(x):
        return x * x

    results, compiled = [], []

    def call():
        results.append(square(5))
        compiled.append(square.compiled)

    threads = [threading.Thread(target=call) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [25] * 4 and all(c is compiled[0] for c in compiled)
