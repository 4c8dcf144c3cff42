"""PNG plots of sweeps, rooflines and per-layer breakdowns (matplotlib, Agg).

Each ``plot_*`` function draws a figure from rows the pipeline or a sweep produced and writes it
atomically: the PNG is rendered in memory and then written under a temporary name and renamed, so a
failure never leaves a half-written file. Figures are built without pyplot, so nothing here touches
a notebook's or script's current figure or backend.

The three figures of a run are drawn in one pass each: a figure's axes are placed from one
measurement of what hangs around them (:func:`_fit_row`) rather than by a layout engine that measures
every tick label several times and a ``bbox_inches="tight"`` save that renders the figure twice; the
stacked bars of a category are one collection, not a patch per layer; a layer's name is one text, not
a tick object (three lines and two texts); log axes are labelled in plain text (``1,000``, ``0.1``,
``10⁻⁵``) instead of mathtext, which has to be parsed; unlabelled minor log ticks are one line of
markers per axis. What is left is mostly matplotlib laying out and rasterising each text (about a
millisecond per layer name here) and PNG compression (``benchmarks/bench_plots.py`` times it).

Beyond :data:`NAMED_ROWS_MAX` layers a per-layer figure names each layer of a repeated block once:
matplotlib renders text glyph by glyph in Python, so BERT-base's 270 names (10,600 characters) took
three quarters of the time of its two breakdown figures, about 1 s each, for twelve encoder blocks
whose 22 names differ only in the block's number. Every layer keeps its bar and tick mark; a block whose names (past
its number) repeat an earlier block's is one bracketed label over its rows (``encoder.layer.3 (22
layers, named as in encoder.layer.0)``) and the first such block is named in full, so each row can be
read off by its place in the block. Blocks nest as torch.onnx.export's module paths do
(``/features/denseblock2/denselayer5``, a dense layer repeating ``/features/denseblock1/denselayer1``): the
outermost block that repeats is named (DenseNet-121's 251 names took half of its figures' 1.9 s). Up to
:data:`NAMED_ROWS_MAX` layers (ResNet-50's 73) every name is drawn, as are the names of a large model with no
repeated block (see :func:`layer_rows_plan`).
"""
from __future__ import annotations

import dataclasses
import functools
import io
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tpusim.report import fonts
from tpusim.report.files import atomic_write_bytes

# matplotlib (half a second to import) is imported by the functions that draw, on the first figure: a
# command that draws none (compile, check, quantize, a sweep without plots) never loads it.
if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from tpusim.config import HardwareConfig

DPI = 120
PNG_COMPRESS_LEVEL = 3  # zlib's default 6 takes 40% longer on a ResNet-50 breakdown for a 6% smaller file
OPS_PER_MAC = 2  # TOPS counts a MAC as two operations; intensity counts MACs per byte [Jouppi et al. 2017]
LOG_SPAN = 4  # a swept parameter's axis is logarithmic once its values span this factor (32, 64, 128 do)
METRIC_LOG_SPAN = 10  # a metric's axis once its values span this factor (a decade)
CATEGORY_DODGE = 0.3  # of the gap between categories: the width a category's points are spread over
LEGEND_LINES = 10  # a sweep plot names each line up to this many; past it, lines are coloured by one parameter
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
GRID_ALPHA = 0.3
BAR_HEIGHT = 0.8  # of a layer's row
LAYER_LABEL_GID = "layer-name"
BLOCK_LABEL_GID = "layer-block"
NAMED_ROWS_MAX = 100  # layers a per-layer figure names one by one whatever repeats (ResNet-50 has 73)
ROW_IN = 0.17  # a layer's row, inches: a 7-point name with room to spare
DENSE_ROW_IN = 0.12  # the same beyond NAMED_ROWS_MAX, where most rows carry no name of their own
BRACKET_SERIF_PT = 3.0  # the short ends of a repeated block's bracket
FIT_PAD_IN = 0.08  # margin around a figure's contents, inches
_SUPERSCRIPTS = str.maketrans("0123456789-", "⁰¹²³⁴⁵⁶⁷⁸⁹⁻")

Rows = Sequence[Mapping[str, Any]]


# ------------------------------------------------------------------------------------ output and layout

def _png_bytes(fig: Figure) -> bytes:
    """The figure rendered once at :data:`DPI` and compressed as PNG: RGB when it is opaque (the usual
    case; a quarter less to compress, and a smaller file), RGBA when anything in it is transparent."""
    import matplotlib as mpl
    from PIL import Image, PngImagePlugin

    raw = io.BytesIO()
    fig.savefig(raw, format="rgba", dpi=DPI)
    width = int(fig.get_figwidth() * DPI)  # Agg's canvas size: the figure's inches at DPI, truncated
    data = raw.getvalue()
    height = len(data) // (4 * width)
    if width * height * 4 != len(data):
        raise AssertionError(f"raw render of {len(data)} bytes is not {width} pixels wide")
    image = Image.frombuffer("RGBA", (width, height), data, "raw", "RGBA", 0, 1)
    if image.getextrema()[3] == (255, 255):
        image = image.convert("RGB")
    info = PngImagePlugin.PngInfo()
    info.add_text("Software", f"Matplotlib version{mpl.__version__}, https://matplotlib.org/")
    png = io.BytesIO()
    image.save(png, format="png", pnginfo=info, dpi=(DPI, DPI), compress_level=PNG_COMPRESS_LEVEL)
    return png.getvalue()


