"""Language fidelity on the prompt sets, with a 95% interval on every number.

A fidelity rate is a share of answers detected as the asked language, so one training has
a closed-form interval: Wilson's score interval over the set's prompts (it stays inside
0-100 and is honest at 48 prompts, where the normal approximation is not). With repeats the
cell shows the mean over seeds and its Student-t interval instead, as the other tables do.
Rows: model x prompt set x {target, English}; columns: languages; each cell the base model,
then each method at the cell's largest budget.
"""

from __future__ import annotations

import math

from clo_ray.report.markdown import _table
from clo_ray.report.results import BASE_METHOD, Results, Row, method_label
from clo_ray.report.schema import PROMPT_SET_PREFIX as PREFIX
from clo_ray.spec.grid import Cell

SIDES = (("target_fidelity", "n_target", "target"), ("english_retention", "n_english", "English"))
Z95 = 1.959963984540054


def wilson_interval(rate: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval (low, high) of a proportion ``rate`` observed on ``n`` trials."""
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    centre = (rate + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(rate * (1 - rate) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def prompt_set_names(res: Results) -> list[str]:
    """Sets with a target-fidelity column and data, in column order."""
    suffix = ".target_fidelity"
    return [name[len(PREFIX):-len(suffix)] for name in res.schema.names
            if name.startswith(PREFIX) and name.endswith(suffix) and res.has_data(name)]


def _one(row: Row | None, metric: str, count: str) -> str:
    """"70.8 [57.0, 81.8]" from one evaluation's rate and prompt count."""
    rate = None if row is None else row.get(metric)
    if row is None or rate is None:
        return "n/a"
    n = row.get(count)
    if not n:
        return f"{100 * rate:.1f}"
    low, high = wilson_interval(float(rate), int(n))
    return f"{100 * rate:.1f} [{100 * low:.1f}, {100 * high:.1f}]"


def _cell(res: Results, model: str, language: str, metric: str, count: str) -> str:
    parts = [_one(res.base.get((model, language)), metric, count)]
    for method in res.methods:
        budgets = res.budgets(model, language, method)
        if not budgets:
            parts.append("n/a")
            continue
        cell = Cell(model, language, method, budgets[-1])
        spread = res.interval(cell, metric)
        if spread is not None:  # repeats: mean over seeds, its 95% half-width
            mean, half, n = spread
            parts.append(f"{100 * mean:.1f} ±{100 * half:.1f} ({n} seeds)")
        else:
            parts.append(_one(res.best_trial(cell), metric, count))
    return " / ".join(parts)


def fidelity_table(res: Results) -> list[str]:
    """Markdown lines of the section; [] when no prompt set was answered."""
    sets = prompt_set_names(res)
    if not sets:
        return []
    rows = []
    for model in res.models:
        for name in sets:
            for suffix, count, label in SIDES:
                metric, n_col = f"{PREFIX}{name}.{suffix}", f"{PREFIX}{name}.{count}"
                if not res.has_data(metric):
                    continue
                rows.append([model, name, label, *(_cell(res, model, language, metric, n_col)
                                                    for language in res.languages)])
    legend = " / ".join(method_label(m) for m in [BASE_METHOD, *res.methods])
    return ["## Language fidelity on the prompt sets", "",
            f"Each cell: {legend} at the largest budget: answers (%) detected as the asked "
            "language, [95% Wilson interval over the set's prompts]; with repeats the mean "
            "over seeds ±its 95% interval.", "",
            *_table(["model", "prompt set", "prompts", *res.languages], rows)]
