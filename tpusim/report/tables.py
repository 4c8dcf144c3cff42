"""Plain-text tables for the terminal."""
from __future__ import annotations

from typing import Any, Sequence


def format_table(columns: Sequence[str], rows: Sequence[dict[str, Any]], max_rows: int | None = None,
                 left: Sequence[str] = ()) -> str:
    """Columns right-aligned (numbers), except those named in ``left`` (text such as node names)."""
    shown = list(rows) if max_rows is None or len(rows) <= max_rows else list(rows[: max_rows - 1])
    cells = [[_cell(row.get(c, "")) for c in columns] for row in shown]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    align = [str.ljust if c in left else str.rjust for c in columns]
    lines = ["  ".join(a(c, w) for a, c, w in zip(align, columns, widths)).rstrip(), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(a(v, w) for a, v, w in zip(align, r, widths)).rstrip() for r in cells]
    if len(shown) < len(rows):
        lines.append(f"... {len(rows) - len(shown)} more rows")
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10000:
        return f"{value:,}"
    return str(value)