def figure_png(fig: Figure) -> bytes:
    """``fig`` rendered as PNG, on an Agg canvas. The figure lays itself out (a layout engine or
    :func:`_fit_row`), so it is rendered once, at its own size."""
    fonts.canvas(fig)
    return _png_bytes(fig)


def save_figure(fig: Figure, path: str | Path) -> Path:
    """Render ``fig`` as PNG in memory, then write it atomically."""
    return atomic_write_bytes(path, figure_png(fig))


def _fit_row(fig: Figure, axes: Sequence[Axes], passes: int = 1) -> None:
    """Place a row of equally wide axes so that everything drawn around them (tick labels, axis labels,
    titles, legends anchored to an axes) fits in the figure with :data:`FIT_PAD_IN` to spare.

    What sticks out of an axes does not depend on its size, except for legends anchored at a fraction of
    it: one pass fits a legend to the side to within a hundredth of the axes, a second one a legend
    anchored below. Each pass measures each label once (a layout engine measures each several times)."""
    renderer = fonts.canvas(fig).get_renderer()
    width, height = fig.get_size_inches()
    pad = FIT_PAD_IN
    for _ in range(passes):
        overhangs = []  # inches beyond each axes' box: left, right, bottom, top
        for ax in axes:
            inner, outer = ax.get_window_extent(renderer), ax.get_tightbbox(renderer)
            overhangs.append([max(0.0, v) / fig.dpi for v in (inner.x0 - outer.x0, outer.x1 - inner.x1,
                                                               inner.y0 - outer.y0, outer.y1 - inner.y1)])
        bottom = max(o[2] for o in overhangs) + pad
        top = height - max(o[3] for o in overhangs) - pad
        axes_width = (width - sum(o[0] + o[1] for o in overhangs) - pad * (len(axes) + 1)) / len(axes)
        if axes_width <= 0 or top <= bottom:
            return  # labels larger than the figure: leave the default placement
        x = pad
        for ax, (left, right, _, _) in zip(axes, overhangs):
            x += left
            ax.set_position((x / width, bottom / height, axes_width / width, (top - bottom) / height))
            x += axes_width + right + pad


# ------------------------------------------------------------------------------------------ log axes

def _plain_number(value: float) -> str:
    """A tick value as plain text: ``0.001`` to ``100,000`` as decimals, else ``2×10⁻⁵``."""
    if 1e-3 <= value < 1e6:
        return f"{value:,.3f}".rstrip("0").rstrip(".")
    mantissa, exponent = f"{value:.0e}".split("e")
    power = "10" + str(int(exponent)).translate(_SUPERSCRIPTS)
    return power if mantissa == "1" else f"{mantissa}×{power}"


@functools.cache
def _plain_log_formatter() -> type:
    from matplotlib.ticker import LogFormatter

    class PlainLogFormatter(LogFormatter):
        """Matplotlib's choice of which log ticks to label, written without mathtext."""

        def _num_to_string(self, x: float, vmin: float, vmax: float) -> str:
            return _plain_number(x)

    return PlainLogFormatter


def _plain_log_labels(axis: Any) -> None:
    formatter = _plain_log_formatter()
    axis.set_major_formatter(formatter(labelOnlyBase=True))
    axis.set_minor_formatter(formatter(labelOnlyBase=False))


