"""Plots are valid PNGs written atomically: a failed plot leaves neither a partial file nor a temp file."""
from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
from matplotlib.colors import to_rgba
from matplotlib.figure import Figure
from matplotlib.markers import TICKDOWN, TICKLEFT, TICKRIGHT
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
    marks = [line for line in ax.lines if line.get_marker() == TICKDOWN]
    assert len(marks) == 1 and len(expected) > 20
    np.testing.assert_allclose(marks[0].get_xdata(), expected)
    # An axis with one decade mark or none keeps matplotlib's minor ticks, which it labels there.
    rows = _layer_rows(3)
    for row in rows:
        row["dram_bytes"] = row["macs"] // 1000  # 1000 MACs per byte, near the ridge: x spans 500..2700
    fig = plots.roofline_figure([("tpu_v1", cfg, rows)])
    ax = fig.axes[0]
    assert not [line for line in ax.lines if line.get_marker() == TICKDOWN]
    fig.canvas.draw()
    assert [t.get_text() for t in ax.xaxis.get_minorticklabels() if t.get_text()]  # e.g. 600, 2,000


BERT_BLOCK = ("attention.query.matmul", "attention.scores", "attention.probs", "output.dense.matmul")


def _bert_like_names(blocks: int) -> list[str]:
    """Two embedding layers, ``blocks`` encoder blocks of the same four layers, a classifier."""
    return (["embeddings.word", "embeddings.LayerNorm"]
            + [f"encoder.layer.{b}.{tail}" for b in range(blocks) for tail in BERT_BLOCK] + ["classifier"])


