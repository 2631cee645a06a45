"""The grouping and formatting that report.md and the plots share: :class:`Results`, value formats.

:class:`Results` groups one validated results table (see :mod:`clo_ray.report` for the
contract) by cell (model x language x method x budget) and picks each cell's best trial; the
formatting helpers turn its values into the paper's text (percentages, 3 significant digits,
labels). Imports nothing else of the report, so :mod:`clo_ray.report`,
:mod:`clo_ray.report.markdown` and :mod:`clo_ray.report.plots` can all build on it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from clo_ray.languages import PAPER_LANGUAGES
from clo_ray.spec.grid import Cell

STATUSES = ("completed", "stopped", "failed")
# A stopped trial ranks only by what was measured on it: the sweep leaves its held-out metrics
# null (ASHA stops it before the evaluation); a results file from elsewhere may fill them.
RANKED_STATUSES = ("completed", "stopped")
BASE_METHOD = "base"
PERCENT_METRICS = frozenset({"target_fidelity", "english_retention", "preference_accuracy",
                             "judge_win_rate", "english_judge_win_rate"})
METHOD_ORDER = ("clo", "sft", "sft_dpo", "sft_dpo_mono", "crpo")
METHOD_LABELS = {"clo": "CLO", "sft": "SFT", "sft_dpo": "SFT+DPO",
                 "sft_dpo_mono": "SFT+DPO (monolingual)", "crpo": "CRPO", BASE_METHOD: "base"}

Row = dict[str, Any]


# ------------------------------------------------------------------------------ selection


def metric_mode(metric: str, rank_by: str = "objective", mode: str = "max") -> str:
    """"min" or "max": losses (``*_nll``) are minimised; the ranking metric follows ``mode``."""
    if metric.endswith("_nll"):
        return "min"
    return mode if metric in (rank_by, "objective") else "max"


def _number(value: Any) -> float | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value


def _best(rows: Iterable[Row], key: str, mode: str) -> Row | None:
    """The first row with the best non-null ``key`` (ties keep the earlier trial)."""
    best = None
    for row in rows:
        value = _number(row.get(key))
        if value is None:
            continue
        if best is None or (value < best[key] if mode == "min" else value > best[key]):
            best = row
    return best


def pareto_front(points: Sequence[tuple[float, float]], *, maximize: bool = True) -> list[int]:
    """Indices of the points no other point dominates, by ascending cost.

    A point is ``(cost, quality)``: cost (pairs, seconds) is minimised, quality maximised
    (minimised with ``maximize=False``). ``j`` dominates ``i`` when it is no worse in both and
    better in one; so equal points both stay (neither is better). O(n^2), which reads plainly
    and is instant for a sweep's hundreds of trials.
    """
    sign = 1.0 if maximize else -1.0
    front = []
    for i, (cost, quality) in enumerate(points):
        q = sign * quality
        if not any(c <= cost and sign * qq >= q and (c < cost or sign * qq > q)
                   for j, (c, qq) in enumerate(points) if j != i):
            front.append(i)
    return sorted(front, key=lambda i: (points[i][0], -sign * points[i][1]))


@dataclass
class Results:
    """The rows of one results table, grouped the ways every table and plot needs them."""

    schema: pa.Schema
    rows: list[Row]
    rank_by: str = "objective"
    mode: str = "max"
    cells: dict[Cell, list[Row]] = field(default_factory=dict)
    base: dict[tuple[str, str], Row] = field(default_factory=dict)
    models: list[str] = field(default_factory=list)
    languages: list[str] = field(default_factory=list)
    methods: list[str] = field(default_factory=list)
    fallback_cells: set[Cell] = field(default_factory=set)

    @classmethod
    def from_table(cls, table: pa.Table, rank_by: str = "objective",
                   mode: str = "max") -> Results:
        """Group rows by cell; order languages as the paper (zh, de, ko, id, sw, yo, then
        others such as multi-target ones by name) and methods as its columns (clo, sft,
        sft_dpo, then the rest in order of appearance)."""
        self = cls(table.schema, table.to_pylist(), rank_by, mode)
        for row in self.rows:
            if row["method"] == BASE_METHOD:
                if row["status"] != "failed":
                    self.base.setdefault((row["model"], row["language"]), row)
                continue
            cell = Cell(row["model"], row["language"], row["method"], row["budget"])
            self.cells.setdefault(cell, []).append(row)
        self.models = list(dict.fromkeys(r["model"] for r in self.rows))
        found = {r["language"] for r in self.rows}
        self.languages = ([c for c in PAPER_LANGUAGES if c in found]
                          + sorted(found - set(PAPER_LANGUAGES)))
        trained = list(dict.fromkeys(c[2] for c in self.cells))
        self.methods = ([m for m in METHOD_ORDER if m in trained]
                        + [m for m in trained if m not in METHOD_ORDER])
        return self

    def budgets(self, model: str | None = None, language: str | None = None,
                method: str | None = None) -> list[int]:
        """Trained budgets (base rows excluded), of one model / language / method if given."""
        return sorted({c[3] for c in self.cells if model in (None, c[0])
                       and language in (None, c[1]) and method in (None, c[2])})

    def sorted_cells(self) -> list[Cell]:
        """Cells in table order: model, language, method, budget."""
        return sorted(self.cells, key=lambda c: (self.models.index(c[0]),
                                                 self.languages.index(c[1]),
                                                 self.methods.index(c[2]), c[3]))

    def ranked(self, cell: Cell) -> list[Row]:
        """The cell's search trials that can be ranked (repeats are not candidates)."""
        return [r for r in self.cells.get(cell, []) if r["status"] in RANKED_STATUSES
                and not r.get("repeat")]

    def repeats(self, cell: Cell) -> list[Row]:
        """The cell's best trial and its completed re-trainings with other seeds
        (``search.repeats``); [] when nothing is ranked."""
        best = self.best_trial(cell)
        if best is None:
            return []
        return [best] + [r for r in self.cells.get(cell, []) if r.get("repeat")
                         and r["status"] == "completed"]

    def interval(self, cell: Cell, metric: str) -> tuple[float, float, int] | None:
        """(mean, 95% half-width, n) of ``metric`` over the cell's repeats; None with fewer
        than two measured repeats (one training has no spread to show)."""
        values = [v for r in self.repeats(cell) if (v := _number(r.get(metric))) is not None]
        if len(values) < 2:
            return None
        return mean_interval(values)

    def best_trial(self, cell: Cell) -> Row | None:
        """The cell's best trial by ``rank_by`` (see :mod:`clo_ray.report`)."""
        return _best(self.ranked(cell), self.rank_by,
                     metric_mode(self.rank_by, self.rank_by, self.mode))

    def value(self, cell: Cell, metric: str) -> float | None:
        """``metric`` of the cell's best trial (the mean over its repeats when the sweep
        repeated it), or its own best where nothing is ranked."""
        spread = self.interval(cell, metric)
        if spread is not None:
            return spread[0]
        best = self.best_trial(cell)
        if best is None:
            best = _best(self.ranked(cell), metric, metric_mode(metric, self.rank_by, self.mode))
            if best is not None:
                self.fallback_cells.add(cell)
        return None if best is None else _number(best.get(metric))

    def base_value(self, model: str, language: str, metric: str) -> float | None:
        row = self.base.get((model, language))
        return None if row is None else _number(row.get(metric))

    def has_data(self, metric: str) -> bool:
        return any(_number(r.get(metric)) is not None for r in self.rows)

    def pareto_metrics(self, metrics: Sequence[str], multi_objective: bool) -> list[str]:
        """Metrics that get a quality-vs-budget Pareto front: each one when multi-objective,
        else the ranking metric (or the first with data) when budgets vary."""
        with_data = [m for m in metrics if self.has_data(m)]
        if multi_objective:
            return with_data
        if len(self.budgets()) < 2:
            return []
        return [self.rank_by] if self.has_data(self.rank_by) else with_data[:1]

    def pareto(self, model: str, language: str, metric: str) -> tuple[list[Row], list[int]]:
        """Ranked trials of one model x language with ``metric``, and their front's indices."""
        rows = [r for (m, lang, _, _), cell in self.cells.items() if (m, lang) == (model, language)
                for r in cell if r["status"] in RANKED_STATUSES
                and _number(r.get(metric)) is not None]
        maximize = metric_mode(metric, self.rank_by, self.mode) == "max"
        return rows, pareto_front([(r["budget"], r[metric]) for r in rows], maximize=maximize)