def _light_minor_log_ticks(ax: Axes, grid_alpha: float | None) -> None:
    """The minor ticks of each log axis that spans two decades or more, at the places matplotlib's own
    minor locator gives, drawn as one line of markers (and one line of grid strokes when ``grid_alpha``
    is given) where matplotlib makes a tick object of three lines and two texts for each:
    70 on a ResNet-50 roofline, a third of its time. Matplotlib labels no minor tick on such an axis, so
    the figure looks the same. An axis of fewer decades, where it does label them, or with ticks styled
    otherwise than here, keeps matplotlib's own. Freezes the limits of an axis it draws on, so call it
    once the data is drawn."""
    import matplotlib as mpl
    from matplotlib.lines import Line2D
    from matplotlib.markers import TICKDOWN, TICKLEFT, TICKRIGHT, TICKUP
    from matplotlib.ticker import LogLocator, NullLocator

    minor_markers = {("x", "out"): TICKDOWN, ("x", "in"): TICKUP, ("y", "out"): TICKLEFT, ("y", "in"): TICKRIGHT}
    rc = mpl.rcParams
    for name in ("x", "y"):
        axis = ax.xaxis if name == "x" else ax.yaxis
        marker = minor_markers.get((name, rc[f"{name}tick.direction"]))
        if axis.get_scale() != "log" or marker is None or rc["xtick.top" if name == "x" else "ytick.right"]:
            continue
        limits = ax.get_xlim() if name == "x" else ax.get_ylim()
        lo, hi = sorted(limits)
        if not 0 < lo < hi < math.inf:
            continue
        lmin, lmax = math.log10(lo), math.log10(hi)
        if math.floor(lmax) - math.floor(math.nextafter(lmin, -math.inf)) < 2:  # the formatter's major count
            continue
        locator = axis.get_minor_locator()
        if isinstance(locator, NullLocator):  # an axis shared with one already drawn on: its default again
            locator = LogLocator(base=axis.get_transform().base, subs="auto")
            locator.set_axis(axis)
        values = np.asarray(locator.tick_values(lo, hi), dtype=np.float64)
        values = values[(values >= lo) & (values <= hi)]
        if not len(values):
            continue  # an empty line of marks would stretch the axes' extent to the figure's corner
        (ax.set_xlim if name == "x" else ax.set_ylim)(*limits)  # the marks are for these limits
        axis.set_minor_locator(NullLocator())
        along = ax.get_xaxis_transform() if name == "x" else ax.get_yaxis_transform()
        zeros = np.zeros(len(values))
        ax.add_line(Line2D(*((values, zeros) if name == "x" else (zeros, values)), linestyle="none",
                           marker=marker, markersize=rc[f"{name}tick.minor.size"],
                           markeredgewidth=rc[f"{name}tick.minor.width"], color=rc[f"{name}tick.color"],
                           transform=along, clip_on=False, zorder=1.5))
        if grid_alpha is not None:  # one path of separate strokes (NaN lifts the pen)
            along_axis = np.column_stack([values, values, np.full(len(values), np.nan)]).ravel()
            across = np.tile([0.0, 1.0, np.nan], len(values))
            ax.add_line(Line2D(*((along_axis, across) if name == "x" else (across, along_axis)),
                               color=rc["grid.color"], linestyle=rc["grid.linestyle"],
                               linewidth=rc["grid.linewidth"], alpha=grid_alpha, transform=along, zorder=1.5))


# ------------------------------------------------------------------------------------------- helpers

def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _wide_positive(values: Sequence[float], span: float = LOG_SPAN) -> bool:
    return bool(values) and min(values) > 0 and max(values) / min(values) >= span


def _powers_of_two(values: Sequence[float]) -> bool:
    return all(float(v).is_integer() and v >= 1 and int(v) & (int(v) - 1) == 0 for v in values)


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


def zipped_with(records: Rows, x: str, params: Sequence[str]) -> list[str]:
    """The other ``params`` that vary with ``x`` and are determined by it (swept in lockstep, ``zip``):
    they take one value at each point of ``x``, so they share its axis."""
    return [p for p in params if p != x and len(_distinct([r.get(p) for r in records])) > 1
            and determined_by(records, x, p)]


