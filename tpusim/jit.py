"""Numba kernels that cost nothing until they run (``tpusim.jit.kernel``).

``@kernel(cache=True, ...)`` is ``@numba.njit(cache=True, ...)``, applied, and Numba imported (0.1-0.25 s),
when the kernel is first called. Every lowering imports every op module, and most lowerings never run an
integer kernel (a ``--no-quantize`` run, ``tpusim compile``, a sweep of timing points), so an op keeps its
kernels in its own module, as it keeps everything else about it, without making each of those pay for Numba.

A lazy kernel may call another lazy kernel of its module: Numba types it as the kernel it stands for. Names
it calls from a module that imports Numba itself are bound when it compiles: ``imports={"claim_task":
"tpusim.kernels.gemm"}`` puts that module's ``claim_task`` into the kernel's module then.
"""
from __future__ import annotations

import functools
import importlib
import threading
from typing import Any, Callable, Mapping

_LOCK = threading.RLock()  # one compilation of a kernel, whichever thread calls it first
_typed_as_kernels = False


class LazyKernel:
    """A function compiled by ``numba.njit(**options)`` on its first call (see the module docstring)."""

    def __init__(self, function: Callable, options: Mapping[str, Any], imports: Mapping[str, str]):
        self.py_func, self._options, self._imports = function, dict(options), dict(imports)
        self._compiled: Any = None
        functools.update_wrapper(self, function)

    @property
    def compiled(self) -> Any:
        """The Numba dispatcher, made (and Numba imported) on first use."""
        if self._compiled is None:
            with _LOCK:
                if self._compiled is None:
                    _type_lazy_kernels_as_their_dispatchers()
                    from numba import njit

                    namespace = self.py_func.__globals__
                    for name, module in self._imports.items():
                        namespace[name] = getattr(importlib.import_module(module), name)
                    self._compiled = njit(**self._options)(self.py_func)
        return self._compiled

    def __call__(self, *args: Any) -> Any:
        return self.compiled(*args)


def kernel(imports: Mapping[str, str] | None = None, **options: Any) -> Callable[[Callable], LazyKernel]:
    """``@kernel(cache=True, nogil=True)``: ``numba.njit`` with these options, applied on the first call."""
    return lambda function: LazyKernel(function, options, imports or {})


def _type_lazy_kernels_as_their_dispatchers() -> None:
    """Let Numba see a lazy kernel that another kernel calls as the dispatcher it stands for."""
    global _typed_as_kernels
    if _typed_as_kernels:
        return
    from numba.core.typing.typeof import typeof, typeof_impl

    @typeof_impl.register(LazyKernel)
    def _typeof_lazy_kernel(value: LazyKernel, context: Any) -> Any:
        return typeof(value.compiled, context.purpose)

    _typed_as_kernels = True
