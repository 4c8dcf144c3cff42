"""Python API for notebooks and scripts; the CLI is a thin layer over the same functions.

>>> import tpusim
>>> result = tpusim.simulate("configs/tpu_v1.yaml", "resnet50", batch=8, overrides={"array.rows": 128})
>>> result.summary["latency_s"], result.summary["energy"]["total_tops_per_w"]
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tpusim import pipeline
from tpusim.config import HardwareConfig
from tpusim.ir import Graph, Shape


@dataclass(frozen=True, eq=False)
class Result:
    """One simulated design point: the config and graph it ran, and what the stages produced."""

    config: HardwareConfig
    graph: Graph
    evaluation: pipeline.Evaluation

    @property
    def summary(self) -> dict[str, Any]:
        """Run totals: cycles, latency, TOPS, breakdown, energy (and fidelity when quantized)."""
        return self.evaluation.summary

    @property
    def layers(self) -> list[dict[str, Any]]:
        """One record per layer (the rows of ``layers.csv``); ``pandas.DataFrame(result.layers)`` works."""
        return self.evaluation.layer_rows


def _merge_overrides(overrides: dict[str, Any] | None, keyword_overrides: dict[str, Any]) -> dict[str, Any]:
    merged = dict(overrides or {})
    merged.update({key.replace("__", "."): value for key, value in keyword_overrides.items()})
    return merged


def simulate(config: str | Path, model: str | Path | Graph, *, batch: int | None = None, input_shape: Shape | None = None,
             overrides: dict[str, Any] | None = None, quantize: bool = True, calib_data: str | Path | None = None,
             eval_samples: int = 16, fidelity: str = "kernel", **keyword_overrides: Any) -> Result:
    """Simulate ``model`` (an ``.onnx`` path or built-in workload name) on the chip described by ``config``.

    Config values are overridden by ``overrides={"array.rows": 128}`` or, equivalently, keyword arguments with
    ``__`` for the dots (``array__rows=128``). ``quantize=False`` skips calibration and integer execution
    (timing and energy do not depend on values), which makes sweeps over hardware parameters fast.
    """
    options = pipeline.RunOptions(config=Path(config), model=str(model), batch=batch, input_shape=input_shape,
                                  overrides=_merge_overrides(overrides, keyword_overrides), calib_data=calib_data,
                                  quantize=quantize, eval_samples=eval_samples, fidelity=fidelity)
    cfg, graph, model_path = pipeline.prepare(options)
    evaluation = pipeline.evaluate(cfg, graph, model_path, options)
    return Result(config=cfg, graph=graph, evaluation=evaluation)
