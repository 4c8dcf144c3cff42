"""PNG plots of sweeps, rooflines and per-layer breakdowns (matplotlib, Agg).

Each ``plot_*`` function draws a figure from rows the pipeline or a sweep produced and writes it
atomically: the PNG is rendered in memory and then written under a temporary name and renamed, so a
failure never leaves a half-written file. Figures are built without pyplot, so nothing here touches
a notebook's or script's current figure or backend.
"""
from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, NullLocator

from tpusim.config import HardwareConfig
from tpusim.report.files import atomic_write_bytes

DPI = 120
OPS_PER_MAC = 2  # TOPS counts a MAC as two operations; intensity counts MACs per byte [Jouppi et al. 2017]
LOG_SPAN = 8  # log scale once the values span this factor
METRIC_LABELS = {
    "latency_s": "latency (s)",
    "total_cycles": "cycles",
    "tops": "achieved TOPS",
    "inferences_per_s": "inferences / s",
    "utilization": "MAC utilization",
    "energy_per_inference_pj": "energy / inference (pJ)",
    "dynamic_pj": "dynamic energy (pJ)",
    "total_pj": "energy incl. static (pJ)",
    "total_tops_per_w": "TOPS/W (dynamic + static)",
    "dynamic_tops_per_w": "TOPS/W (dynamic only)",
    "total_inferences_per_j": "inferences / J",
    "weight_stall_cycles": "weight-stall cycles",
    "non_matrix_cycles": "non-matrix cycles",
    "top1_agreement": "top-1 agreement with FP32",
    "cosine": "cosine similarity to FP32",
    "output_sqnr_db": "output SQNR (dB)",
}
LATENCY_CATEGORIES = (
    ("active_cycles", "active", "#2b8cbe"),
    ("weight_stall_cycles", "weight stall", "#e34a33"),
    ("weight_shift_cycles", "weight shift", "#fdbb84"),
    ("non_matrix_cycles", "non-matrix", "#969696"),
)

LINE_STYLES = ("-", "--", ":", "-.")

Rows = Sequence[Mapping[str, Any]]


def save_figure(fig: Figure, path: str | Path) -> Path:
    """Render ``fig`` as PNG in memory, then write it atomically."""
    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight")
    return atomic_write_bytes(path, buffer.getvalue())


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _wide_positive(values: Sequence[float]) -> bool:
    return bool(values) and min(values) > 0 and max(values) / min(values) >= LOG_SPAN


def _label(name: str) -> str:
    return METRIC_LABELS.get(name, name)