# Student's t 0.975 quantiles by degrees of freedom (1 .. 30); 1.96 beyond.
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
         2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
         2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def mean_interval(values: Sequence[float]) -> tuple[float, float, int]:
    """(mean, 95% half-width, n): Student's t over independent repeats (few seeds: a normal
    interval would be too narrow)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0, n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    t = _T975[n - 2] if n - 1 <= len(_T975) else 1.96
    return mean, t * sd / math.sqrt(n), n


# ------------------------------------------------------------------------------ formatting


def is_percent(metric: str) -> bool:
    """Shares and win rates (and lm-eval accuracies) are shown as percentages, as the paper."""
    return metric in PERCENT_METRICS or metric.startswith("lm_eval.")


def format_value(metric: str, value: float | None) -> str:
    """``72.1`` for a share of 0.721; 3 significant digits otherwise; ``n/a`` when missing."""
    value = _number(value)
    if value is None:
        return "n/a"
    if is_percent(metric):
        return f"{100 * value:.1f}"
    text = f"{value:#.3g}"
    return text[:-1] if text.endswith(".") else text


def metric_label(metric: str) -> str:
    unit = " (%)" if is_percent(metric) else ""
    arrow = " (lower is better)" if metric.endswith("_nll") else ""
    return f"{metric}{unit}{arrow}"


def method_label(method: str) -> str:
    return METHOD_LABELS.get(method, method)


def metric_group(metric: str) -> str:
    """Which of the paper's two evaluations a metric belongs to (target or English)."""
    if metric.startswith("english_"):
        return "English (retention)"
    if metric.startswith("target_") or metric == "judge_win_rate":
        return "Target language"
    return "Overall"
