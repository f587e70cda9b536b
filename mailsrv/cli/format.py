"""How the command line prints: plain tables, sizes and times a person reads."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Format rows as a plain text table with a header line (empty rows: header only)."""
    cells = [[str(h) for h in headers]] + [["" if v is None else str(v) for v in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def human_size(octets: int | None) -> str:
    if octets is None:
        return "-"
    for unit, factor in (("G", 1024**3), ("M", 1024**2), ("K", 1024)):
        if octets >= factor:
            return f"{octets / factor:.1f}{unit}"
    return str(octets)


def when(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S") if value else "-"