def _value_text(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _distinct(values: Sequence[Any]) -> list[Any]:
    seen: list[Any] = []
    for value in values:
        if value not in seen:
            seen.append(value)
    return seen


# ---------------------------------------------------------------------------------------------- sweeps

def determined_by(records: Rows, x: str, other: str) -> bool:
    """True when each value of ``x`` comes with one value of ``other`` (e.g. rows and cols swept zipped)."""
    seen: dict[str, Any] = {}
    for record in records:
        key = repr(record.get(x))
        if seen.setdefault(key, record.get(other)) != record.get(other):
            return False
    return True


def sweep_figure(records: Rows, x: str, metrics: Sequence[str], *, params: Sequence[str] = (),
                 title: str | None = None) -> Figure:
    """One panel per metric against ``x``; one line per combination of the other ``params`` that vary."""
    if not records:
        raise ValueError("no sweep records to plot")
    xs = _distinct([r[x] for r in records])
    numeric_x = all(_is_number(v) for v in xs)
    position = {v: v for v in xs} if numeric_x else {v: i for i, v in enumerate(xs)}
    others = [p for p in params if p != x and len(_distinct([r.get(p) for r in records])) > 1
              and not determined_by(records, x, p)]
    groups: dict[tuple, list[Mapping[str, Any]]] = {}
    for record in records:
        groups.setdefault(tuple(record.get(p) for p in others), []).append(record)

    fig = Figure(figsize=(4.2 * len(metrics) + 0.8, 3.6), layout="constrained")
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    for ax, metric in zip(axes, metrics):
        plotted: list[float] = []
        for combo, rows in groups.items():
            points = sorted((position[r[x]], r[metric]) for r in rows if _is_number(r.get(metric)))
            if not points:
                continue
            label = ", ".join(f"{p}={_value_text(v)}" for p, v in zip(others, combo)) or None
            style = LINE_STYLES[len(ax.lines) // 10 % len(LINE_STYLES)]  # colours repeat after ten lines
            ax.plot([p for p, _ in points], [v for _, v in points], marker="o", markersize=4, ls=style, label=label)
            plotted += [v for _, v in points]
        if numeric_x and _wide_positive(xs):
            ax.set_xscale("log", base=2)
        if _wide_positive(plotted) and max(plotted) / min(plotted) >= 50:
            ax.set_yscale("log")
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xticks([position[v] for v in xs], [_value_text(v) for v in xs],
                      rotation=30 if not numeric_x and len(xs) > 3 else 0)
        ax.set_xlabel(x)
        ax.set_ylabel(_label(metric))
        ax.grid(True, which="both", alpha=0.3)
    if others:
        handles, labels = axes[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="outside right upper", fontsize="small" if len(labels) > 6 else "medium")
    fig.suptitle(title or f"sweep over {x}")
    return fig


def plot_sweep(records: Rows, x: str, metrics: Sequence[str], path: str | Path, *, params: Sequence[str] = (),
               title: str | None = None) -> Path:
    """Write :func:`sweep_figure` as a PNG, e.g. latency and TOPS/W against ``array.rows``."""
    return save_figure(sweep_figure(records, x, metrics, params=params, title=title), path)


# -------------------------------------------------------------------------------------------- roofline

def _matrix_layers(rows: Rows) -> list[Mapping[str, Any]]:
    return [r for r in rows if r.get("M") not in ("", None) and r.get("dram_bytes", 0) > 0 and r["cycles"] > 0]


def _draw_roofline(ax: Any, cfg: HardwareConfig, workloads: Mapping[str, Rows], title: str) -> None:
    macs_per_s = cfg.array.rows * cfg.array.cols * cfg.array.clock_hz
    bytes_per_s = cfg.weight_memory.bandwidth_gb_s * 1e9
    peak_tops = OPS_PER_MAC * macs_per_s / 1e12
    ridge = macs_per_s / bytes_per_s
    intensities = [ridge]
    for index, (name, rows) in enumerate(workloads.items()):
        layers = _matrix_layers(rows)
        x = [r["macs"] / r["dram_bytes"] for r in layers]
        y = [OPS_PER_MAC * r["macs"] / (r["cycles"] / cfg.array.clock_hz) / 1e12 for r in layers]
        ax.scatter(x, y, s=18, alpha=0.75, marker="os^Dv<>p"[index % 8], label=f"{name} ({len(layers)} layers)")
        intensities += x
    lo, hi = min(intensities) / 2, max(intensities) * 2
    roof_x = [lo, ridge, hi]
    ax.plot(roof_x, [min(peak_tops, OPS_PER_MAC * v * bytes_per_s / 1e12) for v in roof_x], color="black", lw=1.5,
            label=f"roofline: {peak_tops:.3g} TOPS peak, {cfg.weight_memory.bandwidth_gb_s:g} GB/s")
    ax.axvline(ridge, color="grey", ls="--", lw=1)
    ax.text(ridge, 0.03, f"ridge {ridge:,.0f} MAC/B ", transform=ax.get_xaxis_transform(), rotation=90,
            ha="right", va="bottom", fontsize="small", color="grey")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("operational intensity (MACs per weight byte)")
    ax.set_ylabel("achieved TOPS")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.14), ncols=2, frameon=False)


def _as_workloads(layer_rows: Rows | Mapping[str, Rows]) -> Mapping[str, Rows]:
    return layer_rows if isinstance(layer_rows, Mapping) else {"layers": layer_rows}