def sweep_figure(records: Rows, x: str, metrics: Sequence[str], *, params: Sequence[str] = (),
                 title: str | None = None) -> Figure:
    """One panel per metric against ``x``; one line per combination of the other ``params`` that vary, each
    named in the legend up to :data:`LEGEND_LINES` lines. Past that a legend of hundreds of entries (a
    1,000-point sweep against one of four parameters draws 100 or 500 lines) could not be read, and
    took two thirds of the plot's time: the lines are thin and coloured by one of the other parameters
    (:func:`_colour_key`), the legend names its values, and each colour's lines are one artist.
    Parameters zipped with ``x`` are named with it on the x axis (``array.rows = array.cols``, or each
    tick ``32 / 64`` when their values differ). Points of a categorical ``x`` are markers, never joined:
    a line between categories would say there is something between them."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullLocator

    if not records:
        raise ValueError("no sweep records to plot")
    xs = _distinct([r[x] for r in records])
    numeric_x = all(_is_number(v) for v in xs)
    position = {v: v for v in xs} if numeric_x else {v: i for i, v in enumerate(xs)}
    zipped = zipped_with(records, x, params)
    others = [p for p in params if p != x and p not in zipped and len(_distinct([r.get(p) for r in records])) > 1]
    groups: dict[tuple, list[Mapping[str, Any]]] = {}
    for record in records:
        groups.setdefault(tuple(record.get(p) for p in others), []).append(record)
    along = {v: [next(r.get(p) for r in records if r[x] == v) for p in zipped] for v in xs}
    same = all(all(w == v for w in along[v]) for v in xs)  # e.g. array.rows = array.cols at every point
    x_label = (" = " if same else " / ").join([x, *zipped])
    tick_labels = [" / ".join(_value_text(w) for w in ([v] if same else [v, *along[v]])) for v in xs]
    log_x = numeric_x and _wide_positive(xs)

    fig = Figure(figsize=(4.2 * len(metrics) + 0.8, 3.6), dpi=DPI, layout="constrained")
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    colours = _colour_key(records, others) if len(groups) > LEGEND_LINES else None
    for ax, metric in zip(axes, metrics):
        plotted: list[float] = []
        bundles: dict[Any, tuple[list[float], list[float]]] = {}  # colour value -> its lines, NaN between them
        for index, (combo, rows) in enumerate(groups.items()):
            points = sorted((position[r[x]], r[metric]) for r in rows if _is_number(r.get(metric)))
            if not points:
                continue
            # side by side within a category, so that equal values do not hide each other
            shift = (index / (len(groups) - 1) - 0.5) * CATEGORY_DODGE if len(groups) > 1 and not numeric_x else 0.0
            xs_here, ys_here = [p + shift for p, _ in points], [v for _, v in points]
            plotted += ys_here
            if colours is not None:  # too many to name: drawn below, a bundle of thin lines per colour
                bundle = bundles.setdefault(combo[colours.index], ([], []))
                bundle[0].extend([*xs_here, math.nan])
                bundle[1].extend([*ys_here, math.nan])
                continue
            cycle = index // 10  # colours repeat after ten lines: then the line style or marker changes
            label = ", ".join(f"{p}={_value_text(v)}" for p, v in zip(others, combo)) or None
            if numeric_x:
                ax.plot(xs_here, ys_here, marker="o", markersize=4, ls=LINE_STYLES[cycle % len(LINE_STYLES)],
                        label=label)
            else:
                ax.plot(xs_here, ys_here, ls="none", marker="os^Dv<>p"[cycle % 8], markersize=5, label=label)
        for value, (xs_here, ys_here) in bundles.items():  # one artist per colour: 1,000 points draw at once
            ax.plot(xs_here, ys_here, color=colours.colour[value], lw=0.9, alpha=0.6,
                    ls="-" if numeric_x else "none", marker="o", markersize=2.5)
        if log_x:
            ax.set_xscale("log", base=2 if _powers_of_two(xs) else 10)
        if _wide_positive(plotted, METRIC_LOG_SPAN):
            ax.set_yscale("log")
            _plain_log_labels(ax.yaxis)
        ax.xaxis.set_minor_locator(NullLocator())
        long_ticks = max(len(t) for t in tick_labels) * len(xs) > 24
        ax.set_xticks([position[v] for v in xs], tick_labels, rotation=30 if long_ticks and len(xs) > 2 else 0,
                      ha="right" if long_ticks and len(xs) > 2 else "center")
        if not numeric_x:
            ax.set_xlim(-0.5, len(xs) - 0.5)
        ax.set_xlabel(x_label)
        ax.set_ylabel(_label(metric))
        ax.grid(True, which="both", alpha=0.3)
    if colours is not None:
        from matplotlib.lines import Line2D
        shown = colours.values if len(colours.values) <= LEGEND_LINES else \
            [colours.values[round(i * (len(colours.values) - 1) / (LEGEND_LINES - 1))] for i in range(LEGEND_LINES)]
        handles = [Line2D([], [], color=colours.colour[v], marker="o", markersize=4) for v in shown]
        per_colour = {sum(combo[colours.index] == v for combo in groups) for v in colours.values}
        title_lines = [others[colours.index], f"{len(groups)} lines" + (f", {per_colour.pop()} a colour"
                                                                        if len(per_colour) == 1 else "")]
        if len(shown) < len(colours.values):
            title_lines[0] += f" ({len(shown)} of {len(colours.values)} values)"
        fig.legend(handles, [_value_text(v) for v in shown], loc="outside right upper", fontsize="small",
                   title="\n".join(title_lines), title_fontsize="small", alignment="left")
    elif others:
        handles, labels = axes[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="outside right upper", fontsize="small" if len(labels) > 6 else "medium")
    fig.suptitle(title or f"sweep over {x_label}")
    return fig


@dataclasses.dataclass(frozen=True)
class _ColourKey:
    index: int  # of the parameter, among the line-defining ones, whose value gives a line its colour
    values: list  # that parameter's values, as they first occur
    colour: dict  # value -> colour


def _colour_key(records: Rows, others: Sequence[str]) -> _ColourKey:
    """The colours of a sweep plot with more lines than a legend can name: by the line-defining parameter with
    the most values that ten colours tell apart (else the one with the fewest), a colour per value, in a
    sequential map by rank where there are more than ten."""
    from matplotlib import colormaps

    counts = [len(_distinct([r.get(p) for r in records])) for p in others]
    fitting = [i for i, n in enumerate(counts) if n <= LEGEND_LINES]
    index = max(fitting, key=lambda i: counts[i]) if fitting else min(range(len(others)), key=lambda i: counts[i])
    values = _distinct([r.get(others[index]) for r in records])
    if all(_is_number(v) for v in values):
        values = sorted(values)
    if len(values) <= LEGEND_LINES:
        palette = colormaps["tab10"].colors
        return _ColourKey(index, values, {v: palette[i] for i, v in enumerate(values)})
    ramp = colormaps["viridis"]
    return _ColourKey(index, values, {v: ramp(i / (len(values) - 1)) for i, v in enumerate(values)})


def plot_sweep(records: Rows, x: str, metrics: Sequence[str], path: str | Path, *, params: Sequence[str] = (),
               title: str | None = None) -> Path:
    """Write :func:`sweep_figure` as a PNG, e.g. latency and TOPS/W against ``array.rows``."""
    return save_figure(sweep_figure(records, x, metrics, params=params, title=title), path)


# -------------------------------------------------------------------------------------------- roofline

def _matrix_layers(rows: Rows) -> list[Mapping[str, Any]]:
    return [r for r in rows if r.get("M") not in ("", None) and r.get("dram_bytes", 0) > 0 and r["cycles"] > 0]


OP_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf",
              "#bcbd22", "#7f7f7f")  # tab10, grey last: one colour per layer op, in order of first appearance
WORKLOAD_MARKERS = "os^Dv<>p"
ABOVE_ROOF_TOLERANCE = 1.001  # a point this close to the roof is on it (rounding of cycles)
ABOVE_ROOF_LABEL = ("hollow: above the roof, as its\nweights were prefetched while\nearlier layers ran: its span is\n"
                    "shorter than its own weight\ntraffic needs at this bandwidth")


def _roof_tops(intensity: float, peak_tops: float, bytes_per_s: float) -> float:
    return min(peak_tops, OPS_PER_MAC * intensity * bytes_per_s / 1e12)


def above_roof(cfg: HardwareConfig, rows: Rows) -> list[bool]:
    """For each matrix layer of ``rows`` (as the roofline plots them), whether it is drawn above the roof:
    it finished sooner than its own weight bytes take at the weight memory's bandwidth, which a layer can
    when its weights were fetched while earlier layers ran."""
    macs_per_s = cfg.array.rows * cfg.array.cols * cfg.array.clock_hz
    bytes_per_s = cfg.weight_memory.bandwidth_gb_s * 1e9
    peak_tops = OPS_PER_MAC * macs_per_s / 1e12
    flags = []
    for r in _matrix_layers(rows):
        tops = OPS_PER_MAC * r["macs"] / (r["cycles"] / cfg.array.clock_hz) / 1e12
        flags.append(tops > ABOVE_ROOF_TOLERANCE * _roof_tops(r["macs"] / r["dram_bytes"], peak_tops, bytes_per_s))
    return flags


def _draw_roofline(ax: Any, cfg: HardwareConfig, workloads: Mapping[str, Rows], title: str) -> None:
    from matplotlib.colors import to_rgba
    from matplotlib.lines import Line2D

    macs_per_s = cfg.array.rows * cfg.array.cols * cfg.array.clock_hz
    bytes_per_s = cfg.weight_memory.bandwidth_gb_s * 1e9
    peak_tops = OPS_PER_MAC * macs_per_s / 1e12
    ridge = macs_per_s / bytes_per_s
    intensities = [ridge]
    ops = _distinct([str(r.get("op", "")) for rows in workloads.values() for r in _matrix_layers(rows)])
    colour = {op: OP_COLOURS[i % len(OP_COLOURS)] for i, op in enumerate(ops)}
    handles: list[Any] = []
    any_above = False
    for index, (name, rows) in enumerate(workloads.items()):
        layers = _matrix_layers(rows)
        x = [r["macs"] / r["dram_bytes"] for r in layers]
        y = [OPS_PER_MAC * r["macs"] / (r["cycles"] / cfg.array.clock_hz) / 1e12 for r in layers]
        above = above_roof(cfg, layers)
        edges = [to_rgba(colour[str(r.get("op", ""))], 0.85) for r in layers]
        faces = [(0.0, 0.0, 0.0, 0.0) if a else e for a, e in zip(above, edges)]  # (an alpha= would fill them)
        marker = WORKLOAD_MARKERS[index % len(WORKLOAD_MARKERS)]
        # One collection per workload: filled points on or under the roof, hollow ones above it, larger, so
        # that a ring shows around a filled point at the same place.
        ax.scatter(x, y, s=[44 if a else 20 for a in above], marker=marker, facecolors=faces, edgecolors=edges,
                   linewidths=[1.4 if a else 0.6 for a in above],
                   label=f"{name} ({len(layers)} layers)", zorder=2.5)
        any_above = any_above or any(above)
        if len(workloads) > 1:
            handles.append(Line2D([], [], ls="none", marker=marker, color="dimgrey",
                                  label=f"{name} ({len(layers)} layers)"))
        intensities += x
    lo, hi = min(intensities) / 2, max(intensities) * 2
    roof_x = [lo, ridge, hi]
    roof = ax.plot(roof_x, [_roof_tops(v, peak_tops, bytes_per_s) for v in roof_x], color="black", lw=1.5,
                   label=f"roofline: {peak_tops:.3g} TOPS\npeak, {cfg.weight_memory.bandwidth_gb_s:g} GB/s")[0]
    ax.axvline(ridge, color="grey", ls="--", lw=1)
    ax.text(ridge, 0.03, f"ridge {ridge:,.0f} MAC/B ", transform=ax.get_xaxis_transform(), rotation=90,
            ha="right", va="bottom", fontsize="small", color="grey")
    ax.set_xscale("log")
    ax.set_yscale("log")
    _plain_log_labels(ax.xaxis)
    _plain_log_labels(ax.yaxis)
    ax.set_xlabel("operational intensity (MACs per weight byte)")
    ax.set_ylabel("achieved TOPS")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=GRID_ALPHA)
    handles += [Line2D([], [], ls="none", marker="o", color=colour[op], label=op) for op in ops]
    handles.append(roof)
    if any_above:
        handles.append(Line2D([], [], ls="none", marker="o", markersize=7, markerfacecolor="none",
                              markeredgecolor="dimgrey", markeredgewidth=1.4, label=ABOVE_ROOF_LABEL))
    # To the right: the explanation of hollow points is several lines, and a legend below the axes as
    # wide as the figure would squeeze them.
    ax.legend(handles=handles, fontsize="small", loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0,
              frameon=False)


def _as_workloads(layer_rows: Rows | Mapping[str, Rows]) -> Mapping[str, Rows]:
    return layer_rows if isinstance(layer_rows, Mapping) else {"layers": layer_rows}


def roofline_figure(panels: Sequence[tuple[str, HardwareConfig, Rows | Mapping[str, Rows]]]) -> Figure:
    """Side-by-side rooflines; each panel is (title, chip config, layer rows or {workload: layer rows})."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8.0 * len(panels), 4.6), dpi=DPI)
    axes = fig.subplots(1, len(panels), squeeze=False, sharey=True)[0]
    for ax, (title, cfg, rows) in zip(axes, panels):
        _draw_roofline(ax, cfg, _as_workloads(rows), title)
    for ax in axes:  # once every panel is drawn: the panels share their TOPS limits
        _light_minor_log_ticks(ax, GRID_ALPHA)
    _fit_row(fig, list(axes), passes=2)  # the legends hang beside the axes at a fraction of their width
    return fig


