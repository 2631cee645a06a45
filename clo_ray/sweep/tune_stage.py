"""The tune stage over a run's generations: search trials, then repeats, then one table.

A run that never grew has one generation: its Tune experiment, then its repeats. A grown run
(:mod:`clo_ray.sweep.growth`) restores each earlier generation's experiments in order (a
finished one runs nothing; an interrupted one finishes first), and only then builds the
newest generation's, which runs the trials the earlier ones lack. The results table is the
union: one row per trial of every generation, one ``base`` row per (model, language). A
generation that adds prompt sets or benchmarks has the earlier generations' finished trials
measure them (:mod:`clo_ray.eval.added`) before the table is written.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from clo_ray.data.pairs import PreparedPairs
from clo_ray.eval.added import add_missing_evaluations
from clo_ray.layout import RunLayout
from clo_ray.report.schema import results_table
from clo_ray.spec.grid import grid_cells
from clo_ray.spec.schema import SweepSpec
from clo_ray.sweep.console import start_console
from clo_ray.sweep.console_callback import ConsoleCallback
from clo_ray.sweep.growth import finished_by_cell
from clo_ray.sweep.outcome import SweepInterrupted, TuneOutcome, tune_outcome
from clo_ray.tune.repeats import build_repeat_tuner, repeat_configs, repeats_exist
from clo_ray.tune.searcher import searcher_metrics
from clo_ray.tune.tuner import generation_tuner

logger = logging.getLogger(__name__)


@dataclass
class TuneStageResult:
    table: pa.Table  # results.parquet's rows, every generation's
    outcome: TuneOutcome  # all experiments' trials together
    grid: Any  # the last ResultGrid that ran (a failed experiment's, if any failed)


def run_tune_stage(generations: list[SweepSpec], *, pairs: Mapping[str, PreparedPairs],
                   prompt_sets: Mapping[str, Mapping[str, str]] | None,
                   placement_timeout_s: float | None = None,
                   quiet: bool = False) -> TuneStageResult:
    """Every generation's search experiment, then every generation's repeats (module doc).

    ``quiet``: Tune prints nothing; the sweep's console (:mod:`clo_ray.sweep.console`) prints
    a line per training step and per finished trial instead.

    Raises SweepInterrupted when an experiment ended before its trials did (nothing is
    reported: re-run to resume).
    """
    spec = generations[-1]
    layout = RunLayout.of(spec)
    options: dict[str, Any] = {"pairs": pairs, "prompt_sets": prompt_sets,
                               "placement_timeout_s": placement_timeout_s}
    total = len(grid_cells(spec)) * (spec.search.trials_per_cell + spec.search.repeats - 1)
    console = start_console(total) if quiet else None
    if console is not None:
        options |= {"callbacks": [ConsoleCallback()], "verbose": 0}
    logger.info("tune: %d trials over %d generation(s), under %s", total, len(generations),
                layout.uri)
    tables: list[pa.Table] = []
    rows: list[dict[str, Any]] = []
    outcomes: list[TuneOutcome] = []
    grid = failed_grid = None
    for index, generation in enumerate(generations):
        metrics, _ = searcher_metrics(generation)
        tuner, planned = generation_tuner(generation, generation=index,
                                          done=finished_by_cell(rows, metrics), **options)
        if tuner is None:
            continue
        if console is not None:
            console.experiment(_trials(rows))
        grid = tuner.fit()
        outcome = tune_outcome(grid, planned)
        if outcome.interrupted:  # a partial experiment is not a result: no table, no report
            raise SweepInterrupted(
                f"{outcome.summary()} under {layout.generation_folder('tune', index)}")
        table = results_table(grid, spec)
        tables.append(table)
        rows += table.to_pylist()
        outcomes.append(outcome)
        failed_grid = failed_grid or (grid if outcome.failed else None)
    repeated_cells = set()
    for index, generation in enumerate(generations):
        restored = repeats_exist(generation, index)
        configs = [] if restored else [
            c for c in repeat_configs(generation, rows)
            if _repeat_key(c["cell"], c["repeat"]) not in repeated_cells]
        tuner = build_repeat_tuner(generation, configs, generation=index, **options)
        if tuner is None:
            continue
        if console is not None:
            console.experiment(_trials(rows))
        repeats = tuner.fit()
        # a restored grid search holds all its trials from the start
        outcome = tune_outcome(repeats, len(list(repeats)) if restored else len(configs))
        if outcome.interrupted:
            raise SweepInterrupted(f"repeats: {outcome.summary()} under "
                                   f"{layout.generation_folder('repeats', index)}")
        more = results_table(repeats, spec)
        more = more.filter(pc.not_equal(more["method"], "base"))
        repeated_cells |= {_repeat_key(row, row["repeat"]) for row in more.to_pylist()}
        tables.append(more)
        rows += more.to_pylist()
        outcomes.append(outcome)
        grid = repeats
        failed_grid = failed_grid or (repeats if outcome.failed else None)
    # a grown evaluation: finished trials measure the added prompt sets and benchmarks
    table = add_missing_evaluations(spec, _union(tables), prompt_sets)
    outcome = TuneOutcome(planned=sum(o.planned for o in outcomes),
                          finished=sum(o.finished for o in outcomes),
                          failed=[f for o in outcomes for f in o.failed])
    logger.info("tune: done (%d trial(s) finished, %d failed, in %d experiment(s))",
                outcome.finished, len(outcome.failed), len(outcomes))
    return TuneStageResult(table, outcome, failed_grid or grid)


def _trials(rows: list[dict[str, Any]]) -> int:
    return sum(row["method"] != "base" for row in rows)


def _repeat_key(cell: Mapping[str, Any], repeat: int) -> tuple[Any, ...]:
    return (cell["model"], cell["language"], cell["method"], cell["budget"], int(repeat))


def _union(tables: list[pa.Table]) -> pa.Table:
    """The generations' tables as one: each base row once (every generation that trains a
    (model, language) measures its base model the same way)."""
    if not tables:
        raise SweepInterrupted("the tune stage ran no experiment: re-run the sweep")
    table = pa.concat_tables(tables, promote_options="default")
    seen, keep = set(), []
    for i, (method, trial_id) in enumerate(zip(table.column("method").to_pylist(),
                                               table.column("trial_id").to_pylist(),
                                               strict=True)):
        if method == "base" and trial_id in seen:
            continue
        seen.add(trial_id)
        keep.append(i)
    return table.take(keep) if len(keep) < table.num_rows else table
