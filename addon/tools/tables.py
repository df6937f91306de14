"""Plain-text tables that fit the terminal: `durable runs` and `durable show`.

rich renders about 750 rows a second; a 5,000-step run must print in well under a second, so the
CLI lays out its tables itself: each column as wide as its widest cell, and when the whole is wider
than the terminal, the wide columns (URLs, run ids) shrink and their cells fold onto more lines.
"""

from __future__ import annotations

import os
import shutil
import sys

GAP = "  "
MIN_WIDE = 12


def output_width() -> int | None:
    """How wide a table may be: $COLUMNS when set, else the terminal's; None (no limit) when the
    output is piped or redirected: a file or `grep` wants whole run ids and rows, as `ps` gives them."""
    if os.environ.get("COLUMNS", "").isdigit():
        return int(os.environ["COLUMNS"])
    if not sys.stdout.isatty():
        return None
    return shutil.get_terminal_size().columns


def render(title: str, headers: list[str], rows: list[list[str]], wide: set[int], width: int | None = None) -> str:
    """The table as text no wider than `width` (default: output_width(); None: as wide as it is)."""
    width = width or output_width() or 1 << 30
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]
    over = sum(widths) + len(GAP) * (len(widths) - 1) - width
    for i in sorted(wide, key=lambda i: -widths[i]):  # take from the widest first, never below MIN_WIDE
        if over <= 0:
            break
        cut = min(over, max(0, widths[i] - max(MIN_WIDE, len(headers[i]))))
        widths[i] -= cut
        over -= cut
    lines = [
        title,
        GAP.join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip(),
        GAP.join("─" * w for w in widths),
    ]
    for row in rows:
        parts = [[cell[k : k + w] for k in range(0, max(len(cell), 1), w)] for cell, w in zip(row, widths, strict=True)]
        for n in range(max(len(p) for p in parts)):
            lines.append(
                GAP.join((p[n] if n < len(p) else "").ljust(w) for p, w in zip(parts, widths, strict=True)).rstrip()
            )
    return "\n".join(lines)
