"""Plots are valid PNGs written atomically: a failed plot leaves neither a partial file nor a temp file."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from matplotlib.figure import Figure
from PIL import Image

from tpusim.config import load_config
from tpusim.energy.model import LayerEnergy
from tpusim.report import plots

TPU_V1 = Path(__file__).resolve().parents[2] / "configs" / "tpu_v1.yaml"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _is_png(path: Path) -> bool:
    data = path.read_bytes()
    return data.startswith(PNG_MAGIC) and data.endswith(b"IEND\xaeB`\x82")


def _sweep_records() -> list[dict]:
    return [
        {"model": model, "batch": batch, "array.rows": size, "array.cols": size,
         "latency_s": 1e-3 * scale * batch / size, "utilization": size / 1024, "total_tops_per_w": 0.01 * size}
        for model, scale in (("mlp", 1.0), ("tiny_cnn", 0.01)) for batch in (1, 8) for size in (32, 128, 512)
    ]


def _layer_rows(count: int) -> list[dict]:
    rows = []
    for i in range(count):
        matrix = i % 4 != 3
        rows.append({
            "layer": f"block{i // 4}.conv{i % 4}" if matrix else f"add_{i}", "op": "conv" if matrix else "add",
            "M": 1024 if matrix else "", "macs": (i + 1) * 1_000_000 if matrix else 0,
            "dram_bytes": 65536 * (1 + i % 3) if matrix else 0, "cycles": 5000 + 100 * i,
            "active_cycles": 3000, "weight_stall_cycles": 100 * i, "weight_shift_cycles": 256,
            "non_matrix_cycles": 1744 if matrix else 5000 + 100 * i - 3256,
        })
    return rows


def test_sweep_plot_is_a_png(tmp_path):
    path = plots.plot_sweep(_sweep_records(), "array.rows", ("latency_s", "utilization", "total_tops_per_w"),
                            tmp_path / "sweep.png", params=("model", "batch", "array.rows", "array.cols"))
    assert path == tmp_path / "sweep.png" and _is_png(path)


def test_sweep_plot_lines_are_the_other_varying_parameters():
    records = _sweep_records()
    fig = plots.sweep_figure(records, "array.rows", ("latency_s",), params=("model", "batch", "array.rows",
                                                                              "array.cols"))
    (ax,) = fig.axes
    # array.cols moves in lockstep with array.rows, so the lines are model x batch only
    assert sorted(line.get_label() for line in ax.lines) == [
        "model=mlp, batch=1", "model=mlp, batch=8", "model=tiny_cnn, batch=1", "model=tiny_cnn, batch=8"]
    assert all(list(line.get_xdata()) == [32, 128, 512] for line in ax.lines)
    assert ax.get_xscale() == "log"


def test_sweep_plot_of_a_categorical_parameter(tmp_path):
    records = [{"quant.calibration": c, "quant.weights": w, "cosine": 0.9 + 0.01 * i}
               for i, (c, w) in enumerate((c, w) for c in ("minmax", "mse") for w in ("per-tensor", "per-channel"))]
    fig = plots.sweep_figure(records, "quant.calibration", ("cosine",), params=("quant.calibration", "quant.weights"))
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["minmax", "mse"]
    assert _is_png(plots.plot_sweep(records, "quant.calibration", ("cosine",), tmp_path / "q.png",
                                    params=("quant.calibration", "quant.weights")))


def test_determined_by():
    records = _sweep_records()
    assert plots.determined_by(records, "array.rows", "array.cols")
    assert not plots.determined_by(records, "array.rows", "batch")


def test_roofline_plots_each_matrix_layer_at_its_intensity(tmp_path):
    cfg = load_config(TPU_V1)
    rows = _layer_rows(12)
    fig = plots.roofline_figure([("tpu_v1", cfg, {"synthetic": rows})])
    ax = fig.axes[0]
    (points,) = ax.collections
    matrix = [r for r in rows if r["op"] == "conv"]
    offsets = points.get_offsets()
    assert len(offsets) == len(matrix)
    first = matrix[0]
    assert offsets[0][0] == first["macs"] / first["dram_bytes"]
    assert offsets[0][1] == 2 * first["macs"] / (first["cycles"] / 700e6) / 1e12
    roof = ax.lines[0]
    assert roof.get_xdata()[1] == 256 * 256 * 700e6 / 34e9  # the ridge, ~1350 MACs per byte
    assert max(roof.get_ydata()) == pytest.approx(91.75, abs=0.01)
    assert _is_png(plots.plot_roofline(cfg, rows, tmp_path / "roof.png"))
    gddr5 = cfg.replace(**{"weight_memory.bandwidth_gb_s": 180})
    assert _is_png(plots.plot_rooflines([("DDR3", cfg, rows), ("GDDR5", gddr5, rows)], tmp_path / "roofs.png"))


def _bars(collection) -> np.ndarray:
    """(left, right, bottom, top) of each rectangle of a stacked-bar collection."""
    corners = np.array([path.vertices[:4] for path in collection.get_paths()])
    return np.column_stack([corners[:, :, 0].min(1), corners[:, :, 0].max(1),
                            corners[:, :, 1].min(1), corners[:, :, 1].max(1)])


def test_latency_breakdown_of_73_layers(tmp_path):
    rows = _layer_rows(73)
    fig = plots.latency_breakdown_figure(rows)
    ax = fig.axes[0]
    # Every layer named, in order, first layer at the top (row i at y = i, the y axis inverted).
    assert plots.layer_labels(fig) == [r["layer"] for r in rows]
    texts = {t.get_text(): t for t in ax.texts}
    assert all(texts[r["layer"]].get_position()[1] == i for i, r in enumerate(rows))
    assert ax.get_ylim() == (72.5, -0.5)
    # One collection per category, one bar per layer in each (4 x 73 bars), stacked in the CSV's order.
    stacks = [c for c in ax.collections if c.get_label() in [label for _, label, _ in plots.LATENCY_CATEGORIES]]
    assert [c.get_label() for c in stacks] == [label for _, label, _ in plots.LATENCY_CATEGORIES]
    assert [len(c.get_paths()) for c in stacks] == [73] * 4
    left = np.zeros(73)
    for (key, _, _), collection in zip(plots.LATENCY_CATEGORIES, stacks):
        bars = _bars(collection)
        width = np.array([r[key] for r in rows], dtype=float)
        np.testing.assert_allclose(bars[:, 0], left)
        np.testing.assert_allclose(bars[:, 1] - bars[:, 0], width)
        np.testing.assert_allclose(bars[:, 2:].mean(1), np.arange(73))
        left += width
    assert ax.get_xlim()[0] == 0.0 and ax.get_xlim()[1] > left.max()  # from 0, as bar() does, to the longest
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [label for _, label, _ in plots.LATENCY_CATEGORIES]
    assert _is_png(plots.plot_latency_breakdown(rows, tmp_path / "latency.png"))


def test_layer_names_are_drawn_as_written(tmp_path):
    rows = _layer_rows(3)
    rows[0]["layer"], rows[1]["layer"] = "cost_$5$", "a$\\frac{$"  # would be mathtext (the second invalid)
    fig = plots.latency_breakdown_figure(rows)
    assert plots.layer_labels(fig) == [r["layer"] for r in rows]
    assert _is_png(plots.plot_latency_breakdown(rows, tmp_path / "names.png"))


def test_figures_fit_their_contents_and_are_saved_once_at_their_size(tmp_path):
    rows = _layer_rows(73)
    fig = plots.latency_breakdown_figure(rows)
    renderer = fig.canvas.get_renderer()
    contents = fig.axes[0].get_tightbbox(renderer)
    assert contents.x0 >= 0 and contents.y0 >= 0 and contents.x1 <= fig.bbox.x1 and contents.y1 <= fig.bbox.y1
    assert contents.x0 < 0.2 * fig.dpi and fig.bbox.x1 - contents.x1 < 0.2 * fig.dpi  # and no wide margins
    path = plots.plot_latency_breakdown(rows, tmp_path / "latency.png")
    with Image.open(path) as image:
        width, height = fig.get_size_inches() * plots.DPI
        assert image.size == (int(width), int(height)) and image.mode == "RGB"
        assert image.info["dpi"] == pytest.approx((plots.DPI, plots.DPI), abs=0.05)  # stored per metre
        assert image.info["Software"].startswith("Matplotlib")


def test_log_axes_are_labelled_in_plain_text():
    assert [plots._plain_number(v) for v in (1e-3, 0.01, 0.5, 1.0, 20.0, 1000.0, 25000.0, 1e5)] == [
        "0.001", "0.01", "0.5", "1", "20", "1,000", "25,000", "100,000"]
    assert [plots._plain_number(v) for v in (1e-4, 2e-5, 1e6, 3e7)] == ["10⁻⁴", "2×10⁻⁵", "10⁶", "3×10⁷"]
    cfg = load_config(TPU_V1)
    fig = plots.roofline_figure([("tpu_v1", cfg, _layer_rows(12))])
    ax = fig.axes[0]
    fig.canvas.draw()
    labels = [t.get_text() for t in ax.get_xticklabels() + ax.get_yticklabels() if t.get_text()]
    assert labels and not any("$" in label for label in labels)  # no mathtext
    assert "1,000" in labels


def test_light_minor_ticks_sit_where_matplotlib_puts_its_own():
    cfg = load_config(TPU_V1)
    rows = _layer_rows(12)
    rows[0]["dram_bytes"] = rows[0]["macs"]  # 1 MAC per byte: the x axis spans four decades and more
    fig = plots.roofline_figure([("tpu_v1", cfg, rows)])
    ax = fig.axes[0]
    assert list(ax.xaxis.get_minorticklocs()) == []  # no tick objects: one line of marks instead
    reference = Figure()
    ref = reference.subplots()
    ref.set_xscale("log")
    ref.set_xlim(ax.get_xlim())
    expected = [v for v in ref.xaxis.get_minorticklocs() if ax.get_xlim()[0] <= v <= ax.get_xlim()[1]]
    marks = [line for line in ax.lines if line.get_marker() == plots.TICKDOWN]
    assert len(marks) == 1 and len(expected) > 20
    np.testing.assert_allclose(marks[0].get_xdata(), expected)
    # An axis with one decade mark or none keeps matplotlib's minor ticks, which it labels there.
    rows = _layer_rows(3)
    for row in rows:
        row["dram_bytes"] = row["macs"] // 1000  # 1000 MACs per byte, near the ridge: x spans 500..2700
    fig = plots.roofline_figure([("tpu_v1", cfg, rows)])
    ax = fig.axes[0]
    assert not [line for line in ax.lines if line.get_marker() == plots.TICKDOWN]
    fig.canvas.draw()
    assert [t.get_text() for t in ax.xaxis.get_minorticklabels() if t.get_text()]  # e.g. 600, 2,000


def test_energy_breakdown_draws_only_used_components(tmp_path):
    energy = {f"layer{i}": LayerEnergy(mac=100.0 * i, weight_dram=50.0, unified_buffer=10.0).as_dict()
              for i in range(5)}
    fig = plots.energy_breakdown_figure(energy)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["mac", "weight dram", "unified buffer"]
    assert _is_png(plots.plot_energy_breakdown(energy, tmp_path / "energy.png"))


def test_a_failed_plot_leaves_no_file_and_keeps_the_old_one(tmp_path, monkeypatch):
    target = tmp_path / "latency.png"
    plots.plot_latency_breakdown(_layer_rows(4), target)
    before = target.read_bytes()

    def broken_savefig(self, fname, **kwargs):
        fname.write(b"\x89PNG partial")
        raise OSError("disk full")

    monkeypatch.setattr(Figure, "savefig", broken_savefig)
    with pytest.raises(OSError, match="disk full"):
        plots.plot_latency_breakdown(_layer_rows(4), target)
    with pytest.raises(OSError, match="disk full"):
        plots.plot_latency_breakdown(_layer_rows(4), tmp_path / "new.png")
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latency.png"]


def test_no_records_is_an_error():
    with pytest.raises(ValueError, match="no sweep records"):
        plots.sweep_figure([], "array.rows", ("latency_s",))