def plot_roofline(cfg: HardwareConfig, layer_rows: Rows | Mapping[str, Rows], path: str | Path, *,
                  title: str | None = None) -> Path:
    """The chip's roofline (peak MACs, weight-memory bandwidth, the ridge between) with each matrix layer
    at its MACs per weight byte and achieved TOPS, coloured by its op; a marker shape per workload. A layer
    above the roof (its weights fetched while earlier layers ran, see :func:`above_roof`) is drawn hollow,
    and the legend says why. ``layer_rows`` are ``layers.csv`` rows, or a mapping from workload name to
    such rows for several workloads on one chart."""
    return save_figure(roofline_figure([(title or f"{cfg.name} roofline", cfg, layer_rows)]), path)


def plot_rooflines(panels: Sequence[tuple[str, HardwareConfig, Rows | Mapping[str, Rows]]],
                   path: str | Path) -> Path:
    """Several chips' rooflines side by side with a shared TOPS axis (e.g. DDR3 against GDDR5)."""
    return save_figure(roofline_figure(panels), path)


# ----------------------------------------------------------------------------------- per-layer stacks

def _stacked_bars(ax: Axes, stacks: Sequence[tuple[str, Any, Sequence[float]]], rows: int) -> None:
    """Horizontal bars stacked left to right, one collection per stack: row ``i`` at ``y = i``."""
    from matplotlib.collections import PolyCollection

    y = np.arange(rows, dtype=np.float64)
    low, high = y - BAR_HEIGHT / 2, y + BAR_HEIGHT / 2
    left = np.zeros(rows)
    for label, colour, values in stacks:
        right = left + np.asarray(values, dtype=np.float64)
        corners = np.stack([np.column_stack(corner) for corner in
                            ((left, low), (right, low), (right, high), (left, high))], axis=1)
        bars = PolyCollection(corners, facecolors=[colour], edgecolors="none", linewidths=0.0, label=label)
        bars.sticky_edges.x.append(0.0)  # as bar(): the axis starts at 0, no margin below it
        ax.add_collection(bars)
        left = right
    ax.autoscale_view()


