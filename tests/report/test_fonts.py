"""The in-memory fonts draw matplotlib's pixels: the same PNG bytes as matplotlib's own Agg canvas."""
from __future__ import annotations

import warnings

import pytest
from matplotlib import ft2font
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from tpusim.config import load_config
from tpusim.report import fonts, plots
from tests.report.test_plots import TPU_V1, _layer_rows

MISSING_GLYPH = "\u6f22"  # a CJK ideograph: in neither DejaVu font, so the Last Resort font draws it (and warns)


def _stock_png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)  # matplotlib's own canvas, which figure_png keeps as it finds it
    return plots.figure_png(fig)


def _text_figure(text: str) -> Figure:
    fig = Figure(figsize=(4, 2), dpi=plots.DPI)
    ax = fig.subplots()
    ax.set_title(f"{text} µJ ×10⁻⁵", fontweight="bold")
    ax.set_xlabel(text, fontsize=7, style="italic")
    ax.text(0.5, 0.5, text, rotation=30, family="monospace")
    ax.text(0.1, 0.2, text, family="serif", fontsize=11)
    return fig


def _run_figure(name: str) -> Figure:
    rows = _layer_rows(73)
    if name == "latency":
        return plots.latency_breakdown_figure(rows)
    if name == "energy":
        return plots.energy_breakdown_figure({r["layer"]: {"mxu_mac": 1e6 * (i + 1), "unified_buffer": 5e5}
                                              for i, r in enumerate(rows)})
    return plots.roofline_figure([("tpu_v1", load_config(TPU_V1), rows)])


@pytest.mark.parametrize("name", ["latency", "energy", "roofline"])
def test_run_figures_are_the_bytes_matplotlibs_own_fonts_draw(name):
    assert plots.figure_png(_run_figure(name)) == _stock_png(_run_figure(name))


def test_every_style_family_and_angle_is_drawn_as_matplotlib_draws_it():
    text = "layer3.2.conv2 (Conv) $x$"
    assert plots.figure_png(_text_figure(text)) == _stock_png(_text_figure(text))


def test_a_glyph_in_no_font_warns_and_falls_back_as_matplotlib_does():
    with warnings.catch_warnings(record=True) as ours:
        warnings.simplefilter("always")
        png = plots.figure_png(_text_figure(MISSING_GLYPH))
    with warnings.catch_warnings(record=True) as stock:
        warnings.simplefilter("always")
        expected = _stock_png(_text_figure(MISSING_GLYPH))
    assert png == expected
    assert sorted({str(w.message) for w in ours}) == sorted({str(w.message) for w in stock})
    assert any("missing from font" in str(w.message) for w in ours)


def test_a_matplotlib_that_refuses_the_arguments_gets_its_own_fonts(monkeypatch):
    def refuse(*args, **kwargs):
        raise TypeError("__init__(): incompatible constructor arguments")

    expected = _stock_png(_text_figure("conv1"))
    fonts._font.cache_clear()
    monkeypatch.setattr(ft2font, "FT2Font", refuse)
    try:
        assert plots.figure_png(_text_figure("conv1")) == expected
    finally:
        fonts._font.cache_clear()  # no None left cached for the fonts of later tests


def test_a_figure_on_an_agg_canvas_keeps_it():
    fig = Figure()
    own = FigureCanvasAgg(fig)
    assert fonts.canvas(fig) is own
    fresh = Figure()
    assert isinstance(fonts.canvas(fresh), FigureCanvasAgg) and fresh.canvas is not own
    assert type(fresh.canvas.get_renderer()) is not type(own.get_renderer())  # the renderer with fonts in memory
