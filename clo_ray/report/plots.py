"""PNG plots of a sweep's results: data-budget curves and quality-vs-budget Pareto fronts.

One file per metric (``budget_curves_<metric>.png``, ``pareto_<metric>.png``), one panel per
model x language (rows = models, columns = languages), one colour per method, the same in
every file, and the untrained base model as a dashed line. Drawn with matplotlib's
object-oriented API on an Agg canvas, never ``pyplot``: no global backend is switched and no
figure is left open, so a sweep driver or a notebook that imports this keeps its own state.
"""

from __future__ import annotations

import io
import re
import textwrap
from collections.abc import Callable, Sequence
from typing import Any

from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, NullLocator

from clo_ray.report.results import (
    RANKED_STATUSES,
    Results,
    is_percent,
    method_label,
    metric_label,
)
from clo_ray.spec.grid import Cell

PanelDraw = Callable[[Axes, str, str, float], None]


def draw_plots(res: Results, metrics: Sequence[str], *,
               multi_objective: bool = False) -> list[tuple[str, bytes]]:
    """``(file name, PNG bytes)`` for every plot the results support; the caller stores them.

    Budget curves for each metric some trained trial measured; Pareto fronts for the metrics
    :meth:`Results.pareto_metrics` names (all when multi-objective, else the ranking metric
    when budgets vary).
    """
    plots = []
    for metric in metrics:
        if any(r.get(metric) is not None for rows in res.cells.values() for r in rows):
            plots.append((f"budget_curves_{_slug(metric)}.png", budget_curves(res, metric)))
    for metric in res.pareto_metrics(metrics, multi_objective):
        plots.append((f"pareto_{_slug(metric)}.png", pareto_plot(res, metric)))
    return plots


def budget_curves(res: Results, metric: str) -> bytes:
    """Metric vs training pairs (log2 axis): the best trial per cell as a line per method, every
    ranked trial as a faint dot (the spread a search leaves), the base model dashed."""
    def panel(ax: Axes, model: str, language: str, scale: float) -> None:
        for method in res.methods:
            cells = [Cell(model, language, method, b) for b in res.budgets(model, language)]
            dots = [(r["budget"], r[metric]) for c in cells for r in res.ranked(c)
                    if r.get(metric) is not None]
            if dots:
                ax.scatter([b for b, _ in dots], [scale * v for _, v in dots], s=12, alpha=0.3,
                           color=_color(res, method), linewidths=0)
            best = [(c[3], v) for c in cells if (v := res.value(c, metric)) is not None]
            if best:
                ax.plot([b for b, _ in best], [scale * v for _, v in best], marker="o",
                        color=_color(res, method), label=method_label(method))

    return _figure(res, metric, panel, f"{metric_label(metric)} vs training pairs "
                   f"(best trial per cell by {res.rank_by}; dots: every trial)")


def pareto_plot(res: Results, metric: str) -> bytes:
    """Every ranked trial at (pairs, metric), coloured by method; the front (no trial with
    fewer or as many pairs does better) ringed in black and joined as a staircase."""
    def panel(ax: Axes, model: str, language: str, scale: float) -> None:
        trials, front = res.pareto(model, language, metric)
        for method in res.methods:
            mine = [r for r in trials if r["method"] == method]
            if mine:
                ax.scatter([r["budget"] for r in mine], [scale * r[metric] for r in mine],
                           s=18, alpha=0.6, color=_color(res, method),
                           label=method_label(method))
        if front:
            xs = [trials[i]["budget"] for i in front]
            ys = [scale * trials[i][metric] for i in front]
            ax.step(xs, ys, where="post", color="black", linewidth=1.0, label="Pareto front")
            ax.scatter(xs, ys, s=70, facecolors="none", edgecolors="black", linewidths=1.5)

    return _figure(res, metric, panel, f"Pareto front: {metric_label(metric)} vs training "
                   f"pairs ({', '.join(RANKED_STATUSES)} trials)")


def _figure(res: Results, metric: str, panel: PanelDraw, title: str) -> bytes:
    """A models x languages grid of panels with shared styling, rendered to PNG bytes."""
    scale = 100.0 if is_percent(metric) else 1.0
    nrows, ncols = max(len(res.models), 1), max(len(res.languages), 1)
    fig = Figure(figsize=(0.6 + 3.6 * ncols, 1.2 + 2.8 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for i, model in enumerate(res.models):
        for j, language in enumerate(res.languages):
            ax = axes[i][j]
            budgets = res.budgets(model, language)
            if not budgets:
                ax.set_axis_off()
                ax.set_title(f"{model} · {language}: no trials", fontsize=9)
                continue
            panel(ax, model, language, scale)
            base = res.base_value(model, language, metric)
            if base is not None:
                ax.axhline(scale * base, linestyle="--", color="gray", linewidth=1.0,
                           label="base model")
            ax.set_xscale("log", base=2)
            ax.xaxis.set_major_locator(FixedLocator(budgets))
            ax.xaxis.set_minor_locator(NullLocator())
            ax.set_xticklabels([str(b) for b in budgets], fontsize=8)
            if len(budgets) == 1:  # a log axis needs a range around a single point
                ax.set_xlim(budgets[0] / 1.5, budgets[0] * 1.5)
            ax.set_title(f"{model} · {language}", fontsize=9)
            ax.grid(True, alpha=0.3)
            ax.set_xlabel("training pairs", fontsize=8)
            ax.set_ylabel(metric_label(metric), fontsize=8)
    handles: dict[str, Any] = {}
    for ax in fig.axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(label, handle)
    if handles:
        fig.legend(list(handles.values()), list(handles), loc="outside lower center",
                   ncol=len(handles), fontsize=8)
    fig.suptitle(fit_title(title, 0.6 + 3.6 * ncols), fontsize=10)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def fit_title(title: str, width_in: float, fontsize: float = 10) -> str:
    """``title`` wrapped to lines that fit a figure ``width_in`` inches wide (an average
    character is ~0.55 em), so no title is cut at the figure's edges."""
    chars = max(20, int(width_in * 72 / (0.55 * fontsize)) - 4)
    return "\n".join(textwrap.wrap(title, chars)) or title


def _color(res: Results, method: str) -> str:
    """The same colour for a method in every panel and file (matplotlib's C0, C1, ...)."""
    return f"C{res.methods.index(method) % 10}"


def _slug(metric: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", metric)
