"""The report stage: paper-style tables and plots from a sweep's ``results.parquet``.

:func:`build_report` writes ``report.md``, ``best_trials.parquet`` and the PNGs for the sweep
(which holds the table already); ``python -m clo_ray.report RUN_DIR`` does the same from a run
folder's results.parquet alone (local, ``s3://`` or ``gs://``), so a report can be redone
(other metrics, a fixed plot) without re-running a trial. How a cell's value is chosen:
:mod:`clo_ray.report.schema`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import pyarrow as pa

from clo_ray import storage
from clo_ray.report.fidelity_table import fidelity_table
from clo_ray.report.markdown import render_markdown
from clo_ray.report.paper_tables import benchmark_table, judge_curves, main_table
from clo_ray.report.results import Results
from clo_ray.report.schema import DEFAULT_METRICS, ResultsError, validate_results
from clo_ray.report.terminal import best_cells_text

if TYPE_CHECKING:
    from clo_ray.spec.schema import SweepSpec


@dataclass
class ReportFiles:
    """What :func:`build_report` wrote (URIs); ``plots`` in the order they were drawn."""

    markdown: str | None = None
    tables: str | None = None  # best_trials.parquet
    plots: list[str] = field(default_factory=list)
    summary: str = ""  # the best-per-cell table as plain text, for the terminal

    def paths(self) -> list[str]:
        return [p for p in (self.markdown, self.tables) if p] + self.plots


def choose_metrics(results: Results, metrics: Sequence[str] | None) -> list[str]:
    """The metrics asked for, or the defaults that have data (judge ones only when judged)."""
    if metrics:
        return list(dict.fromkeys(metrics))
    return [m for m in DEFAULT_METRICS if results.has_data(m)]


@dataclass(frozen=True)
class ReportOptions:
    """What a report shows and how each cell's best trial is picked.

    ``rank_by`` / ``mode``: the search's metric and mode (they pick each cell's best trial);
    ``metrics``: the tables' metrics (None: the defaults that have data); ``multi_objective``
    draws a Pareto plot per metric (else one, for the ranking metric, when budgets vary).
    """

    metrics: Sequence[str] | None = None
    mode: str = "max"
    rank_by: str = "objective"
    multi_objective: bool = False
    plots: bool = True
    formats: Sequence[str] = ("md", "parquet")
    title: str = ""
    prompt_set: str = "heldout"  # the judged prompt set the paper's table shows
    benchmarks: Sequence[str] = ()

    @classmethod
    def of(cls, spec: SweepSpec) -> ReportOptions:
        """The options a sweep's spec asks for (its ``report`` and ``search`` sections)."""
        return cls(metrics=spec.report.metrics or None, mode=spec.search.mode,
                   rank_by=spec.search.metric, multi_objective=spec.search.multi_objective,
                   plots=spec.report.plots, formats=tuple(spec.report.formats),
                   title=spec.run.name, prompt_set=spec.evaluation.judged_sets()[0],
                   benchmarks=tuple(spec.evaluation.benchmarks))


def build_report(results: pa.Table, out_dir: str, options: ReportOptions = ReportOptions(),
                 storage_options: storage.StorageOptions = None, *,
                 judgements: pa.Table | None = None) -> ReportFiles:
    """Write report.md, best_trials.parquet and the PNGs to ``out_dir``; return their URIs.

    ``judgements``: the judge stage's judgements.parquet (the paper's main table and its
    data-size curves). Every file is written atomically, so a reader never sees half a report.
    """
    mode, formats, plots = options.mode, options.formats, options.plots
    if mode not in ("max", "min"):
        raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
    unknown = set(formats) - {"md", "parquet"}
    if unknown:
        raise ValueError(f"unknown report format(s) {sorted(unknown)}; use md, parquet")
    res = Results.from_table(validate_results(results, "results table"), options.rank_by,
                             mode)
    chosen = choose_metrics(res, options.metrics)
    for metric in chosen:
        kind = res.schema.field(metric).type if metric in res.schema.names else pa.float64()
        if not (pa.types.is_integer(kind) or pa.types.is_floating(kind) or
                pa.types.is_null(kind)):
            raise ResultsError(f"metric {metric!r} is a {kind} column, not a number")
    files, names = ReportFiles(summary=best_cells_text(res, chosen)), []
    judged = judgements.to_pylist() if judgements is not None else []
    if plots:
        from clo_ray.report.plots import draw_plots

        drawn = draw_plots(res, chosen, multi_objective=options.multi_objective)
        curves = judge_curves(res, judged, options.prompt_set)
        if curves is not None:
            drawn.insert(0, ("judge_win_rate_vs_sft_largest.png", curves))
        for name, png in drawn:
            files.plots.append(storage.join(out_dir, name))
            storage.write_bytes_atomic(files.plots[-1], png, storage_options)
            names.append(name)
    if "parquet" in formats:
        files.tables = storage.join(out_dir, "best_trials.parquet")
        storage.write_parquet_atomic(files.tables, best_trials_table(res), storage_options)
    if "md" in formats:
        files.markdown = storage.join(out_dir, "report.md")
        paper = (main_table(res, judged, options.prompt_set) + fidelity_table(res)
                 + benchmark_table(res, options.benchmarks))
        text = render_markdown(res, chosen, title=options.title,
                               multi_objective=options.multi_objective,
                               plot_names=names, paper_sections=paper)
        storage.write_bytes_atomic(files.markdown, text.encode("utf-8"), storage_options)
    return files


def best_trials_table(res: Results) -> pa.Table:
    """One row per cell: its best trial's full row (every column carried through)."""
    rows = [best for cell in res.sorted_cells() if (best := res.best_trial(cell)) is not None]
    return pa.Table.from_pylist(rows, schema=res.schema)
