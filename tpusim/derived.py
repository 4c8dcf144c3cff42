"""Values derived from a weight array or a layer (packed layouts, bias shifts, prepared kernels), made once
per live owner and tag: a model's weights are packed once, not once per run.

Numba-free, so that an op module imports it with the module (a lowering imports every op module and no
Numba): a layer looks its prepared kernel up here on every run, and an import inside the function that
runs it costs 8-12 us where the kernels have left the caches cold.
"""
from __future__ import annotations

import weakref

# Entries go when their owner does, so a value must not refer to its owner.
_derived: dict[tuple[int, object], tuple[weakref.ref, object]] = {}


def derived_from(owner: object, tag: object, make):
    """make(), computed once per live ``owner`` (an array, or any object that takes weak references) and hashable
    ``tag`` (which must say everything make depends on besides the owner)."""
    key = (id(owner), tag)
    entry = _derived.get(key)
    if entry is not None and entry[0]() is owner:
        return entry[1]
    value = make()
    _derived[key] = (weakref.ref(owner, lambda _, key=key, table=_derived: table.pop(key, None)), value)
    return value