@dataclasses.dataclass(frozen=True)
class RepeatedBlock:
    """Rows ``first`` to ``stop - 1`` of a per-layer figure: a block named once, by ``label``."""

    first: int
    stop: int
    label: str


# A part of a layer's name between separators: ``/`` (torch.onnx.export's module paths) and ``.`` (PyTorch's own)
_NAME_PART = re.compile(r"[^/.]+")


def _block_prefixes(name: str) -> list[str]:
    """The blocks a layer may belong to, outermost first: its name up to each numbered part but the last
    (``encoder.layer.3`` of ``encoder.layer.3.attention.self.query.matmul``; ``layer2`` and ``layer2.1`` of
    ``layer2.1.conv1``; ``/features/denseblock1``, ``/features/denseblock1/denselayer1`` and
    ``/features/denseblock1/denselayer1/norm1`` of ``/features/denseblock1/denselayer1/norm1/BatchNormalization``).
    A part is numbered when it ends in a digit."""
    return [name[: part.end()] for part in _NAME_PART.finditer(name)
            if part.group()[-1].isdigit() and part.end() < len(name)]


def _in_block(name: str, prefix: str) -> bool:
    return name.startswith(prefix) and name[len(prefix) : len(prefix) + 1] in ("/", ".")


def layer_rows_plan(layers: Sequence[str]) -> tuple[list[str | None], list[RepeatedBlock]]:
    """Each row's own name (None in a repeated block) and the repeated blocks, in row order.

    Up to :data:`NAMED_ROWS_MAX` layers every row is named. Beyond, a run of two or more consecutive
    layers of one block whose names past the block's prefix are those of an earlier block, in order,
    is named once, as a repeat of the earliest such block, which keeps its names. Blocks nest (a dense
    layer in a dense block, a residual unit in a stage): the outermost block that repeats is the one named,
    and inside one that does not, its inner blocks are looked at."""
    names: list[str | None] = list(layers)
    if len(names) <= NAMED_ROWS_MAX:
        return names, []
    blocks: list[RepeatedBlock] = []
    first_with: dict[tuple[str, ...], str] = {}  # a block's names past its prefix -> the first block with them
    start = 0
    while start < len(layers):
        step = 1
        for prefix in _block_prefixes(layers[start]):
            if start and _in_block(layers[start - 1], prefix):
                continue  # a block is looked at from its first layer on
            stop = start + 1
            while stop < len(layers) and _in_block(layers[stop], prefix):
                stop += 1
            if stop - start < 2:
                break  # (an inner block of that layer is no longer)
            earlier = first_with.setdefault(tuple(name[len(prefix):] for name in layers[start:stop]), prefix)
            if earlier != prefix:
                names[start:stop] = [None] * (stop - start)
                blocks.append(RepeatedBlock(start, stop, f"{prefix} ({stop - start} layers, named as in {earlier})"))
                step = stop - start
                break
        start += step
    return names, blocks


