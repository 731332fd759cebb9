"""The one table formatter: GitHub markdown that also reads in a terminal."""

from __future__ import annotations

from typing import Any, Iterable, Sequence


def cell(value: Any, float_format: str = "{:.4f}") -> str:
    """Floats with ``float_format``, ``None`` as an en dash, everything else ``str``."""
    if value is None:
        return "–"
    if isinstance(value, float):
        return float_format.format(value)
    return str(value)


def format_table(header: Sequence[str], rows: Iterable[Sequence[Any]], float_format: str = "{:.4f}",
                 pad: bool = True) -> str:
    """A GitHub-markdown table; cells are formatted by :func:`cell`. ``pad``: columns padded to one width
    (reads in a terminal); without it, cells as they are (compact markdown files, stable lines to grep)."""
    body = [[cell(v, float_format) for v in row] for row in rows]
    head = [str(h) for h in header]
    widths = ([max([len(h), *(len(r[i]) for r in body)]) for i, h in enumerate(head)] if pad
              else [1] * len(head))
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(head), sep, *(line(r) for r in body)])
