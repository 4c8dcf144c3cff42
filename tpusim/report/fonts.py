"""An Agg canvas whose fonts FreeType reads from memory.

Matplotlib's fonts are opened as Python files, and FreeType reads each glyph through them: a seek and a
read, each a call back into Python that the file turns into a system call, every time a glyph is
measured, laid out or rasterised (nothing is cached between texts). A per-layer figure's layer names are
about a thousand glyphs. :func:`canvas` gives a figure a canvas whose renderer takes each font's file into memory once and
hands FreeType that copy, built as matplotlib 3.11 builds its own (the same face, fallback fonts and Last
Resort font, the same kerning), so the pixels are the same: the tests compare the PNG bytes with those of
matplotlib's own canvas. The three figures of a ResNet-50 run, drawn in one process alternately on
either canvas, 25 times each (AMD EPYC Zen 3): 0.86 s of CPU at best and 1.05 s median against 1.00 and
1.35 s.

The fonts are built with ``FT2Font`` arguments matplotlib calls private; where they are refused (another
matplotlib), the renderer uses matplotlib's own fonts, which draw the same, more slowly.
"""
from __future__ import annotations

import functools
import io
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.figure import Figure

LAST_RESORT_FONT = ("fonts", "ttf", "LastResortHE-Regular.ttf")  # matplotlib's font of last resort


def canvas(fig: Figure) -> Any:
    """``fig``'s canvas, made the fast Agg canvas unless it is an Agg canvas already (a figure pyplot
    made keeps its own)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    if isinstance(fig.canvas, FigureCanvasAgg):
        return fig.canvas
    return _canvas_class()(fig)


@functools.cache
def _canvas_class() -> type:
    from matplotlib.backends.backend_agg import FigureCanvasAgg, RendererAgg

    class FontsInMemoryRenderer(RendererAgg):
        def _prepare_font(self, font_prop: Any) -> Any:
            font = _font_for(font_prop)
            if font is None:
                return super()._prepare_font(font_prop)
            font.clear()
            font.set_size(font_prop.get_size_in_points(), self.dpi)
            return font

    class FontsInMemoryCanvas(FigureCanvasAgg):
        def get_renderer(self) -> Any:
            renderer = super().get_renderer()
            if type(renderer) is RendererAgg:  # a new one (made for a new size): give it our fonts
                renderer.__class__ = FontsInMemoryRenderer
            return renderer

    return FontsInMemoryCanvas


def _font_for(font_prop: Any) -> Any:
    """The in-memory font for ``font_prop``, or None where this matplotlib refuses to build one."""
    import matplotlib as mpl
    from matplotlib.font_manager import fontManager

    faces = tuple((str(getattr(f, "path", f)), int(getattr(f, "face_index", 0)))
                  for f in fontManager._find_fonts_by_props(font_prop))
    font = _font(faces, mpl.rcParams["text.kerning_factor"], bool(mpl.rcParams.get("font.enable_last_resort")),
                 threading.get_ident())  # FreeType's faces are not shared across threads (as matplotlib's)
    if font is not None:
        font._set_transform([[0x10000, 0], [0, 0x10000]], [0, 0])  # drawing a glyph leaves its own transform
    return font


@functools.lru_cache(64)
def _font(faces: tuple[tuple[str, int], ...], kerning_factor: int, last_resort: bool, thread_id: int) -> Any:
    from matplotlib import cbook, ft2font

    def load(path: str, face_index: int, **kwargs: Any) -> Any:
        return ft2font.FT2Font(io.BytesIO(_file_bytes(path)), face_index=face_index,
                               _kerning_factor=kerning_factor, **kwargs)

    last_resort_face = (str(Path(cbook._get_data_path(*LAST_RESORT_FONT)).resolve()), 0)
    faces = tuple((str(Path(path).resolve()), index) for path, index in faces)
    try:
        fallbacks = [load(*face) for face in faces[1:]]
        if last_resort and last_resort_face not in faces:
            fallbacks.append(load(*last_resort_face, _warn_if_used=True))  # a glyph found nowhere else warns
        first = load(*faces[0], _fallback_list=fallbacks)
    except TypeError:  # an FT2Font that takes other arguments (another matplotlib)
        return None
    for face, font in zip((*faces, last_resort_face), (first, *fallbacks)):
        if face == last_resort_face:
            font.set_charmap(0)  # its Unicode charmap is Windows' and empty; the first maps every character
            break
    return first


@functools.cache
def _file_bytes(path: str) -> bytes:
    """A font file's bytes, read once: the fonts of every size and style that fall back on it share them."""
    return Path(path).read_bytes()
