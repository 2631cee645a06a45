"""results.parquet: the contract between the sweep and the report, and its reader and writer.

The contract with the sweep: ``results.parquet``, one row per trial (:data:`RESULTS_SCHEMA`).

- cell: ``run``, ``trial_id``, ``model`` (the model label), ``language`` (the target; a
  multi-target trial joins its languages with "+", e.g. ``sw+yo``, and gets its own column),
  ``method`` (``clo``, ``sft``, ``sft_dpo``, ...), ``budget`` (training pairs);
- ``status``: ``completed`` | ``stopped`` (early-stopped by ASHA: not evaluated, its metrics
  null, its ``train_seconds`` the time until it was stopped) | ``failed``;
- ``params``: JSON of the trial's sampled hyper-parameters (``{"lr": 1e-4, "schedule": "clo"}``);
- ``checkpoint`` (URI or null), ``train_seconds``, ``train_tokens``: what the trial cost;
- ``repeat``: 0 for the search's trials; r > 0 for the r-th re-training of the cell's best
  trial with another seed (``search.repeats``, :mod:`clo_ray.tune.repeats`);
- metrics, float, null when not measured: ``objective`` and :data:`METRIC_COLUMNS`; shares and
  win rates are fractions in [0, 1] (shown as percentages); so is any ``lm_eval.<task>``
  column (the task's accuracy). Any other column is carried into ``best_trials.parquet`` and
  may be named as a metric.
- a base-model row per (model, language) may appear with method ``base`` and budget 0: the
  untrained model's scores, the reference line in plots and the "0 (base)" budget column.

Only the columns in :data:`REQUIRED_COLUMNS` must exist; a missing metric column is shown as
n/a with a note, because an evaluation that was switched off (the judge) is not an error.

How a value is chosen: in each cell (model x language x method x budget) the *best trial* is
the completed or stopped trial with the best ``rank_by`` value (``objective`` by default, in
the search's ``mode``), and every table shows that one trial's metrics, so the numbers of one
cell always describe one model (as the paper's tables do) and match "best config per cell".
Where no trial of a cell has a ``rank_by`` value, each metric falls back to its own best
(minimum for names ending in ``_nll``, maximum otherwise) and a note says so. Failed trials
are counted, never ranked.

Where the pieces live: this module (the schema, :func:`load_results`, and
:func:`results_table`, which writes Tune's results in it), :mod:`clo_ray.report.results`
(:class:`~clo_ray.report.results.Results`, the selection above, value formats),
:mod:`clo_ray.report.markdown` (report.md), :mod:`clo_ray.report.plots` (the PNGs),
:mod:`clo_ray.report.build` (:func:`~clo_ray.report.build.build_report`) and
``python -m clo_ray.report`` (:mod:`clo_ray.report.__main__`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from clo_ray import checked, storage
from clo_ray.errors import CloRayError
from clo_ray.layout import RESULTS_FILE
from clo_ray.spec.grid import cell_of

if TYPE_CHECKING:
    from clo_ray.spec.schema import SweepSpec

# ------------------------------------------------------------------------------ the contract

METRIC_COLUMNS = ("objective", "target_fidelity", "english_retention", "target_nll",
                  "english_nll", "preference_accuracy", "reward_margin", "judge_win_rate",
                  "english_judge_win_rate")
RESULTS_SCHEMA = pa.schema(
    [("run", pa.string()), ("trial_id", pa.string()), ("model", pa.string()),
     ("language", pa.string()), ("method", pa.string()), ("budget", pa.int64()),
     ("status", pa.string()), ("params", pa.string()), ("checkpoint", pa.string()),
     ("train_seconds", pa.float64()), ("train_tokens", pa.int64()), ("repeat", pa.int64())]
    + [(name, pa.float64()) for name in METRIC_COLUMNS])
# Base-model metrics each trial reports (as base_<name>): the report's untrained reference,
# one ``base`` row per (model, language) in results.parquet.
BASE_METRICS = ("target_fidelity", "english_retention", "target_nll", "english_nll")
# Metrics a trial reports beyond METRIC_COLUMNS that results.parquet keeps, by name prefix:
# lm-eval's (clo_ray.eval.lm_eval: ``lm_eval.<task>``, ``lm_eval.<task>.<metric>``, and
# ``benchmark.<name>[.en]``) and the prompt sets' (``prompts.<set>.target_fidelity``, ...).
PROMPT_SET_PREFIX = "prompts."  # prompts.<set>.target_fidelity, .n_target, ... (eval/set_answers)
EXTRA_METRIC_PREFIXES = ("lm_eval.", "benchmark.", PROMPT_SET_PREFIX)


def extra_metric_names(names: Iterable[str]) -> list[str]:
    """The names among ``names`` that results.parquet carries as extra float columns."""
    return sorted({n for n in names if n.startswith(EXTRA_METRIC_PREFIXES)
                   and n not in RESULTS_SCHEMA.names})


def results_schema(extra: Sequence[str] = ()) -> pa.Schema:
    """:data:`RESULTS_SCHEMA` plus float64 columns ``extra`` (from :func:`extra_metric_names`)."""
    return pa.schema(list(RESULTS_SCHEMA) + [pa.field(n, pa.float64()) for n in extra])


# Without these a row cannot be placed in a table; every other column may be absent.
REQUIRED_COLUMNS = ("run", "trial_id", "model", "language", "method", "budget", "status")
# STATUSES, RANKED_STATUSES, BASE_METHOD and the method/percent tables live in
# clo_ray.report.results (Results needs them).
# Without a spec, shown when present. English judge win rate joins the brief's list because the
# paper reports it beside the target one (29/30 English cells); a spec's report.metrics wins.
DEFAULT_METRICS = ("objective", "target_fidelity", "english_retention", "target_nll",
                   "preference_accuracy", "judge_win_rate", "english_judge_win_rate")


class ResultsError(CloRayError, ValueError):
    """results.parquet does not follow RESULTS_SCHEMA; the message names the file and column."""


def validate_results(table: pa.Table, source: str = RESULTS_FILE) -> pa.Table:
    """``table`` with the schema's columns cast to their types, or a ResultsError.

    Casting here (an int budget stored as float, a null-typed metric column) means later code
    trusts types; the error names ``source`` so a user knows which file to fix.
    """
    missing = [c for c in REQUIRED_COLUMNS if c not in table.column_names]
    if missing:
        raise ResultsError(f"{source}: missing required column(s) {', '.join(map(repr, missing))}"
                           f" (results need {', '.join(REQUIRED_COLUMNS)}; see "
                           "clo_ray.report.schema.RESULTS_SCHEMA)")
    for i, name in enumerate(table.column_names):
        want = RESULTS_SCHEMA.field(name).type if name in RESULTS_SCHEMA.names else None
        if want is None and (name.startswith("lm_eval.") and pa.types.is_null(table[i].type)):
            want = pa.float64()
        if want is None or table[i].type == want:
            continue
        try:
            table = table.set_column(i, name, table[i].cast(want))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as err:
            raise ResultsError(f"{source}: column {name!r} has type {table[i].type}, expected "
                               f"{want} ({err})") from None
    for name in REQUIRED_COLUMNS:
        if table[name].null_count:
            row = table[name].to_pylist().index(None)
            raise ResultsError(f"{source}: column {name!r} is null in row {row} (trial "
                               f"{table['trial_id'][row].as_py()!r}); every trial needs it")
    return table


def load_results(uri: str, storage_options: storage.StorageOptions = None) -> pa.Table:
    """Read and validate a results.parquet (a file URI, or a run directory holding one)."""
    if not uri.endswith(".parquet"):
        uri = storage.join(uri, RESULTS_FILE)
    if not storage.exists(uri, storage_options):
        raise ResultsError(f"no results at {uri}: run the sweep first, or pass the run "
                           f"directory that holds {RESULTS_FILE}")
    table = checked.read_parquet(uri, storage_options, fix=(
        "`python -m clo_ray.sweep SPEC --only tune` writes it again from the Tune experiment "
        "(finished trials are not re-run), then `--only judge` adds the judge columns back"))
    return validate_results(table, uri)


def results_table(grid: Any, spec: SweepSpec) -> pa.Table:
    """Tune's ``ResultGrid`` as results.parquet: one row per trial (:data:`RESULTS_SCHEMA`,
    extra metrics carried), plus one ``base`` row per (model, language)."""
    rows, bases = [], {}
    for result in grid:
        config, metrics = result.config or {}, result.metrics or {}
        config = config.get("job", config)  # a repeat's config (clo_ray.tune.repeats)
        if "cell" not in config:
            continue
        cell = cell_of(config)
        done = bool(metrics.get("trial_done"))
        status = "failed" if result.error else "completed" if done else "stopped"
        row = {"run": spec.run.name, "trial_id": str(metrics.get("trial_id", result.path)),
               "model": cell.model, "language": cell.language, "method": cell.method,
               "budget": cell.budget, "status": status,
               "params": json.dumps(config.get("params", {}), sort_keys=True),
               "checkpoint": metrics.get("checkpoint"),
               # an early-stopped trial's cost: Tune's clock and the tokens up to its last report
               "train_seconds": _float(metrics.get("train_seconds" if done else "time_total_s")),
               "train_tokens": metrics.get("train_tokens" if done else "tokens_total"),
               "repeat": int(config.get("repeat", 0))}
        # Only the final report holds held-out metrics; a stopped (or failed) trial's last
        # report is a training one, whose target_nll etc. are training-batch values that
        # must not be ranked against held-out ones: not measured, so null.
        row.update({m: _float(metrics.get(m)) if done else None for m in METRIC_COLUMNS})
        row.update({m: _float(metrics[m]) for m in extra_metric_names(metrics) if done})
        rows.append(row)
        base = {m: _float(metrics.get(f"base_{m}")) for m in BASE_METRICS}
        base.update({m.removeprefix("base_"): _float(v) for m, v in metrics.items()
                     if m.startswith(("base_benchmark.", f"base_{PROMPT_SET_PREFIX}"))})
        if any(v is not None for v in base.values()):  # the untrained model: budget 0
            bases[(cell.model, cell.language)] = {
                "run": spec.run.name, "trial_id": f"base-{cell.model}-{cell.language}",
                "model": cell.model, "language": cell.language, "method": "base",
                "budget": 0, "status": "completed", "params": "{}", **base}
    extra = extra_metric_names({name for row in [*rows, *bases.values()] for name in row})
    return pa.Table.from_pylist(rows + list(bases.values()), schema=results_schema(extra))


def _float(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) \
        else None
