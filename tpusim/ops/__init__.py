"""The op registry: every module in this package registers the op it owns with :func:`register`.

Stages ask :func:`op` for a layer op and :func:`lowering` for an ONNX op type; modules are imported
on first use, so adding an op means adding one module (and its tests) here, nothing else.

Lowering imports every op module, so an op module imports at its top only what lowering needs: the
quantization stage (:mod:`tpusim.quant`), :mod:`tpusim.kernels` and :mod:`tpusim.tensor_ops` all import
Numba (0.1-0.2 s), and are imported inside the methods that quantize, execute or evaluate; an op's own
Numba kernels stay in its module, declared with :func:`tpusim.jit.kernel` (compiled, and Numba imported,
on their first call). A run without quantization never imports Numba.
"""
from __future__ import annotations

import importlib
import pkgutil
from typing import Callable

import onnx

from tpusim.ops.base import ExecOptions, Op, VectorCost

_BY_NAME: dict[str, Op] = {}
_REWRITES: list[Callable[[onnx.ModelProto], onnx.ModelProto]] = []
_BY_ONNX_TYPE: dict[str, Op] = {}
_NOT_OP_MODULES = ("base",)
_loaded = False


def register(cls: type[Op]) -> type[Op]:
    instance = cls()
    if cls.name:
        if cls.name in _BY_NAME:
            raise RuntimeError(f"layer op {cls.name!r} registered twice")
        _BY_NAME[cls.name] = instance
    for onnx_type in cls.onnx_types:
        if onnx_type in _BY_ONNX_TYPE:
            raise RuntimeError(f"ONNX op {onnx_type!r} lowered by two modules")
        _BY_ONNX_TYPE[onnx_type] = instance
    return cls


def register_rewrite(rewrite: Callable[[onnx.ModelProto], onnx.ModelProto]) -> Callable[[onnx.ModelProto], onnx.ModelProto]:
    """Register a model -> model rewrite an op module needs before lowering (e.g. a decomposed
    LayerNorm chain back into one node). It gets the lowering's own canonical model and changes it in
    place, never copying it (BERT-base: 440 MB of weights), and returns it."""
    _REWRITES.append(rewrite)
    return rewrite


def rewrite(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` (a canonical model the caller owns: it is changed in place) after every registered op rewrite."""
    _load()
    for step in _REWRITES:
        model = step(model)
    return model


def _load() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for module in pkgutil.iter_modules(__path__):
        if module.name not in _NOT_OP_MODULES and not module.name.startswith("_"):
            importlib.import_module(f"{__name__}.{module.name}")


def op(name: str) -> Op:
    """The module of layer op ``name``."""
    _load()
    try:
        return _BY_NAME[name]
    except KeyError:
        raise ValueError(f"no op module for layer op {name!r}") from None


def lowering(onnx_type: str) -> Op | None:
    """The module that lowers ONNX op type ``onnx_type``, or None when tpusim does not support it."""
    _load()
    return _BY_ONNX_TYPE.get(onnx_type)


def markdown_table() -> str:
    """The supported ops as the README lists them: one row per op module, from the registry itself."""
    _load()
    modules: dict[str, list[str]] = {}
    layers: dict[str, set[str]] = {}
    for onnx_type, module in _BY_ONNX_TYPE.items():
        key = type(module).__module__
        modules.setdefault(key, []).append(onnx_type)
        layers.setdefault(key, set())
    for module in _BY_NAME.values():
        layers.setdefault(type(module).__module__, set()).add(
            f"`{module.name}`" + (" (matrix unit)" if module.matrix else ""))
    rows = ["| ONNX ops | tpusim layers | module: what it does |", "|---|---|---|"]
    for key in sorted(layers, key=lambda k: sorted(modules.get(k, ["~" + k]))[0]):
        doc = (importlib.import_module(key).__doc__ or "").strip()
        summary = " ".join(doc.split("\n\n")[0].split())
        layer = ", ".join(sorted(layers[key])) or "(none)"
        onnx_ops = ", ".join(sorted(modules[key])) if key in modules else "(a pattern of other ops)"
        rows.append(f"| {onnx_ops} | {layer} | `{key.rsplit('.', 1)[1]}`: {summary} |")
    return "\n".join(rows)


def layer_ops() -> tuple[str, ...]:
    _load()
    return tuple(sorted(_BY_NAME))


def onnx_types() -> tuple[str, ...]:
    _load()
    return tuple(sorted(_BY_ONNX_TYPE))


__all__ = ["ExecOptions", "Op", "VectorCost", "layer_ops", "lowering", "markdown_table", "onnx_types", "op", "register", "register_rewrite", "rewrite"]