def _layer_labels(ax: Axes, names: Sequence[str | None], blocks: Sequence[RepeatedBlock], fontsize: float) -> None:
    """Layer names where y tick labels go, one text each, their tick marks as one line of markers (one on
    every row), and each repeated block's label beside a bracket over its rows."""
    import matplotlib as mpl
    from matplotlib.lines import Line2D
    from matplotlib.markers import TICKLEFT, TICKRIGHT
    from matplotlib.transforms import ScaledTranslation

    rc = mpl.rcParams
    size, width, pad = rc["ytick.major.size"], rc["ytick.major.width"], rc["ytick.major.pad"]
    colour = rc["ytick.color"] if rc["ytick.labelcolor"] == "inherit" else rc["ytick.labelcolor"]
    ax.set_yticks([])
    marks = ax.get_yaxis_transform()  # x in axes fractions, y in rows
    ax.add_line(Line2D(np.zeros(len(names)), np.arange(len(names)), linestyle="none", marker=TICKLEFT,
                       markersize=size, markeredgewidth=width, color=rc["ytick.color"], transform=marks,
                       clip_on=False))
    inches = ax.figure.dpi_scale_trans
    beside = marks + ScaledTranslation(-(size + pad) / 72, 0.0, inches)
    for i, name in enumerate(names):
        if name is not None:  # A layer's name is a name, never mathtext: a "$" in it is a "$".
            ax.text(0.0, i, name, transform=beside, ha="right", va="center_baseline", fontsize=fontsize,
                    color=colour, parse_math=False, clip_on=False, gid=LAYER_LABEL_GID)
    block_label = marks + ScaledTranslation(-(size + 2 * pad) / 72, 0.0, inches)
    for block in blocks:
        # "[" from the middle of its first bar to the middle of its last, the serifs toward the tick marks
        ax.add_line(Line2D([0.0, 0.0], [block.first - BAR_HEIGHT / 2, block.stop - 1 + BAR_HEIGHT / 2],
                           marker=TICKRIGHT, markersize=BRACKET_SERIF_PT, markeredgewidth=width, linewidth=width,
                           color=rc["ytick.color"], transform=beside, clip_on=False))
        ax.text(0.0, (block.first + block.stop - 1) / 2, block.label, transform=block_label, ha="right",
                va="center", fontsize=fontsize, color=colour, parse_math=False, clip_on=False, gid=BLOCK_LABEL_GID)


