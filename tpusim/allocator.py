"""How the processes tpusim starts for itself (the command line's, a sweep's workers) allocate memory.

glibc's malloc serves a block of more than 128 KiB (raised to the largest such block freed so far) with a
fresh mapping, unmapped when it is freed, and gives the top of its heap back to the kernel once twice that
much there is free. A run frees and allocates arrays of megabytes all the time (a model's weights as they
are lowered, ONNX Runtime's copy of the model as it builds its session, every exposed tensor of each run),
and every page of a fresh mapping costs a fault, every 2 MiB one that numpy asks to be a huge page much
more. Kept in the heap up to 32 MiB and not trimmed, freed memory is used again: the peak
stays where it was (it is the peak), a ResNet-50 run takes 12 % fewer faults, and the 208 MB LSTM lowers
in 0.3 s instead of 2.4 s.

Only for tpusim's own processes: a program that imports tpusim keeps its allocator as it set it.
"""
from __future__ import annotations

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt's option numbers (malloc.h)
# In bytes: a trim threshold as large as mallopt's int holds (never, for a run); blocks up to 32 MiB from the heap,
# the most glibc's own sliding threshold reaches. Larger ones (a model's bytes) keep a mapping of their own: from
# the heap too (2**30) they took BERT-base's run 24 % fewer faults, but no less time beyond this machine's noise.
_MALLOC_OPTIONS = {_M_TRIM_THRESHOLD: 2**31 - 1, _M_MMAP_THRESHOLD: 32 * 2**20}


def keep_freed_memory() -> None:
    """Tune glibc's malloc (above) for this process; another C library has no ``mallopt`` and is left as it is."""
    import ctypes

    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is not None:
        for option, value in _MALLOC_OPTIONS.items():
            mallopt(ctypes.c_int(option), ctypes.c_int(value))
