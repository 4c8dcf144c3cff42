"""``python -m tpusim`` and the ``tpusim`` console script. Ctrl-C at any moment, even while Python is still
importing, ends with ``tpusim: interrupted`` and exit code 130, never a traceback or a crash."""
import _thread
import gc
import importlib.machinery
import os
import signal
import sys
import threading
from contextlib import contextmanager

from tpusim.allocator import keep_freed_memory


@contextmanager
def _interrupts_held():
    """SIGINT is held while the block runs and raised as KeyboardInterrupt right after it, if it came."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield  # not ours to hold (another thread, or already held by an enclosing import)
        return
    received = []
    signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if received:
        raise KeyboardInterrupt


_EXTENSIONS: list = []  # every extension module made: one that an interrupted import drops must never be freed


class _ExtensionLoader(importlib.machinery.ExtensionFileLoader):
    """A KeyboardInterrupt inside a C extension's initialisation crashes some (onnx segfaults, matplotlib's
    ft2font aborts, onnxruntime's import fails, or the interrupt is lost); so it waits until the module exists.
    pybind11 modules crash when freed, so each is kept (CPython never unloads extensions anyway)."""

    def create_module(self, spec):
        with _interrupts_held():
            module = super().create_module(spec)
            _EXTENSIONS.append(module)
            return module

    def exec_module(self, module):
        with _interrupts_held():
            super().exec_module(module)


def _hold_interrupts_in_extension_imports() -> None:
    loaders = [(_ExtensionLoader, importlib.machinery.EXTENSION_SUFFIXES),
               (importlib.machinery.SourceFileLoader, importlib.machinery.SOURCE_SUFFIXES),
               (importlib.machinery.SourcelessFileLoader, importlib.machinery.BYTECODE_SUFFIXES)]
    sys.path_hooks.insert(0, importlib.machinery.FileFinder.path_hook(*loaders))
    sys.path_importer_cache.clear()  # the path entries' finders are made again, with the hook above


def _interrupt_main_thread() -> None:
    """SIGINT, sent to the main thread itself: a wait there (a sleep, a lock, a pipe) ends at once, where
    ``_thread.interrupt_main`` would only flag it for when that wait is over."""
    if hasattr(signal, "pthread_kill"):
        signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
    else:
        _thread.interrupt_main()


def _raise_lost_interrupts(unraisable, _default=sys.unraisablehook) -> None:
    """A Ctrl-C that lands in a callback from C (llvmlite's object cache while Numba compiles) cannot propagate:
    Python would print it and carry on. It is sent again, to arrive where it can be raised: from a thread, a
    moment after this hook has returned (raised in here, it would be lost once more, printed as an exception
    ignored in the hook). Should it land in such a callback again, it comes back here and is sent again."""
    if issubclass(unraisable.exc_type, KeyboardInterrupt):
        threading.Timer(0.01, _interrupt_main_thread).start()
    else:
        _default(unraisable)


def _exit_interrupted() -> None:
    """Exit with 130 without finalising the interpreter: after an interrupt, Python's shutdown was seen to
    crash on half-initialised extension modules (onnx: segfault, matplotlib: abort) or to end the process by
    SIGINT, after our last line."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (AttributeError, OSError, ValueError):  # None, a closed pipe or a closed stream
            pass
    os._exit(130)


# OpenBLAS (numpy's, and scipy's, which Numba loads) keeps each idle thread spinning for 2**28 cycles, a tenth
# of a second, when it starts and after every call. A run makes few, large BLAS calls, and that spinning took
# a core from ONNX Runtime and the Numba kernels (0.3 s of CPU in a ResNet-50 run); at 2**4 cycles the threads
# sleep at once. Read when the library loads, so set before numpy is imported; a value the user set is kept.
BLAS_THREAD_TIMEOUT = "4"


def main() -> int:
    os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", BLAS_THREAD_TIMEOUT)
    keep_freed_memory()
    try:
        _hold_interrupts_in_extension_imports()
        sys.unraisablehook = _raise_lost_interrupts
        from tpusim.cli import EXIT_INTERRUPTED, main as cli_main
    except KeyboardInterrupt:
        print("tpusim: interrupted", file=sys.stderr)
        _exit_interrupted()
    try:
        code = cli_main()
    except KeyboardInterrupt:  # a second one, while the first was being reported: it has been said already
        code = EXIT_INTERRUPTED
    if code == EXIT_INTERRUPTED:
        _exit_interrupted()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the work is done: a late Ctrl-C must not kill the exit
    # What is still alive (modules, caches, the result) lives until the process ends; frozen, it is left out
    # of the garbage collections of the interpreter's shutdown, which would otherwise traverse all of it
    # (a ResNet-50 run: 0.3 s of its 5 s, after its last line).
    gc.freeze()
    return code


if __name__ == "__main__":
    sys.exit(main())
