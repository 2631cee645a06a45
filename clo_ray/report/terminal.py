"""The best-per-cell table as plain text: what a sweep prints when it ends (report.md holds
the full report)."""

from __future__ import annotations

from collections.abc import Sequence

from clo_ray.report.results import Results, format_value, is_percent, method_label

MAX_METRICS = 5  # a terminal line stays readable


def best_cells_text(res: Results, metrics: Sequence[str]) -> str:
    """One line per cell (its best trial; the mean over repeats where there are any) and per
    base model, the first :data:`MAX_METRICS` of ``metrics`` as columns; "" without cells."""
    if not res.cells:
        return ""
    shown = list(metrics)[:MAX_METRICS]
    header = ["model", "language", "method", "budget",
              *(f"{m} (%)" if is_percent(m) else m for m in shown)]
    rows: list[list[str]] = []
    seen_base: set[tuple[str, str]] = set()
    for cell in res.sorted_cells():
        model, language = cell[0], cell[1]
        if (model, language) not in seen_base and (model, language) in res.base:
            seen_base.add((model, language))
            rows.append([model, language, "base", "0",
                         *(format_value(m, res.base_value(model, language, m)) for m in shown)])
        rows.append([model, language, method_label(cell[2]), str(cell[3]),
                     *(format_value(m, res.value(cell, m)) for m in shown)])
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if i >= 3 else c.ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths, strict=True))).rstrip()

    title = f"best trial per cell (by {res.rank_by}; full report in report.md):"
    return "\n".join([title, line(header), line(["-" * w for w in widths]),
                      *(line(r) for r in rows)])
