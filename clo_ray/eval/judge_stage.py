"""The judge stage: LLM-judge win rates of every trial against its opponents, after tune.

The paper's headline metric is a pairwise win rate against the SFT model of the same cell,
with its standard error; its data-size curves judge every budget against SFT at the largest
budget. Trials run concurrently, so when a CLO trial is evaluated its opponents may not have
finished, and a judge loaded inside every trial would hold one more model per trial. So the
sweep judges here, once, between tune and report:

1. read results.parquet; for every completed trial and every ``judge.opponents`` entry find
   the opponent: ``sft`` the best completed SFT trial of the same (model, language, budget),
   ``sft_largest`` the best SFT trial of the same (model, language) at the largest budget,
   "best" by ``search.metric`` in ``search.mode`` (the first, with a warning, when none has
   it); ``base`` the untrained model's evaluation linked to the trial. A repeat (another
   seed, ``search.repeats``) meets SFT's repeat of the same index. A trial is never its own
   opponent;
2. both sides' answers come from storage (each evaluation's folder): the held-out pairs'
   (``heldout``) and every judged prompt set's (:mod:`clo_ray.eval.set_answers`), target
   language and English;
3. each (trial, opponent, prompt set, side) is judged in both answer orders
   (:func:`clo_ray.eval.judge.judge_pairwise`); the verdicts are cached under
   ``<storage>/cache/judge/<sha256>.json``, keyed by the judge and everything it reads, so
   a re-run (or another sweep with the same answers) judges nothing twice; a comparison
   whose judge calls failed is not cached (a re-run asks again), and its failed prompts are
   counted and named;
4. statistics as alpaca_eval defines them (:mod:`clo_ray.eval.winrate`: win rate, standard
   error, counts, length-controlled rate) go to ``judgements.parquet``, and alpaca_eval's
   files to ``alpaca_eval/`` (:mod:`clo_ray.eval.judge_export`);
5. the headline (first opponent, first judged prompt set) lands in results.parquet as
   fractions: ``judge_win_rate``, ``judge_win_rate_se``, ``judge_lc_win_rate`` and counts,
   ``english_judge_*`` the same on English prompts; ``objective`` is recomputed where its
   weights name a judge metric (Optuna never sees judge metrics).

The judge runs in this process: a local model (vLLM on a GPU, else transformers) loaded only
when something is not cached, or an OpenAI-compatible endpoint
(:class:`clo_ray.eval.judge_endpoint.EndpointJudge`).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from clo_ray import checked, storage
from clo_ray.errors import CloRayError
from clo_ray.eval.evaluate import linked_base, load_answers, objective_or_none
from clo_ray.eval.judge import JUDGE_PROMPT, JudgeGenerate, JudgeResult, judge_pairwise
from clo_ray.eval.judge_export import (
    Side,
    export_comparison,
    judgement_row,
    judgements_table,
)
from clo_ray.eval.judge_serving import LazyJudge
from clo_ray.eval.set_answers import load_set_answers
from clo_ray.eval.winrate import head_to_head
from clo_ray.layout import JUDGEMENTS_FILE, RunLayout
from clo_ray.spec.schema import SweepSpec

logger = logging.getLogger(__name__)

JUDGE_FORMAT = 2  # bump when verdicts change meaning: old caches then miss
SFT, BASE, HELDOUT = "sft", "base", "heldout"
SIDES = {"target": "judge", "english": "english_judge"}  # side -> results.parquet prefix
COUNTS = ("ties", "unparseable", "failed", "n")


class JudgeStageError(CloRayError, ValueError):
    """Two evaluations that cannot be compared (other prompts), or results without answers."""


@dataclass
class JudgeSummary:
    """What one run of the stage did: the headline opponent of each trial (trial_id ->
    opponent trial_id or "base"), comparisons (trial, opponent, prompt set, side) judged now
    or read from the cache, prompts whose judge calls failed, trials left unjudged (why)."""

    pairs: dict[str, str] = field(default_factory=dict)
    judged: int = 0
    cached: int = 0
    failed: int = 0
    skipped: dict[str, str] = field(default_factory=dict)
    judgements: str | None = None


def run_judge_stage(spec: SweepSpec, *, results_uri: str | None = None,
                    judge: JudgeGenerate | None = None) -> JudgeSummary | None:
    """Judge every completed trial of ``results_uri`` (default the run's results.parquet)
    against its opponents and write the statistics back; None when the judge is off.

    ``judge``: a ready judge callable (prompts -> replies); default from
    ``evaluation.judge``, loaded only if some comparison is not cached, closed at the end.
    """
    from clo_ray.report.schema import load_results, validate_results

    section = spec.evaluation.judge
    if not section.enabled:
        logger.info("judge stage: evaluation.judge is off, nothing to judge")
        return None
    options = spec.run.storage_options or None
    layout = RunLayout.of(spec)
    results_uri = results_uri or layout.results
    loaded = load_results(results_uri, options)
    rows = loaded.to_pylist()
    for row in rows:  # every judge value below comes from this run (judged or cached)
        _set_metrics(row, None)
    summary, judgements = JudgeSummary(), []
    judges = LazyJudge(spec, judge)
    logger.info("judge stage: %d trial(s) against %s on %s, judge %s", sum(
        r["method"] != "base" for r in rows), ", ".join(section.opponents),
        ", ".join(spec.evaluation.judged_sets()),
        "endpoint" if section.backend == "endpoint" else section.model)
    try:
        for row, kind, opponent in _comparisons(rows, spec, summary):
            headline = kind == section.opponents[0]
            for set_index, prompt_set in enumerate(spec.evaluation.judged_sets()):
                sides = _sides(spec, row, opponent, prompt_set, summary)
                for side in sides:
                    result, stats, label = _judge_side(spec, row, kind, opponent, side, judges,
                                                       summary)
                    judgements.append(judgement_row(row, kind, label, judges.identity, side,
                                                    result, stats))
                    if headline and set_index == 0:
                        _set_metrics(row, {side.side: (result, stats)}, keep=True)
    finally:
        judges.close()
    weights = spec.evaluation.objective.weights
    if any("judge" in name for name in weights):
        for row in rows:  # a skipped trial's objective is unmeasured (None) now too
            if row["trial_id"] in summary.pairs or row["trial_id"] in summary.skipped:
                row["objective"] = objective_or_none(row, weights)
    summary.judgements = storage.join(results_uri.rsplit("/", 1)[0], JUDGEMENTS_FILE)
    checked.write_parquet(summary.judgements, judgements_table(judgements), options)
    table = validate_results(pa.Table.from_pylist(rows, schema=_schema(loaded.schema, rows)),
                             results_uri)
    checked.write_parquet(results_uri, table, options)
    logger.info("judge stage: %d comparisons judged now, %d from the cache, %d prompts whose "
                "judge calls failed, %d trials skipped (%s)", summary.judged, summary.cached,
                summary.failed, len(summary.skipped), summary.judgements)
    return summary


# ------------------------------------------------------------------------------ pairing


Opponent = dict[str, Any] | str  # an SFT trial's results row, or the base evaluation's URI


def _comparisons(rows: list[dict[str, Any]], spec: SweepSpec,
                 summary: JudgeSummary) -> list[tuple[dict[str, Any], str, Opponent]]:
    """(trial row, opponent kind, opponent) for every comparison to judge."""
    done = [r for r in rows if r["status"] == "completed" and r["method"] != BASE]
    largest = max(spec.budgets)
    out: list[tuple[dict[str, Any], str, Opponent]] = []
    for row in done:
        if not row.get("checkpoint"):
            summary.skipped[row["trial_id"]] = "no checkpoint recorded"
            continue
        for kind in spec.evaluation.judge.opponents:
            opponent: Opponent | None
            if kind == BASE:
                opponent = linked_base(_eval_uri(spec, row), spec.run.storage_options or None)
                reason = "no base evaluation linked to the trial"
            elif kind == SFT and row["method"] == SFT:
                continue  # SFT against SFT of its own cell says nothing
            else:
                budget = row["budget"] if kind == SFT else largest
                opponent = _paired_sft(done, row, budget) or _best_sft(done, row, budget, spec)
                reason = (f"no completed SFT trial in ({row['model']}, {row['language']}, "
                          f"budget {budget})")
                if opponent is not None and opponent["trial_id"] == row["trial_id"]:
                    continue  # the opponent itself
            if opponent is None:
                if kind == spec.evaluation.judge.opponents[0]:
                    summary.skipped[row["trial_id"]] = reason
                continue
            if kind == spec.evaluation.judge.opponents[0]:
                summary.pairs[row["trial_id"]] = BASE if isinstance(opponent, str) \
                    else str(opponent["trial_id"])
            out.append((row, kind, opponent))
    return out


def _paired_sft(done: list[dict[str, Any]], row: Mapping[str, Any],
                budget: int) -> dict[str, Any] | None:
    """A repeat's opponent: SFT's repeat with the same index (paired seeds), if it ran."""
    if not row.get("repeat"):
        return None
    return next((r for r in done if r["method"] == SFT and r.get("checkpoint")
                 and r.get("repeat") == row["repeat"]
                 and (r["model"], r["language"], r["budget"]) == (row["model"],
                                                                  row["language"], budget)),
                None)


def _best_sft(done: list[dict[str, Any]], row: Mapping[str, Any], budget: int,
              spec: SweepSpec) -> dict[str, Any] | None:
    """The best SFT search trial (repeat 0) of (model, language, budget)."""
    cell = [r for r in done if r["method"] == SFT and r.get("checkpoint") and not r.get("repeat")
            and (r["model"], r["language"], r["budget"]) == (row["model"], row["language"],
                                                             budget)]
    metric, mode = spec.search.metric, spec.search.mode
    ranked = [r for r in cell if isinstance(r.get(metric), (int, float))]
    if not ranked:
        if cell:
            logger.warning("judge stage: no SFT trial of (%s, %s, %s) has %r: judging "
                           "against the first one, %s", row["model"], row["language"],
                           budget, metric, cell[0]["trial_id"])
        return cell[0] if cell else None
    pick = max if mode == "max" else min
    return pick(ranked, key=lambda r: float(r[metric]))  # ties: the first in the table


def _eval_uri(spec: SweepSpec, row: Mapping[str, Any]) -> str:
    return RunLayout.of(spec).trial_eval(str(row["checkpoint"]))


def _sides(spec: SweepSpec, row: Mapping[str, Any], opponent: Opponent, prompt_set: str,
           summary: JudgeSummary) -> list[Side]:
    """Both sides' answers to one prompt set, aligned by id ([] when either is missing)."""
    options = spec.run.storage_options or None
    theirs_uri = opponent if isinstance(opponent, str) else _eval_uri(spec, opponent)
    mine, theirs = (_answers(uri, prompt_set, options) for uri in (_eval_uri(spec, row),
                                                                   theirs_uri))
    label = opponent if isinstance(opponent, str) else opponent["trial_id"]
    if mine is None or theirs is None:
        missing = "its" if mine is None else f"the opponent's ({label})"
        summary.skipped.setdefault(row["trial_id"], f"{missing} answers to {prompt_set} are "
                                   "not in storage")
        return []
    if mine["id"] != theirs["id"]:
        raise JudgeStageError(
            f"trial {row['trial_id']} and its opponent {label} answered other prompts of "
            f"{prompt_set} (their ids differ): both must be evaluated on the same prompts "
            "with the same evaluation settings")
    out = []
    for side, column, prompts in (("target", "answer_target", "instruction"),
                                  ("english", "answer_english", "instruction_en")):
        keep = [i for i, a in enumerate(mine[column]) if a is not None]
        if keep:
            out.append(Side(prompt_set, side, [mine["id"][i] for i in keep],
                            [mine[prompts][i] for i in keep], [mine["dataset"][i] for i in keep],
                            [mine[column][i] for i in keep], [theirs[column][i] or ""
                                                              for i in keep]))
    return out


def _answers(eval_uri: str, prompt_set: str, options: Any) -> dict[str, list[Any]] | None:
    """An evaluation's answers as columns: id, instruction, instruction_en, dataset,
    answer_target, answer_english (the held-out pairs' answers renamed to match)."""
    if prompt_set == HELDOUT:
        table = load_answers(eval_uri, options)
        if table is None:
            return None
        data = table.to_pydict()
        return {"id": data["id"], "instruction": data["prompt"],
                "instruction_en": data["prompt_en"], "dataset": [HELDOUT] * len(data["id"]),
                "answer_target": data["answer_target"],
                "answer_english": data["answer_english"]}
    found = load_set_answers(eval_uri, prompt_set, options)
    return None if found is None else found.to_pydict()


# ------------------------------------------------------------------------------ judging


def _judge_side(spec: SweepSpec, row: Mapping[str, Any], kind: str, opponent: Opponent,
                side: Side, judge: LazyJudge, summary: JudgeSummary) -> tuple[Any, Any, str]:
    """(JudgeResult, WinRate or None, opponent label) of one comparison: cached or judged,
    then its alpaca_eval files written."""
    options = spec.run.storage_options or None
    layout = RunLayout.of(spec)
    label = f"base:{row['model']}" if isinstance(opponent, str) else str(opponent["trial_id"])
    key = _cache_key(judge.identity, spec.evaluation.judge.max_new_tokens, side)
    cache = layout.judge_verdict(key)
    result = _cached(cache, options)
    if result is not None:
        summary.cached += 1
    else:
        replies: list[str | None] = []

        def recorded(prompts: list[str]) -> list[str | None]:
            out = judge(prompts)
            replies.extend(out)
            return out

        result = judge_pairwise(recorded, side.instructions, side.mine, side.theirs)
        summary.judged += 1
        summary.failed += result.failed
        if result.failed:
            failed = [side.ids[i] for i, o in enumerate(result.outcomes) if o == "failed"]
            logger.warning("judge stage: %s vs %s on %s/%s: %d prompts whose judge calls "
                           "failed (not cached; a re-run asks again): %s", row["trial_id"],
                           label, side.prompt_set, side.side, len(failed), failed)
        else:
            checked.write_json(cache, {"judge": judge.identity, "trial": row["trial_id"],
                                       "opponent": label, "prompt_set": side.prompt_set,
                                       "side": side.side, "result": _as_json(result),
                                       "replies": replies}, options)
    prefs = result.preferences()
    items = result.judged_items()
    stats = head_to_head(prefs, [len(side.mine[i]) for i in items],
                         [len(side.theirs[i]) for i in items],
                         bootstrap=spec.evaluation.judge.bootstrap,
                         seed=spec.run.seed) if prefs else None
    export_comparison(layout.uri, side, str(row["trial_id"]), kind, label, judge.identity,
                      result, options)
    return result, stats, label


def _cached(uri: str, options: Any) -> JudgeResult | None:
    if not storage.exists(uri, options):
        return None
    try:
        found = checked.read_json(uri, options)["result"]
        return JudgeResult(**{**found, "outcomes": tuple(found["outcomes"])})
    except (checked.CorruptFileError, KeyError, TypeError):
        checked.set_aside(uri, options)  # judged again
        return None


def _as_json(result: JudgeResult) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in vars(result).items()}


