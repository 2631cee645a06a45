"""What the judge stage leaves for readers: judgements.parquet and alpaca_eval's own files.

``<run>/judgements.parquet``: one row per comparison (trial x opponent x prompt set x side),
with alpaca_eval's metric names and units (percent): ``win_rate``, ``standard_error``,
``n_wins``, ``n_wins_base``, ``n_draws``, ``n_total``, ``discrete_win_rate``,
``length_controlled_winrate``, ``lc_standard_error``, plus our 95% intervals (``ci_low`` /
``ci_high`` for the win rate, ``lc_low`` / ``lc_high`` bootstrap for LC) and the items the
judge could not rate (``failed_items``: calls that failed after retries; ``unparseable_items``),
JSON lists of prompt ids, never silently dropped.

``<run>/alpaca_eval/<prompt set>/<side>/<trial>/model_outputs.json`` and, per opponent,
``.../<trial>/vs-<opponent>/reference_outputs.json`` plus ``annotations.json`` (our judge's
preference per item, alpaca_eval's annotation layout): JSON lists of
``{"instruction", "output", "generator", "dataset"}``, so
``alpaca_eval --model_outputs .../model_outputs.json --reference_outputs
.../vs-sft/reference_outputs.json`` re-judges any comparison with another annotator.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from clo_ray import checked, storage
from clo_ray.eval.judge import JudgeResult
from clo_ray.eval.winrate import WinRate
from clo_ray.layout import safe_name
from clo_ray.storage import StorageOptions

JUDGEMENTS_SCHEMA = pa.schema(
    [("run", pa.string()), ("trial_id", pa.string()), ("model", pa.string()),
     ("language", pa.string()), ("method", pa.string()), ("budget", pa.int64()),
     ("opponent", pa.string()), ("opponent_trial", pa.string()), ("prompt_set", pa.string()),
     ("side", pa.string()), ("judge", pa.string()), ("n_items", pa.int64()),
     ("failed", pa.int64()), ("unparseable", pa.int64())]
    + [(name, pa.float64()) for name in ("win_rate", "standard_error", "ci_low", "ci_high")]
    + [(name, pa.int64()) for name in ("n_wins", "n_wins_base", "n_draws", "n_total")]
    + [(name, pa.float64()) for name in ("discrete_win_rate", "length_controlled_winrate",
                                         "lc_standard_error", "lc_low", "lc_high")]
    + [("failed_items", pa.string()), ("unparseable_items", pa.string())])


@dataclass(frozen=True)
class Side:
    """One side of one prompt set as two models answered it (ids in the same order)."""

    prompt_set: str
    side: str  # "target" or "english"
    ids: list[str]
    instructions: list[str]
    datasets: list[str]
    mine: list[str]
    theirs: list[str]


def judgement_row(trial: dict[str, Any], opponent: str, opponent_trial: str, judge: str,
                  side: Side, result: JudgeResult, stats: WinRate | None) -> dict[str, Any]:
    """One judgements.parquet row (stats None: nothing could be judged)."""
    named = {o: json.dumps([side.ids[i] for i, x in enumerate(result.outcomes) if x == o])
             for o in ("failed", "unparseable")}
    row: dict[str, Any] = {
        "run": trial["run"], "trial_id": trial["trial_id"], "model": trial["model"],
        "language": trial["language"], "method": trial["method"], "budget": trial["budget"],
        "opponent": opponent, "opponent_trial": opponent_trial, "prompt_set": side.prompt_set,
        "side": side.side, "judge": judge, "n_items": result.n, "failed": result.failed,
        "unparseable": result.unparseable, "failed_items": named["failed"],
        "unparseable_items": named["unparseable"]}
    if stats is not None:
        row.update(win_rate=stats.win_rate, standard_error=stats.standard_error,
                   ci_low=stats.ci95[0], ci_high=stats.ci95[1], n_wins=stats.n_wins,
                   n_wins_base=stats.n_wins_base, n_draws=stats.n_draws, n_total=stats.n_total,
                   discrete_win_rate=stats.discrete_win_rate,
                   length_controlled_winrate=stats.length_controlled_winrate,
                   lc_standard_error=stats.lc_standard_error,
                   lc_low=stats.lc_ci95[0] if stats.lc_ci95 else None,
                   lc_high=stats.lc_ci95[1] if stats.lc_ci95 else None)
    return row


def judgements_table(rows: Sequence[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist([{k: r.get(k) for k in JUDGEMENTS_SCHEMA.names} for r in rows],
                                schema=JUDGEMENTS_SCHEMA)


def outputs(side: Side, answers: Sequence[str], generator: str) -> list[dict[str, str]]:
    """alpaca_eval's outputs file: ``instruction``, ``output``, ``generator``, ``dataset``."""
    return [{"instruction": q, "output": a, "generator": generator, "dataset": d}
            for q, a, d in zip(side.instructions, answers, side.datasets, strict=True)]


def export_comparison(run_uri: str, side: Side, trial_id: str, opponent: str,
                      opponent_label: str, judge: str, result: JudgeResult,
                      options: StorageOptions = None) -> str:
    """Write the comparison's alpaca_eval files; returns its ``vs-<opponent>`` folder."""
    folder = storage.join(run_uri, "alpaca_eval", safe_name(side.prompt_set), side.side,
                          safe_name(trial_id))
    mine = outputs(side, side.mine, trial_id)
    theirs = outputs(side, side.theirs, opponent_label)
    checked.write_json(storage.join(folder, "model_outputs.json"), mine, options)
    versus = storage.join(folder, f"vs-{opponent}")
    checked.write_json(storage.join(versus, "reference_outputs.json"), theirs, options)
    preference = {"win": 2.0, "loss": 1.0, "tie": 1.5}
    annotations = [{"instruction": m["instruction"], "output_1": t["output"],
                    "output_2": m["output"], "generator_1": opponent_label,
                    "generator_2": trial_id, "dataset": m["dataset"], "annotator": judge,
                    "preference": preference.get(outcome)}
                   for m, t, outcome in zip(mine, theirs, result.outcomes, strict=True)]
    checked.write_json(storage.join(versus, "annotations.json"), annotations, options)
    return versus
