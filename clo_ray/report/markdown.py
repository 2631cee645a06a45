"""report.md: the paper-style method tables, data budget, Pareto fronts, configs, trials, notes.

:func:`render_markdown` turns a :class:`~clo_ray.report.results.Results` into the text;
:func:`clo_ray.report.build_report` decides which metrics and plots go in and writes the file.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from datetime import datetime, timezone
from typing import Any

from clo_ray.report.results import (
    BASE_METHOD,
    STATUSES,
    Results,
    Row,
    _number,
    format_value,
    method_label,
    metric_group,
    metric_label,
    metric_mode,
)
from clo_ray.spec.grid import Cell


def _table(header: Sequence[Any], rows: Iterable[Sequence[Any]]) -> list[str]:
    def line(cells: Sequence[Any]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"
    return [line(header), line(["---"] * len(header)), *map(line, rows), ""]


def _cell_text(res: Results, metric: str, model: str, language: str,
               widest: int | None) -> tuple[str, int]:
    """"**72.1** / 55.0 / 60.3" (best in bold) at this model x language's largest budget."""
    budgets = res.budgets(model, language)
    if not budgets:
        return "n/a", len(res.methods)
    values = [res.value(Cell(model, language, m, budgets[-1]), metric) for m in res.methods]
    present = [v for v in values if v is not None]
    pick = min if metric_mode(metric, res.rank_by, res.mode) == "min" else max
    best = pick(present) if len(set(present)) > 1 else None  # a tie of all: no bold
    parts = [f"**{format_value(metric, v)}**" if v is not None and v == best
             else format_value(metric, v) for v in values]
    for i, method in enumerate(res.methods):  # repeats: the mean's 95% interval
        spread = res.interval(Cell(model, language, method, budgets[-1]), metric)
        if spread is not None:
            parts[i] += f" ±{format_value(metric, spread[1])}"
    at = f" (@{budgets[-1]})" if budgets[-1] != widest else ""
    return " / ".join(parts) + at, values.count(None)


def render_markdown(res: Results, metrics: Sequence[str], *, title: str = "",
                    multi_objective: bool = False, plot_names: Sequence[str] = (),
                    paper_sections: Sequence[str] = ()) -> str:
    """The whole report.md: header, the paper's tables (``paper_sections``: markdown lines
    from :mod:`clo_ray.report.paper_tables`), the per-metric tables, budgets, Pareto,
    configs, trials, notes."""
    runs = ", ".join(dict.fromkeys(r["run"] for r in res.rows)) or "(none)"
    trials = [r for r in res.rows if r["method"] != BASE_METHOD]
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    sizes: list[tuple[Sequence[Any], str]] = [
        (res.models, "models"), (res.languages, "languages"), (res.methods, "methods"),
        (res.budgets(), "budgets")]
    grid = " x ".join(f"{len(x)} {what}" for x, what in sizes)
    out = [f"# {title or 'CLO sweep report'}", "",
           f"- run: {runs}", f"- trials: {len(trials)} in {len(res.cells)} cells ({grid}); "
           f"base-model rows: {len(res.base)}", f"- generated: {now}",
           f"- each value is the best trial of its cell by `{res.rank_by}` "
           f"({metric_mode(res.rank_by, res.rank_by, res.mode)}); failed trials are not ranked",
           ""]
    out += list(paper_sections)
    notes: list[str] = []
    widest = max(res.budgets(), default=None)
    legend = " / ".join(method_label(m) for m in res.methods) or "(no trained method)"
    missing = total = 0
    for group in ("Target language", "English (retention)", "Overall") if res.cells else ():
        chosen = [m for m in metrics if metric_group(m) == group]
        if chosen:
            out += [f"## {group}", ""]
        for metric in chosen:
            out += [f"### {metric_label(metric)}", "",
                    f"Each cell: {legend} at the largest budget ({widest} pairs unless marked "
                    "@N); best in bold; ±: the 95% interval of the mean over the cell's "
                    "repeats (search.repeats), where there are any.", ""]
            rows = []
            for model in res.models:
                texts = [_cell_text(res, metric, model, lang, widest) for lang in res.languages]
                missing += sum(n for _, n in texts)
                total += len(texts) * len(res.methods)
                rows.append([model, *(t for t, _ in texts)])
            out += _table(["model", *res.languages], rows)
    out += _budget_section(res, metrics)
    out += _pareto_section(res, metrics, multi_objective)
    out += _configs_section(res)
    out += _trials_section(res, notes)
    if plot_names:
        out += ["## Plots", "", *(f"![{n[:-4]}]({n})" for n in plot_names), ""]
    _add_notes(res, metrics, notes, missing, total)
    out += ["## Notes", "", *(f"- {n}" for n in notes or ["none: every metric shown was "
                                                           "measured in every cell."]), ""]
    return "\n".join(out)


