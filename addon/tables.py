"""Plain-text tables that fit the terminal: `durable runs` and `durable show`.

rich renders about 750 rows a second; a 5,000-step run must print in well under a second, so the
CLI lays out its tables itself: each column as wide as its widest cell, and when the whole is wider
than the terminal, the wide columns (URLs, run ids) shrink and their cells fold onto more lines.
"""

from __future__ import annotations

import shutil

GAP = "  "
MIN_WIDE = 12


def render(title: str, headers: list[str], rows: list[list[str]], wide: set[int], width: int | None = None) -> str:
    """The table as text no wider than `width` (default: the terminal's, $COLUMNS when piped)."""
    width = width or shutil.get_terminal_size().columns
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
