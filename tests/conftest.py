"""Fixtures several test modules share, so the expensive ones are made once per test session."""
from __future__ import annotations

from collections.abc import Callable

import pytest

from tpusim.workloads import WORKLOADS
from tpusim.workloads.builder import GeneratedModel


@pytest.fixture(scope="session")
def generated_workload() -> Callable[[str], GeneratedModel]:
    """``generated_workload(name)``: built-in workload ``name`` as its generator makes it (seed 0), built once
    per session (ResNet-50 takes seconds) for every module that reads it. Readers must not change it: the
    front end copies a model before it canonicalises it."""
    built: dict[str, GeneratedModel] = {}

    def get(name: str) -> GeneratedModel:
        if name not in built:
            built[name] = WORKLOADS[name].build(0)
        return built[name]

    return get
