"""The memory plan as text: byte counts and the Markdown table of terms × world sizes."""
from __future__ import annotations

from typing import Sequence

from .plans import MemoryPlan


def fmt_bytes(n: float) -> str:
    """``12.3 GiB`` / ``45.6 MiB`` / ``7.8 KiB``."""
    for unit, div in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if abs(n) >= div or unit == "KiB":
            return f"{n / div:.2f} {unit}" if unit == "GiB" else f"{n / div:.1f} {unit}"
    return f"{n} B"  # pragma: no cover


def markdown_table(plans: Sequence[MemoryPlan]) -> str:
    """One Markdown table: terms as rows, one column per plan (e.g. world sizes), then peak and Σ rows."""
    if not plans:
        return ""
    head = "| term | formula | " + " | ".join(f"W={p.world_size}" for p in plans) + " |"
    lines = [head, "|---|---|" + "---|" * len(plans)]
    for i, t in enumerate(plans[0].terms):
        cells = [fmt_bytes(p.terms[i].nbytes) if p.terms[i].nbytes else "–" for p in plans]
        lines.append(f"| {t.label} | `{t.formula}` | " + " | ".join(cells) + " |")
    lines.append("| **predicted peak** (phase) | max over phases | "
                 + " | ".join(f"**{fmt_bytes(p.peak[0])}** ({p.peak[1]})" for p in plans) + " |")
    lines.append("| Σ all terms (upper bound) | | " + " | ".join(fmt_bytes(p.sum_bytes) for p in plans) + " |")
    lines.append("| solve | | " + " | ".join(f"{p.method}, T_r={p.workload.rows_per_rank(p.world_size)}"
                                                for p in plans) + " |")
    return "\n".join(lines)