def roofline_figure(panels: Sequence[tuple[str, HardwareConfig, Rows | Mapping[str, Rows]]]) -> Figure:
    """Side-by-side rooflines; each panel is (title, chip config, layer rows or {workload: layer rows})."""
    fig = Figure(figsize=(6.2 * len(panels), 4.8), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False, sharey=True)[0]
    for ax, (title, cfg, rows) in zip(axes, panels):
        _draw_roofline(ax, cfg, _as_workloads(rows), title)
    return fig


def plot_roofline(cfg: HardwareConfig, layer_rows: Rows | Mapping[str, Rows], path: str | Path, *,
                  title: str | None = None) -> Path:
    """The chip's roofline (peak MACs, weight-memory bandwidth, the ridge between) with each matrix layer
    at its MACs per weight byte and achieved TOPS. ``layer_rows`` are ``layers.csv`` rows, or a mapping
    from workload name to such rows for several workloads on one chart."""
    return save_figure(roofline_figure([(title or f"{cfg.name} roofline", cfg, layer_rows)]), path)


def plot_rooflines(panels: Sequence[tuple[str, HardwareConfig, Rows | Mapping[str, Rows]]],
                   path: str | Path) -> Path:
    """Several chips' rooflines side by side with a shared TOPS axis (e.g. DDR3 against GDDR5)."""
    return save_figure(roofline_figure(panels), path)


# ----------------------------------------------------------------------------------- per-layer stacks

def _layer_bar_figure(layers: Sequence[str], stacks: Sequence[tuple[str, str | None, Sequence[float]]],
                      xlabel: str, title: str) -> Figure:
    """Horizontal stacked bars, first layer at the top: layer names stay readable for 70+ layers."""
    height = max(3.0, 0.17 * len(layers) + 1.6)
    fig = Figure(figsize=(10.5, height), layout="constrained")
    ax = fig.subplots()
    positions = range(len(layers))
    left = [0.0] * len(layers)
    for label, colour, values in stacks:
        ax.barh(positions, values, left=left, height=0.8, label=label, color=colour)
        left = [a + b for a, b in zip(left, values)]
    ax.set_yticks(list(positions), layers, fontsize=7 if len(layers) > 30 else 9)
    ax.set_ylim(len(layers) - 0.5, -0.5)
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    ax.grid(True, axis="x", alpha=0.3)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))
    # Outside the axes: the longest bars reach the right edge, and a legend on them hides data.
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", borderaxespad=0.0)
    return fig


def latency_breakdown_figure(layer_rows: Rows, *, title: str = "cycles per layer") -> Figure:
    stacks = [(label, colour, [float(r[key]) for r in layer_rows]) for key, label, colour in LATENCY_CATEGORIES]
    return _layer_bar_figure([str(r["layer"]) for r in layer_rows], stacks, "cycles", title)


def plot_latency_breakdown(layer_rows: Rows, path: str | Path, *, title: str = "cycles per layer") -> Path:
    """Stacked bars per layer of active, weight-stall, weight-shift and non-matrix cycles."""
    return save_figure(latency_breakdown_figure(layer_rows, title=title), path)


def energy_breakdown_figure(energy_rows: Mapping[str, Mapping[str, float]], *,
                            title: str = "dynamic energy per layer") -> Figure:
    layers = list(energy_rows)
    components = _distinct([c for parts in energy_rows.values() for c in parts if c != "total"])
    used = [c for c in components if any(energy_rows[layer].get(c, 0.0) > 0 for layer in layers)]
    hues = [*range(0, 20, 2), *range(1, 20, 2)]  # tab20's ten dark hues before their light twins
    stacks = [(c.replace("_", " "), colormaps["tab20"](hues[components.index(c) % 20]),
               [energy_rows[layer].get(c, 0.0) / 1e6 for layer in layers]) for c in used]
    return _layer_bar_figure(layers, stacks, "energy (µJ)", title)


def plot_energy_breakdown(energy_rows: Mapping[str, Mapping[str, float]], path: str | Path, *,
                          title: str = "dynamic energy per layer") -> Path:
    """Stacked bars per layer, one colour per energy component; ``energy_rows`` maps a layer name to its
    ``LayerEnergy.as_dict()`` (pJ per component; the ``total`` entry is not drawn)."""
    return save_figure(energy_breakdown_figure(energy_rows, title=title), path)
