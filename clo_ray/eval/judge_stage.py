"""The judge stage: LLM-judge win rates of every trial against its cell's opponent, after tune.

The paper's headline metric is a pairwise win rate against the SFT model of the same cell.
Trials run concurrently, so when a CLO trial is evaluated the SFT trial of its (model,
language, budget) may not have finished, and a judge loaded inside every trial would hold
one more model per trial. So the sweep judges here, once, between tune and report:

1. read results.parquet; with ``judge.opponent: sft`` the opponent of every *completed*
   trial of another method is the best completed SFT trial of the same (model, language,
   budget), "best" by ``search.metric`` in ``search.mode`` (the first SFT trial, with a
   warning, when none has that metric); with ``judge.opponent: base`` every completed trial
   is judged against the untrained model's answers;
2. both sides' answers come from storage: each trial's evaluation folder
   (:meth:`clo_ray.layout.RunLayout.trial_eval`, written by the trial) holds them;
3. each pair is judged on the target-language and on the English prompts, both answer orders
   (:func:`clo_ray.eval.judge.judge_pairwise`: ties and unparseable verdicts counted apart);
   the verdict counts and the judge's raw replies are cached under
   ``<storage>/cache/judge/<sha256>.json``, keyed by the judge (model, max_new_tokens,
   prompt) and every prompt and answer, so a re-run (or another sweep with the same
   answers) judges nothing twice; the judge model loads only when something is not cached;
4. ``judge_win_rate`` / ``english_judge_win_rate`` plus tie and unparseable counts are
   written into results.parquet atomically, and ``objective`` is recomputed where its
   weights name a judge metric (a trial cannot compute it: Optuna never sees judge metrics).

Trials without an opponent (an SFT-less cell, missing answers) keep null judge metrics and
are listed in the returned summary. The judge runs in this process, on whatever the sweep's
driver has (vLLM on a GPU, else transformers).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa

from clo_ray import checked, storage
from clo_ray.errors import CloRayError
from clo_ray.eval.evaluate import linked_base, load_answers, objective_or_none
from clo_ray.eval.judge import JUDGE_PROMPT, JudgeGenerate, JudgeResult, judge_pairwise
from clo_ray.layout import RunLayout
from clo_ray.spec.schema import SweepSpec

logger = logging.getLogger(__name__)

JUDGE_FORMAT = 1  # bump when verdicts change meaning: old caches then miss
SFT, BASE = "sft", "base"
# Prompt set -> (answer column in answers.parquet, prompt column, metric prefix).
SIDES = {"target": ("answer_target", "prompt", "judge"),
         "english": ("answer_english", "prompt_en", "english_judge")}


class JudgeStageError(CloRayError, ValueError):
    """Two evaluations that cannot be compared (other prompts), or results without answers."""


@dataclass
class JudgeSummary:
    """What one run of the stage did: pairs (trial_id -> opponent trial_id or "base"),
    how many were judged now or read from the cache, and trials left unjudged (why)."""

    pairs: dict[str, str] = field(default_factory=dict)
    judged: int = 0
    cached: int = 0
    skipped: dict[str, str] = field(default_factory=dict)


def run_judge_stage(spec: SweepSpec, *, results_uri: str | None = None,
                    judge: JudgeGenerate | None = None) -> JudgeSummary | None:
    """Judge every completed trial of ``results_uri`` (default the run's results.parquet)
    against its opponent and write the win rates back; None when the judge is off.

    ``judge``: a ready judge callable (prompts -> replies); default :func:`make_judge` from
    ``evaluation.judge``, loaded only if some pair is not cached, and closed at the end.
    """
    from clo_ray.report.schema import load_results, validate_results

    section = spec.evaluation.judge
    if not section.enabled:
        logger.info("judge stage: evaluation.judge is off, nothing to judge")
        return None
    options = spec.run.storage_options or None
    results_uri = results_uri or RunLayout.of(spec).results
    loaded = load_results(results_uri, options)
    rows = loaded.to_pylist()
    for row in rows:  # every judge value below comes from this run (judged or cached)
        _set_metrics(row, None)
    summary = JudgeSummary()
    judges = _LazyJudge(spec, judge)
    try:
        for row, opponent in _pairs(rows, spec, summary):
            found = _judge_pair(spec, row, opponent, judges, summary)
            if found is not None:
                _set_metrics(row, found)
    finally:
        judges.close()
    weights = spec.evaluation.objective.weights
    if any(name.endswith("judge_win_rate") for name in weights):
        for row in rows:  # a skipped trial's objective is unmeasured (None) now too
            if row["trial_id"] in summary.pairs or row["trial_id"] in summary.skipped:
                row["objective"] = objective_or_none(row, weights)
    schema = _schema(loaded.schema, rows)
    table = validate_results(pa.Table.from_pylist(rows, schema=schema), results_uri)
    checked.write_parquet(results_uri, table, options)
    logger.info("judge stage: %d pairs, %d judged now, %d from the cache, %d trials skipped",
                len(summary.pairs), summary.judged, summary.cached, len(summary.skipped))
    return summary


# ------------------------------------------------------------------------------ pairing


def _pairs(rows: list[dict[str, Any]], spec: SweepSpec,
           summary: JudgeSummary) -> list[tuple[dict[str, Any], dict[str, Any] | str]]:
    """(trial row, opponent row or the base evaluation's URI) for every trial to judge."""
    opponent_kind = spec.evaluation.judge.opponent
    done = [r for r in rows if r["status"] == "completed" and r["method"] != BASE]
    pairs: list[tuple[dict[str, Any], dict[str, Any] | str]] = []
    for row in done:
        if not row.get("checkpoint"):
            summary.skipped[row["trial_id"]] = "no checkpoint recorded"
            continue
        if opponent_kind == BASE:
            base = linked_base(_eval_uri(spec, row), spec.run.storage_options or None)
            if base is None:
                summary.skipped[row["trial_id"]] = "no base evaluation linked to the trial"
            else:
                pairs.append((row, base))
            continue
        if row["method"] == SFT:
            continue  # the opponent itself
        best = _best_sft(done, row, spec)
        if best is None:
            summary.skipped[row["trial_id"]] = (f"no completed SFT trial in its cell "
                                                f"({row['model']}, {row['language']}, "
                                                f"{row['budget']})")
        else:
            pairs.append((row, best))
    return pairs


def _best_sft(done: list[dict[str, Any]], row: Mapping[str, Any],
              spec: SweepSpec) -> dict[str, Any] | None:
    cell = [r for r in done if r["method"] == SFT and r.get("checkpoint")
            and (r["model"], r["language"], r["budget"]) == (row["model"], row["language"],
                                                             row["budget"])]
    metric, mode = spec.search.metric, spec.search.mode
    ranked = [r for r in cell if isinstance(r.get(metric), (int, float))]
    if not ranked:
        if cell:
            logger.warning("judge stage: no SFT trial of (%s, %s, %s) has %r: judging "
                           "against the first one, %s", row["model"], row["language"],
                           row["budget"], metric, cell[0]["trial_id"])
        return cell[0] if cell else None
    pick = max if mode == "max" else min
    return pick(ranked, key=lambda r: float(r[metric]))  # ties: the first in the table


def _eval_uri(spec: SweepSpec, row: Mapping[str, Any]) -> str:
    return RunLayout.of(spec).trial_eval(str(row["checkpoint"]))


# ------------------------------------------------------------------------------ judging


class _LazyJudge:
    """The judge model, loaded on first use (a fully cached re-run loads nothing)."""

    def __init__(self, spec: SweepSpec, judge: JudgeGenerate | None) -> None:
        self.section, self.given = spec.evaluation.judge, judge
        self.own: Any = None  # a transformers or vLLM generator, once loaded

    def __call__(self, prompts: list[str]) -> list[str]:
        if self.given is not None:
            return self.given(prompts)
        if self.own is None:
            from clo_ray.eval.judge import make_judge
            from clo_ray.models.resolve import resolve_model

            self.own = make_judge(resolve_model(self.section.model or ""),
                                  self.section.backend, self.section.max_new_tokens)
        return self.own(prompts)

    def close(self) -> None:
        if self.own is not None:
            self.own.close()
            self.own = None


def _judge_pair(spec: SweepSpec, row: Mapping[str, Any], opponent: Mapping[str, Any] | str,
                judge: Callable[[list[str]], list[str]],
                summary: JudgeSummary) -> dict[str, JudgeResult] | None:
    """Both sides' verdicts for one trial: from the cache, else judged and cached."""
    options = spec.run.storage_options or None
    mine = load_answers(_eval_uri(spec, row), options)
    theirs_uri = opponent if isinstance(opponent, str) else _eval_uri(spec, opponent)
    theirs = load_answers(theirs_uri, options)
    label = opponent if isinstance(opponent, str) else opponent["trial_id"]
    if mine is None or theirs is None:
        missing = "its" if mine is None else f"the opponent's ({label})"
        summary.skipped[row["trial_id"]] = f"{missing} answers are not in storage"
        return None
    if mine.column("id").to_pylist() != theirs.column("id").to_pylist():
        raise JudgeStageError(
            f"trial {row['trial_id']} and its opponent {label} answered other held-out "
            "prompts (their ids differ): both must be evaluated on the same held-out set "
            "with the same evaluation.max_prompts")
    summary.pairs[row["trial_id"]] = BASE if isinstance(opponent, str) else str(label)
    section = spec.evaluation.judge
    key = _cache_key(section.model or "", section.max_new_tokens, mine, theirs)
    cache = RunLayout.of(spec).judge_verdict(key)
    if storage.exists(cache, options):
        try:
            hit = checked.read_json(cache, options)
            summary.cached += 1
            return {side: JudgeResult(**hit[side]["result"]) for side in SIDES}
        except (checked.CorruptFileError, KeyError, TypeError):
            checked.set_aside(cache, options)  # judged again below
    record: dict[str, Any] = {"judge": section.model, "trial": row["trial_id"],
                              "opponent": label}
    results: dict[str, JudgeResult] = {}
    for side, (answer_col, prompt_col, _) in SIDES.items():
        replies: list[str] = []

        def recorded(prompts: list[str], replies: list[str] = replies) -> list[str]:
            out = judge(prompts)
            replies.extend(out)
            return out

        results[side] = judge_pairwise(recorded, mine.column(prompt_col).to_pylist(),
                                       mine.column(answer_col).to_pylist(),
                                       theirs.column(answer_col).to_pylist())
        record[side] = {"result": asdict(results[side]), "replies": replies}
    checked.write_json(cache, record, options)
    summary.judged += 1
    return results


def _cache_key(judge_model: str, max_new_tokens: int, mine: pa.Table, theirs: pa.Table) -> str:
    """sha256 of the judge and everything it reads (the answers' origin does not matter: the
    same answers judged by the same judge give the same verdicts)."""
    payload = {"format": JUDGE_FORMAT, "judge": judge_model, "max_new_tokens": max_new_tokens,
               "prompt": JUDGE_PROMPT,
               "prompts": [mine.column(c).to_pylist() for c in ("prompt", "prompt_en")],
               "answers": {side: [mine.column(col).to_pylist(), theirs.column(col).to_pylist()]
                           for side, (col, _, _) in SIDES.items()}}
    text = json.dumps(payload, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# ------------------------------------------------------------------------------ results


def _set_metrics(row: dict[str, Any], found: Mapping[str, JudgeResult] | None) -> None:
    """The win rate and counts of each prompt set (None: clear them)."""
    for side, (_, _, prefix) in SIDES.items():
        result = found[side] if found is not None else None
        row[f"{prefix}_win_rate"] = result.win_rate if result else None
        for count in ("ties", "unparseable", "n"):
            row[f"{prefix}_{count}"] = getattr(result, count) if result else None


def _schema(schema: pa.Schema, rows: list[dict[str, Any]]) -> pa.Schema:
    """The table's schema plus the columns this stage added (counts int64, rates float64)."""
    fields = list(schema)
    names = set(schema.names)
    for row in rows:
        for name, value in row.items():
            if name not in names:
                names.add(name)
                kind = pa.int64() if isinstance(value, int) or name.endswith(
                    ("_ties", "_unparseable", "_n")) else pa.float64()
                fields.append(pa.field(name, kind))
    return pa.schema(fields)
