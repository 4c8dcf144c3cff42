"""Plain text for the terminal: tables and the numbers in them.

Counts get thousands separators, fractions print as percentages, energies and durations in the unit
their magnitude calls for (``43.23 mJ``, never ``4.323e+04 uJ``). Files (CSV, JSON) keep plain numbers.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

ELLIPSIS = "..."


def format_table(columns: Sequence[str], rows: Sequence[Mapping[str, Any]], max_rows: int | None = None,
                 left: Sequence[str] = (), headers: Mapping[str, str] | None = None, width: int | None = None,
                 shrink: str | None = None) -> str:
    """Columns right-aligned (numbers), except those named in ``left`` (text such as node names).

    ``headers`` relabels columns; with ``width`` the ``shrink`` column's cells are cut in the middle
    (``layer1.0...conv2``) until every line fits ``width`` characters or the column is down to 8
    characters (or its header's width, if wider).
    """
    shown = list(rows) if max_rows is None or len(rows) <= max_rows else list(rows[: max_rows - 1])
    titles = [(headers or {}).get(c, c) for c in columns]
    cells = [[_cell(row.get(c, "")) for c in columns] for row in shown]
    widths = [max([len(t)] + [len(r[i]) for r in cells]) for i, t in enumerate(titles)]
    if width is not None and shrink in columns:
        i = list(columns).index(shrink)
        excess = sum(widths) + 2 * (len(widths) - 1) - width
        if excess > 0:
            floor = min(widths[i], max(len(titles[i]), 8))
            widths[i] = max(floor, widths[i] - excess)
            for r in cells:
                r[i] = _shorten(r[i], widths[i])
    align = [str.ljust if c in left else str.rjust for c in columns]
    lines = ["  ".join(a(t, w) for a, t, w in zip(align, titles, widths)).rstrip(),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(a(v, w) for a, v, w in zip(align, r, widths)).rstrip() for r in cells]
    if len(shown) < len(rows):
        lines.append(f"... {len(rows) - len(shown):,} more rows")
    return "\n".join(lines)


def _shorten(text: str, width: int) -> str:
    """``text`` cut in the middle to ``width`` characters: a layer's name tells most at both ends."""
    if len(text) <= width:
        return text
    keep = width - len(ELLIPSIS)
    head = (keep + 1) // 2
    return text[:head] + ELLIPSIS + text[len(text) - (keep - head):]


def _cell(value: Any) -> str:
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 10_000 else f"{value:.4g}"
    return str(value)


def format_percent(fraction: float, digits: int = 1) -> str:
    """0.093 -> ``9.3 %``."""
    return f"{100.0 * fraction:.{digits}f} %"


def format_agreement(fraction: float, samples: int) -> str:
    """The share of ``samples`` that agreed, with its basis: 0.9375 of 16 -> ``15/16 (94 %)``."""
    return f"{round(fraction * samples):,}/{samples:,} ({format_percent(fraction, 0)})"


_ENERGY_UNITS = (("J", 1e12), ("mJ", 1e9), ("uJ", 1e6), ("nJ", 1e3), ("pJ", 1.0))
_TIME_UNITS = (("s", 1.0), ("ms", 1e-3), ("us", 1e-6), ("ns", 1e-9))


def _scaled(value: float, units: Sequence[tuple[str, float]]) -> str:
    """Four significant digits in the largest unit that keeps the number at or above 1."""
    for name, size in units:
        if abs(value) >= size:
            scaled = value / size
            text = f"{scaled:,.0f}" if abs(scaled) >= 10_000 else f"{scaled:.4g}"
            return f"{text} {name}"
    name, size = units[-1]
    return f"{value / size:.4g} {name}"


def format_energy(pj: float) -> str:
    """An energy given in pJ: 4.323e10 -> ``43.23 mJ``, 307e6 -> ``307 uJ``."""
    return _scaled(pj, _ENERGY_UNITS)


def format_duration(seconds: float) -> str:
    """1.032e-05 -> ``10.32 us``, 0.9541e-3 -> ``954.1 us``."""
    return _scaled(seconds, _TIME_UNITS)


def format_rate(per_second: float) -> str:
    """A rate as a count when it is one (``96,913``), with significant digits when small (``2.5``)."""
    return f"{per_second:,.0f}" if per_second >= 100 else f"{per_second:.3g}"