def layer_labels(fig: Figure, gid: str = LAYER_LABEL_GID) -> list[str]:
    """The layer names down a per-layer figure's axis, first layer first (with ``gid=BLOCK_LABEL_GID``:
    the labels of its repeated blocks)."""
    texts = [t for t in fig.axes[0].texts if t.get_gid() == gid]
    return [t.get_text() for t in sorted(texts, key=lambda t: t.get_position()[1])]


def _layer_bar_figure(layers: Sequence[str], stacks: Sequence[tuple[str, Any, Sequence[float]]],
                      xlabel: str, title: str) -> Figure:
    """Horizontal stacked bars, first layer at the top: layer names stay readable for 70+ layers."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    names, blocks = layer_rows_plan(layers)
    height = max(3.0, (DENSE_ROW_IN if blocks else ROW_IN) * len(layers) + 1.6)
    fig = Figure(figsize=(10.5, height), dpi=DPI)  # measured at the dpi it is saved at: text metrics once
    ax = fig.subplots()
    _stacked_bars(ax, stacks, len(layers))
    _layer_labels(ax, names, blocks, fontsize=7 if len(layers) > 30 else 9)
    ax.set_ylim(len(layers) - 0.5, -0.5)
    ax.set_xlabel(xlabel)
    # Placed, not searched for: matplotlib would measure every label at each draw to find room for a y
    # axis label the figure does not have, and to keep the title clear of top tick labels it has neither.
    ax.set_title(title, y=1.0)
    ax.yaxis.set_label_coords(0.0, 0.5)
    ax.grid(True, axis="x", alpha=GRID_ALPHA)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))
    # Outside the axes: the longest bars reach the right edge, and a legend on them hides data.
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", borderaxespad=0.0)
    _fit_row(fig, [ax])
    return fig


def latency_breakdown_figure(layer_rows: Rows, *, title: str = "cycles per layer") -> Figure:
    stacks = [(label, colour, [float(r[key]) for r in layer_rows]) for key, label, colour in LATENCY_CATEGORIES]
    return _layer_bar_figure([str(r["layer"]) for r in layer_rows], stacks, "cycles", title)


def plot_latency_breakdown(layer_rows: Rows, path: str | Path, *, title: str = "cycles per layer") -> Path:
    """Stacked bars per layer of active, weight-stall, weight-shift and non-matrix cycles."""
    return save_figure(latency_breakdown_figure(layer_rows, title=title), path)


def energy_breakdown_figure(energy_rows: Mapping[str, Mapping[str, float]], *,
                            title: str = "dynamic energy per layer") -> Figure:
    from matplotlib import colormaps

    layers = list(energy_rows)
    components = _distinct([c for parts in energy_rows.values() for c in parts if c != "total"])
    used = [c for c in components if any(energy_rows[layer].get(c, 0.0) > 0 for layer in layers)]
    hues = [*range(0, 20, 2), *range(1, 20, 2)]  # tab20's ten dark hues before their light twins
    palette = colormaps["tab20"]  # (a copy per lookup)
    stacks = [(c.replace("_", " "), palette(hues[components.index(c) % 20]),
               [energy_rows[layer].get(c, 0.0) / 1e6 for layer in layers]) for c in used]
    return _layer_bar_figure(layers, stacks, "energy (µJ)", title)


def plot_energy_breakdown(energy_rows: Mapping[str, Mapping[str, float]], path: str | Path, *,
                          title: str = "dynamic energy per layer") -> Path:
    """Stacked bars per layer, one colour per energy component; ``energy_rows`` maps a layer name to its
    ``LayerEnergy.as_dict()`` (pJ per component; the ``total`` entry is not drawn)."""
    return save_figure(energy_breakdown_figure(energy_rows, title=title), path)


# ----------------------------------------------------------------------------------- figures as data

@dataclasses.dataclass(frozen=True)
class FigureJob:
    """A figure to draw: the name of its builder in :data:`FIGURE_BUILDERS` and the builder's arguments,
    all plain data, so that another process can draw it (:mod:`tpusim.report.figure_worker`)."""

    builder: str
    args: tuple[Any, ...]
    kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)


FIGURE_BUILDERS = {
    "latency_breakdown": latency_breakdown_figure,
    "energy_breakdown": energy_breakdown_figure,
    "roofline": roofline_figure,
}


def render_png(job: FigureJob) -> bytes:
    """The PNG of ``job``'s figure."""
    return figure_png(FIGURE_BUILDERS[job.builder](*job.args, **job.kwargs))