def _cache_key(judge: str, max_new_tokens: int, side: Side) -> str:
    """sha256 of the judge and everything it reads (the answers' origin does not matter:
    the same answers judged by the same judge give the same verdicts)."""
    payload = {"format": JUDGE_FORMAT, "judge": judge, "max_new_tokens": max_new_tokens,
               "prompt": JUDGE_PROMPT, "instructions": side.instructions,
               "answers": [side.mine, side.theirs]}
    text = json.dumps(payload, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# ------------------------------------------------------------------------------ results


def _set_metrics(row: dict[str, Any], found: Mapping[str, tuple[JudgeResult, Any]] | None,
                 *, keep: bool = False) -> None:
    """The headline win rate (fraction), its SE, LC and counts per side (None: clear)."""
    for side, prefix in SIDES.items():
        if keep and (found is None or side not in found):
            continue
        result, stats = found[side] if found is not None and side in found else (None, None)
        row[f"{prefix}_win_rate"] = stats.win_rate / 100 if stats else None
        row[f"{prefix}_win_rate_se"] = stats.standard_error / 100 if stats else None
        lc = stats.length_controlled_winrate if stats else None
        row[f"{prefix}_lc_win_rate"] = lc / 100 if lc is not None else None
        for count in COUNTS:
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
                    tuple(f"_{c}" for c in COUNTS)) else pa.float64()
                fields.append(pa.field(name, kind))
    return pa.schema(fields)
