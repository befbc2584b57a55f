"""Markdown tables for benchmark output (no extra dependency)."""
from __future__ import annotations


def markdown_table(rows: list[dict[str, object]]) -> str:
    if not rows:
        return ""
    header = list(rows[0])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(row[h]) for h in header) + " |" for row in rows]
    return "\n".join(lines)