def test_up_to_named_rows_max_layers_every_row_is_named():
    names = _bert_like_names((plots.NAMED_ROWS_MAX - 3) // 4)
    assert len(names) <= plots.NAMED_ROWS_MAX
    assert plots.layer_rows_plan(names) == (names, [])


def test_beyond_named_rows_max_a_repeated_block_is_named_once():
    names = _bert_like_names(30)  # 123 layers
    shown, blocks = plots.layer_rows_plan(names)
    # The embeddings, the first encoder block and the classifier keep their names; blocks 1-29 repeat block 0.
    assert shown == names[:6] + [None] * (29 * 4) + ["classifier"]
    assert blocks == [plots.RepeatedBlock(2 + 4 * b, 6 + 4 * b,
                                          f"encoder.layer.{b} (4 layers, named as in encoder.layer.0)")
                      for b in range(1, 30)]


def test_only_blocks_with_the_same_names_in_the_same_order_repeat():
    names = [f"stage.{b}.conv{i}" for b in range(30) for i in range(3)]  # 90 layers in blocks of three
    names[3:6] = ["stage.1.conv0", "stage.1.conv2", "stage.1.conv1"]  # the same names in another order
    names[6:9] = ["stage.2.conv0", "stage.2.conv1", "add_8"]  # a block cut short by a layer of no block
    names += [f"head.{i}.fc" for i in range(11)] + ["head.11.fc", "head.11.act"]  # blocks of one, then two
    shown, blocks = plots.layer_rows_plan(names)
    assert [b.first for b in blocks] == [9 + 3 * b for b in range(27)]  # stage.3 to stage.29 repeat stage.0
    assert blocks[0].label == "stage.3 (3 layers, named as in stage.0)"
    assert shown[:9] == names[:9] and shown[90:] == names[90:]
    # stage.1 is a block of its own (its order differs), stage.2's two layers are the first of their kind
    assert [n for n in shown if n is not None] == names[:9] + names[90:]


def _densenet_like_names() -> list[str]:
    """torch.onnx.export's names of a DenseNet: dense blocks of dense layers of four layers, transitions between."""
    layer = ("Concat", "norm1/BatchNormalization", "conv1/Conv", "conv2/Conv")
    names = ["/features/conv0/Conv"]
    for block, dense_layers in enumerate((6, 12, 24), start=1):
        names += [f"/features/denseblock{block}/denselayer{i}/{tail}"
                  for i in range(1, dense_layers + 1) for tail in layer]
        names += [f"/features/transition{block}/norm/BatchNormalization", f"/features/transition{block}/conv/Conv"]
    return names + ["/classifier/Gemm"]


def test_nested_blocks_of_torch_export_names_repeat_at_the_outermost_level_that_repeats():
    names = _densenet_like_names()  # 172 layers
    shown, blocks = plots.layer_rows_plan(names)
    first = "/features/denseblock1/denselayer1"
    # No dense block repeats another (6, 12 and 24 dense layers), so their dense layers are looked at: each repeats
    # the first dense layer of the first block; the transitions repeat the first transition.
    expected = [f"/features/denseblock{b}/denselayer{i} (4 layers, named as in {first})"
                for b, n in enumerate((6, 12, 24), start=1) for i in range(1, n + 1) if (b, i) != (1, 1)]
    labels = [block.label for block in blocks if "transition" not in block.label]
    assert labels == expected
    assert [block.label for block in blocks if "transition" in block.label] == [
        f"/features/transition{b} (2 layers, named as in /features/transition1)" for b in (2, 3)]
    assert [n for n in shown if n is not None] == (names[:5] + names[25:27] + ["/classifier/Gemm"])
    # "denselayer1" is not a block of "denselayer10": a prefix ends at a separator
    assert not any(b.first <= names.index("/features/denseblock2/denselayer10/Concat") < b.stop and
                   "denselayer1 " in b.label for b in blocks)


def test_a_large_model_without_repeated_blocks_names_every_layer():
    names = [f"conv{i}" for i in range(plots.NAMED_ROWS_MAX + 20)]
    assert plots.layer_rows_plan(names) == (names, [])
    fig = plots.latency_breakdown_figure([{**row, "layer": name} for row, name in zip(_layer_rows(len(names)), names)])
    assert plots.layer_labels(fig) == names
    assert fig.get_size_inches()[1] == pytest.approx(plots.ROW_IN * len(names) + 1.6)


def test_breakdown_of_a_model_of_repeated_blocks(tmp_path):
    names = _bert_like_names(30)
    rows = [{**row, "layer": name} for row, name in zip(_layer_rows(len(names)), names)]
    fig = plots.latency_breakdown_figure(rows)
    ax = fig.axes[0]
    # Every layer keeps its bar in every stack and its tick mark.
    stacks = [c for c in ax.collections if c.get_label() in [label for _, label, _ in plots.LATENCY_CATEGORIES]]
    assert [len(c.get_paths()) for c in stacks] == [len(rows)] * 4
    ticks = [line for line in ax.lines if line.get_marker() == TICKLEFT]
    assert len(ticks) == 1 and list(ticks[0].get_ydata()) == list(range(len(rows)))
    # Named rows at their places; each repeated block's label at its middle, its bracket over its bars.
    texts = {t.get_text(): t for t in ax.texts}
    assert plots.layer_labels(fig) == names[:6] + ["classifier"]
    assert all(texts[name].get_position()[1] == names.index(name) for name in plots.layer_labels(fig))
    _, blocks = plots.layer_rows_plan(names)
    assert plots.layer_labels(fig, plots.BLOCK_LABEL_GID) == [b.label for b in blocks]
    assert [texts[b.label].get_position()[1] for b in blocks] == [(b.first + b.stop - 1) / 2 for b in blocks]
    brackets = [line for line in ax.lines if line.get_marker() == TICKRIGHT]
    assert [tuple(line.get_ydata()) for line in brackets] == [
        (b.first - plots.BAR_HEIGHT / 2, b.stop - 1 + plots.BAR_HEIGHT / 2) for b in blocks]
    assert fig.get_size_inches()[1] == pytest.approx(plots.DENSE_ROW_IN * len(rows) + 1.6)
    contents = ax.get_tightbbox(fig.canvas.get_renderer())  # the block labels fit too
    assert contents.x0 >= 0 and contents.x0 < 0.2 * fig.dpi and contents.x1 <= fig.bbox.x1
    energy = {name: LayerEnergy(mac=100.0 * i, weight_dram=50.0).as_dict() for i, name in enumerate(names)}
    assert plots.layer_labels(plots.energy_breakdown_figure(energy), plots.BLOCK_LABEL_GID) == [b.label for b in blocks]
    assert _is_png(plots.plot_latency_breakdown(rows, tmp_path / "latency.png"))


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


def _prefetched_rows() -> list[dict]:
    """Layer rows of three ops; two finish sooner than their own weight bytes take at 34 GB/s."""
    rows = _layer_rows(8)
    rows[1]["op"], rows[2]["op"] = "gemm", "matmul"
    for i in (0, 2):  # 1 MAC per byte: its weights alone take dram_bytes / 34e9 s; make it 3x faster
        rows[i]["dram_bytes"] = rows[i]["macs"]
        rows[i]["cycles"] = round(rows[i]["dram_bytes"] / 34e9 * 700e6 / 3)
    return rows


def test_roofline_draws_points_above_the_roof_hollow_and_explains_them(tmp_path):
    cfg = load_config(TPU_V1)
    rows = _prefetched_rows()
    matrix = [r for r in rows if r["M"] != ""]
    assert plots.above_roof(cfg, rows) == [i in (0, 2) for i in range(len(matrix))]
    fig = plots.roofline_figure([("tpu_v1", cfg, rows)])
    ax = fig.axes[0]
    (points,) = ax.collections
    roof = ax.lines[0]
    offsets = points.get_offsets()
    roof_at = np.exp(np.interp(np.log(offsets[:, 0]), np.log(roof.get_xdata()), np.log(roof.get_ydata())))
    above = offsets[:, 1] > 1.001 * roof_at
    assert list(above) == plots.above_roof(cfg, rows)
    faces, edges = points.get_facecolors(), points.get_edgecolors()
    assert list(faces[:, 3] == 0) == list(above)  # exactly the points above the roof are hollow
    assert (edges[:, 3] > 0).all()
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert plots.ABOVE_ROOF_LABEL in legend
    assert "prefetched while\nearlier layers ran" in plots.ABOVE_ROOF_LABEL
    hollow = ax.get_legend().legend_handles[legend.index(plots.ABOVE_ROOF_LABEL)]
    assert hollow.get_markerfacecolor() == "none" and hollow.get_markeredgecolor() != "none"
    assert _is_png(plots.plot_roofline(cfg, rows, tmp_path / "roof.png"))
    # Without such points the legend does not mention them.
    fig = plots.roofline_figure([("tpu_v1", cfg, _layer_rows(12))])
    assert plots.ABOVE_ROOF_LABEL not in [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert (fig.axes[0].collections[0].get_facecolors()[:, 3] > 0).all()


def test_roofline_colours_points_by_op_one_colour_each():
    cfg = load_config(TPU_V1)
    rows = _prefetched_rows()
    matrix = [r for r in rows if r["M"] != ""]
    fig = plots.roofline_figure([("tpu_v1", cfg, {"a": rows, "b": _layer_rows(4)})])
    ax = fig.axes[0]
    colour_of: dict[str, tuple] = {}
    for collection, layers in zip(ax.collections, (matrix, [r for r in _layer_rows(4) if r["M"] != ""])):
        for layer, edge in zip(layers, collection.get_edgecolors()):
            assert colour_of.setdefault(layer["op"], tuple(edge[:3])) == tuple(edge[:3])
    assert sorted(colour_of) == ["conv", "gemm", "matmul"]
    assert len(set(colour_of.values())) == 3  # one colour per op, distinct
    handles = ax.get_legend().legend_handles
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    for op, rgb in colour_of.items():
        handle = handles[labels.index(op)]
        np.testing.assert_allclose(to_rgba(handle.get_color())[:3], rgb)
    # Several workloads: each named, with its marker.
    assert "a (6 layers)" in labels and "b (3 layers)" in labels
    assert [c.get_label() for c in ax.collections] == ["a (6 layers)", "b (3 layers)"]


def test_sweep_names_every_zipped_parameter_on_the_x_axis():
    records = _sweep_records()
    fig = plots.sweep_figure(records, "array.rows", ("latency_s",), params=("model", "batch", "array.rows",
                                                                              "array.cols"))
    assert fig.axes[0].get_xlabel() == "array.rows = array.cols"
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["32", "128", "512"]
    for record in records:  # zipped with different values: both named, both values at each tick
        record["array.cols"] = 2 * record["array.rows"]
        record["weight_fifo.depth"] = 4
    fig = plots.sweep_figure(records, "array.rows", ("latency_s",),
                             params=("model", "batch", "array.rows", "array.cols", "weight_fifo.depth"))
    ax = fig.axes[0]
    assert ax.get_xlabel() == "array.rows / array.cols"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["32 / 64", "128 / 256", "512 / 1024"]
    assert len(ax.lines) == 4  # model x batch; the zipped parameter makes no lines


def test_sweep_axes_turn_logarithmic_by_the_data_span():
    records = [{"array.rows": size, "m": 1.0 + size / 1000, "w": 1e-3 * size} for size in (32, 64, 128)]
    fig = plots.sweep_figure(records, "array.rows", ("m", "w"), params=("array.rows",))
    linear, wide = fig.axes
    assert linear.get_xscale() == "log" and linear.xaxis.get_transform().base == 2  # 32..128 spans 4x
    assert linear.get_yscale() == "linear"  # 1.03..1.13
    assert wide.get_yscale() == "linear"  # 0.032..0.128, under a decade
    records = [{"batch": b, "m": 1e-3 * b} for b in (1, 3, 10)]
    fig = plots.sweep_figure(records, "batch", ("m",), params=("batch",))
    assert fig.axes[0].get_xscale() == "log" and fig.axes[0].xaxis.get_transform().base == 10
    assert fig.axes[0].get_yscale() == "log"  # 0.001..0.01: a decade
    records = [{"batch": b, "m": 1.0} for b in (1, 2, 3)]
    assert plots.sweep_figure(records, "batch", ("m",), params=("batch",)).axes[0].get_xscale() == "linear"


def test_sweep_never_joins_categorical_points():
    records = [{"quant.calibration": c, "quant.weights": w, "cosine": 0.9 + 0.01 * i}
               for i, (c, w) in enumerate((c, w) for c in ("minmax", "mse", "percentile")
                                          for w in ("per-tensor", "per-channel"))]
    fig = plots.sweep_figure(records, "quant.calibration", ("cosine",), params=("quant.calibration", "quant.weights"))
    ax = fig.axes[0]
    assert len(ax.lines) == 2 and all(line.get_linestyle() == "None" for line in ax.lines)
    assert all(line.get_marker() not in ("", "None", None) for line in ax.lines)
    # Side by side within each category, the same way in each.
    first, second = (np.asarray(line.get_xdata()) for line in ax.lines)
    assert (first < second).all()
    assert list(np.round(first)) == list(np.round(second)) == [0, 1, 2]
    records = _sweep_records()  # a numeric x keeps its lines
    fig = plots.sweep_figure(records, "array.rows", ("latency_s",), params=("model", "array.rows"))
    assert all(line.get_linestyle() == "-" for line in fig.axes[0].lines)


def test_side_by_side_rooflines_share_the_figure_evenly():
    cfg = load_config(TPU_V1)
    rows = _prefetched_rows()
    fig = plots.roofline_figure([("DDR3", cfg, rows), ("GDDR5", cfg.replace(**{"weight_memory.bandwidth_gb_s": 180}),
                                                         rows)])
    left, right = (ax.get_position() for ax in fig.axes)
    assert left.width == pytest.approx(right.width) and left.width > 0.3  # of the figure's width, each
    assert 0 < left.x0 < left.x1 < right.x0 < right.x1 < 1
    for ax in fig.axes:  # the shared TOPS axis has its minor marks on both panels
        marks = [line for line in ax.lines if line.get_marker() == TICKLEFT]
        assert len(marks) == 1 and len(marks[0].get_ydata()) > 10


def test_matplotlib_is_imported_by_the_first_figure_not_by_importing_the_module(tmp_path):
    import subprocess
    import sys

    code = ("import sys\nfrom tpusim.report import plots\nloaded = 'matplotlib' in sys.modules\n"
            f"plots.plot_latency_breakdown([], {str(tmp_path / 'empty.png')!r})\n"
            "print(loaded, 'matplotlib' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "True"]
    assert (tmp_path / "empty.png").read_bytes().startswith(PNG_MAGIC)


def _grid_records(**values):
    """Every combination of the given parameters' values, with a latency that depends on each."""
    names = list(values)
    records = []
    for combo in itertools.product(*values.values()):
        record = dict(zip(names, combo))
        record["latency_s"] = 1e-3 * (1 + sum(i * (v if isinstance(v, (int, float)) else 1)
                                                for i, v in enumerate(combo, 1)))
        records.append(record)
    return records


def test_a_sweep_with_more_lines_than_a_legend_names_colours_them_by_one_parameter():
    # 3 x 12 x 2 points: 24 lines against array.rows, more than a legend names. Coloured by the parameter
    # with the most values that ten colours tell apart (b, 2 values; a has 12): one artist per colour
    # holding its 12 lines, NaN between them, and a legend of b's values.
    records = _grid_records(**{"array.rows": [32, 64, 128], "a": list(range(12)), "b": [1, 2]})
    fig = plots.sweep_figure(records, "array.rows", ("latency_s",), params=("array.rows", "a", "b"))
    (ax,) = fig.axes
    assert len(ax.lines) == 2 and len({line.get_color() for line in ax.lines}) == 2
    for line in ax.lines:
        xs = np.asarray(line.get_xdata(), dtype=float)
        assert np.isnan(xs).sum() == 12 and sorted(set(xs[~np.isnan(xs)])) == [32, 64, 128]
        assert line.get_linestyle() == "-" and line.get_marker() == "o"
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == ["1", "2"]
    assert legend.get_title().get_text() == "b\n24 lines, 12 a colour"


def test_a_colour_parameter_of_more_than_ten_values_takes_a_ramp_and_names_ten_of_them():
    records = _grid_records(batch=[1, 2, 4], a=list(range(12)))
    fig = plots.sweep_figure(records, "batch", ("latency_s",), params=("batch", "a"))
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == ["0", "1", "2", "4", "5", "6", "7", "9", "10", "11"]
    assert legend.get_title().get_text() == "a (10 of 12 values)\n12 lines, 1 a colour"
    assert len(fig.axes[0].lines) == 12 and len({line.get_color() for line in fig.axes[0].lines}) == 12


def test_many_lines_of_a_categorical_sweep_stay_unjoined_markers_side_by_side():
    records = _grid_records(**{"quant.calibration": ["minmax", "mse"], "a": list(range(6)), "b": [1, 2]})
    fig = plots.sweep_figure(records, "quant.calibration", ("latency_s",), params=("quant.calibration", "a", "b"))
    lines = fig.axes[0].lines  # 12 groups, coloured by a (6 values, b has 2)
    assert len(lines) == 6 and all(line.get_linestyle() == "None" and line.get_marker() == "o" for line in lines)
    xs = np.concatenate([np.asarray(line.get_xdata(), dtype=float) for line in lines])
    xs = xs[~np.isnan(xs)]
    assert len(set(np.round(xs, 6))) == 24 and set(np.round(xs)) == {0, 1}  # 12 offsets in each category