def _budget_section(res: Results, metrics: Sequence[str]) -> list[str]:
    """Metric vs pairs per method (the paper's data-efficiency finding); base = 0 pairs."""
    budgets = res.budgets()
    base = [0] if res.base else []
    out = ["## Data budget", "", "Best trial per cell at each budget (pairs); column 0 is the "
           "untrained base model.", ""] if budgets else []
    for metric in metrics if budgets else []:
        rows = []
        for model in res.models:
            for lang in res.languages:
                if not res.budgets(model, lang):
                    continue
                if (model, lang) in res.base:
                    rows.append([model, lang, "base",
                                 format_value(metric, res.base_value(model, lang, metric)),
                                 *[""] * len(budgets)])
                rows += [[model, lang, method_label(method), *[""] * len(base),
                          *(format_value(metric, res.value(Cell(model, lang, method, b), metric))
                            if (model, lang, method, b) in res.cells else "-" for b in budgets)]
                         for method in res.methods if res.budgets(model, lang, method)]
        out += [f"### {metric_label(metric)}", ""]
        out += _table(["model", "language", "method", *(["0 (base)"] * len(base)), *budgets],
                      rows)
    return out


def _pareto_section(res: Results, metrics: Sequence[str], multi_objective: bool) -> list[str]:
    """The trials no cheaper-or-equal trial beats: the least data for each level of quality."""
    out: list[str] = []
    for metric in res.pareto_metrics(metrics, multi_objective):
        rows = []
        for model in res.models:
            for lang in res.languages:
                trials, front = res.pareto(model, lang, metric)
                if front:
                    rows.append([model, lang, "; ".join(
                        f"{trials[i]['budget']}: {method_label(trials[i]['method'])} "
                        f"{format_value(metric, trials[i][metric])} ({trials[i]['trial_id']})"
                        for i in front)])
        out += [f"## Pareto front: {metric_label(metric)} vs data budget", "",
                "Trials that no trial with fewer or as many pairs beats (pairs: method value "
                "(trial)).", "", *_table(["model", "language", "front"], rows)]
    return out


def _configs_section(res: Results) -> list[str]:
    rows = []
    for cell in res.sorted_cells():
        best = res.best_trial(cell)
        if best is not None:
            params = best.get("params") or "{}"
            try:
                params = json.dumps(json.loads(params), sort_keys=True)
            except (TypeError, ValueError):
                pass  # not JSON: shown as stored
            rows.append([cell[0], cell[1], method_label(cell[2]), cell[3], best["trial_id"],
                         format_value(res.rank_by, best.get(res.rank_by)), f"`{params}`"])
    return ["## Best config per cell", "",
            *_table(["model", "language", "method", "budget", "trial", res.rank_by, "params"],
                    rows)]


def _trials_section(res: Results, notes: list[str]) -> list[str]:
    """Counts by status and what the sweep cost, per method and in total."""
    def summary(name: str, rows: list[Row]) -> list[Any]:
        counts = [sum(r["status"] == s for r in rows) for s in STATUSES]
        seconds = sum(_number(r.get("train_seconds")) or 0.0 for r in rows)
        tokens = sum(r.get("train_tokens") or 0 for r in rows)
        return [name, len(rows), *counts, len(rows) - sum(counts),
                f"{seconds:,.0f}", f"{seconds / 3600:.2f}", f"{tokens:,}"]

    trials = [r for r in res.rows if r["method"] != BASE_METHOD]
    body = [summary(method_label(m), [r for r in trials if r["method"] == m])
            for m in res.methods]
    unknown = sorted({r["status"] for r in trials} - set(STATUSES))
    if unknown:
        notes.append(f"status(es) {', '.join(unknown)} are not completed|stopped|failed: "
                     "counted under 'other', not ranked.")
    for col in ("train_seconds", "train_tokens"):
        lacking = sum(r.get(col) is None for r in trials)
        if lacking:
            notes.append(f"`{col}` missing for {lacking} trial(s): totals cover the rest.")
    return ["## Trials", "", *_table(
        ["method", "trials", *STATUSES, "other", "train s", "train h", "train tokens"],
        [*body, summary("total", trials)])]


def _add_notes(res: Results, metrics: Sequence[str], notes: list[str], missing: int,
               total: int) -> None:
    """Say why a value is n/a, so an empty cell is never mistaken for a bad result."""
    columns = set(res.schema.names)
    for metric in metrics:
        if metric not in columns:
            notes.append(f"`{metric}`: no such column in the results (not measured): n/a.")
        elif not res.has_data(metric):
            notes.append(f"`{metric}`: the column is empty (not measured): n/a.")
    if missing:
        notes.append(f"{missing} of {total} values in the method tables are n/a: no completed "
                     "or stopped trial of that cell has the metric (or the method did not run "
                     "there).")
    if res.fallback_cells:
        notes.append(f"{len(res.fallback_cells)} cell(s) have no trial with `{res.rank_by}`: "
                     "there each metric shows its own best trial.")
    failed = [r for r in res.rows if r["status"] == "failed"]
    if failed:
        shown = ", ".join(f"{r['trial_id']} ({r['model']} / {r['language']} / "
                          f"{method_label(r['method'])} / {r['budget']})" for r in failed[:20])
        notes.append(f"{len(failed)} failed trial(s), not ranked: {shown}"
                     f"{', ...' if len(failed) > 20 else ''}.")
    multi = [lang for lang in res.languages if "+" in lang]
    if multi:
        notes.append(f"{', '.join(multi)}: multi-target trials (languages joined with '+'), "
                     "shown as their own column.")
    if len(res.methods) == 1:
        notes.append(f"only one method ({method_label(res.methods[0])}) in the results: "
                     "nothing to compare it with.")
    if not res.cells:
        notes.append("the results hold no trained trials"
                      f"{' (only base-model rows)' if res.base else ''}: no tables to draw.")

