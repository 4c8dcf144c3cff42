"""tpusim: a cycle-level, bit-exact simulator of a TPU-v1-style weight-stationary systolic array.

``tpusim.simulate`` and ``tpusim.sweep`` are the Python API (see ``tpusim.api``); they are imported on
first use so that ``import tpusim.config`` stays light.
"""

_API = {"simulate": "tpusim.api", "Result": "tpusim.api", "sweep": "tpusim.sweeps"}


def __getattr__(name: str):
    if name in _API:
        import importlib

        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'tpusim' has no attribute {name!r}")


__all__ = sorted(_API)
