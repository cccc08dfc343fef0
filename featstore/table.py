"""Plain-text tables for the terminal: `featstore info`, `featstore stats`, the sweep and the tools' benchmarks."""
from __future__ import annotations

from collections.abc import Sequence


def format_table(rows: Sequence[Sequence[object]], header: Sequence[str] | None = None, *, rule: bool = True,
                 right: Sequence[int] = (), indent: str = "") -> str:
    """Columns padded to their widest cell, two spaces apart; `header` gets a dashed rule under it (`rule`); the
    column indices in `right` are right-aligned (numbers)."""
    cells = [[str(c) for c in r] for r in rows]
    head = [str(h) for h in header] if header is not None else None
    table = ([head] if head else []) + cells
    if not table:
        return ""
    widths = [max(len(r[i]) for r in table if i < len(r)) for i in range(max(len(r) for r in table))]

    def line(r: list[str]) -> str:
        return indent + "  ".join(s.rjust(w) if i in right else s.ljust(w) for i, (s, w) in enumerate(zip(r, widths))).rstrip()

    out = []
    if head:
        out.append(line(head))
        if rule:
            out.append(line(["-" * w for w in widths]))
    out += [line(r) for r in cells]
    return "\n".join(out)
