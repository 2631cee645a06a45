"""Evaluate one model on a cell's held-out pairs: every metric of the spec, cached in storage.

Order, so one model load serves everything and a GPU never holds two models:

1. the first ``evaluation.max_prompts`` held-out pairs: greedy answers to their target-language
   prompts and to their English prompts, in one generation call (vLLM or transformers,
   :mod:`clo_ray.eval.generate`; a vLLM engine is closed before transformers loads);
2. ``target_fidelity`` (target answers in the target language) and ``english_retention``
   (English answers in English), :mod:`clo_ray.eval.fidelity`;
3. held-out NLL / preference accuracy / reward margin on *all* held-out pairs (no generation,
   so cheap), :mod:`clo_ray.eval.heldout`;
4. with the judge enabled and ``opponent_answers`` given: pairwise win rates on both prompt
   sets (:mod:`clo_ray.eval.judge`); the evaluated model is freed before the judge loads;
5. the objective (:mod:`clo_ray.eval.objective`).

The result is a flat dict: every metric (float, or None when not measured: judge metrics
without an opponent), ``objective`` (None when a weighted metric was not measured), plus
non-metric entries :data:`EXTRA_KEYS`: ``answers`` (``{"ids", "target", "english"}``: the
opponent of later trials, e.g. the SFT model's answers), ``heldout_logps`` ([N, 4]: the
base model's serve as every trial's reference) and ``details`` (language-id counts, judge
counts). :func:`scalar_metrics` keeps what ``ray.tune.report`` should see.

With ``cache_uri``: ``answers.parquet`` then ``metrics.json`` are written atomically there
(``metrics.json`` last, so its presence means complete), and a later call whose inputs have
the same fingerprint reads them instead of loading the model: the base model is evaluated
once per cell. A fingerprint mismatch (other model, rows, spec section, reference or
opponent) recomputes and overwrites, with a warning.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from clo_ray import checked, storage
from clo_ray.errors import CloRayError
from clo_ray.eval.fidelity import language_fidelity
from clo_ray.eval.generate import (
    TransformersGenerator,
    load_generator,
    load_model,
    resolve_backend,
)
from clo_ray.eval.heldout import HeldoutScoring, heldout_metrics
from clo_ray.eval.judge import JudgeGenerate, JudgeResult, judge_pairwise, make_judge
from clo_ray.eval.objective import objective
from clo_ray.spec.evaluation import EvaluationSection
from clo_ray.storage import StorageOptions

logger = logging.getLogger(__name__)

EVAL_FORMAT = 1  # bump when metrics change meaning: old caches then miss
EXTRA_KEYS = ("answers", "heldout_logps", "details")
METRICS_FILE, ANSWERS_FILE = "metrics.json", "answers.parquet"
BASE_LINK_FILE = "base.json"  # in a trial's folder: where its base model's evaluation lives


class EvaluationError(CloRayError, ValueError):
    """Held-out rows or opponent answers that do not fit the evaluation asked for."""


@dataclass(frozen=True)
class EvalSettings:
    """How every model of one trial is evaluated: the same language, spec section, prompt
    encoding and reward scale, so a trained model and its base model are comparable.

    ``beta``: the trial's effective beta (its last clo / dpo stage's), the scale of the
    held-out reward margin. ``judge``: a ready judge callable (default: :func:`make_judge`
    from ``evaluation.judge``).
    """

    language: str
    evaluation: EvaluationSection
    template: str
    max_length: int
    beta: float = 0.1
    storage_options: StorageOptions = None
    judge: JudgeGenerate | None = None
    batch_size: int = 8
    micro_batch: int = 4

    @property
    def scoring(self) -> HeldoutScoring:
        """The held-out metrics' part of these settings."""
        return HeldoutScoring(self.template, self.max_length, self.beta, self.micro_batch)


def evaluate_model(model_dir: str | Path, eval_rows: pa.Table, settings: EvalSettings, *,
                   reference_logps: Any = None,
                   opponent_answers: Mapping[str, Sequence[str]] | None = None,
                   cache_uri: str | None = None, model_key: str | None = None
                   ) -> dict[str, Any]:
    """Metrics of the model in ``model_dir`` on ``eval_rows`` (held-out pairs of the settings'
    language, the translate stage's columns); see the module docstring for what comes back.

    ``reference_logps``: the base model's ``heldout_logps`` for these rows (None: the model
    is its own reference, i.e. this is the base-model evaluation). ``opponent_answers``:
    another evaluation's ``answers`` on the same prompts. ``model_key``: what identifies the
    weights in the cache fingerprint (default: ``model_dir``; pass the checkpoint URI when
    the model is exported to a temporary folder).
    """
    language, evaluation, template = settings.language, settings.evaluation, settings.template
    storage_options = settings.storage_options
    _check_rows(eval_rows, language)
    prompts = eval_rows.slice(0, evaluation.max_prompts)
    ids = prompts.column("id").to_pylist()
    if opponent_answers is not None and list(opponent_answers.get("ids", [])) != ids:
        raise EvaluationError("opponent_answers are for other prompts than these held-out rows "
                              "(their 'ids' differ): evaluate the opponent on the same rows "
                              "with the same max_prompts")
    fingerprint = _fingerprint(model_key or str(model_dir), eval_rows, settings,
                               reference_logps, opponent_answers)
    if cache_uri is not None and (hit := _read_cache(cache_uri, fingerprint, storage_options)):
        logger.info("evaluation cache hit: %s", cache_uri)
        return hit

    started = time.perf_counter()
    targets, english = prompts.column("prompt").to_pylist(), prompts.column("prompt_en").to_pylist()
    answers, model, tokenizer = _generate(model_dir, targets + english, evaluation, template,
                                          settings.batch_size)
    target_answers, english_answers = answers[:len(targets)], answers[len(targets):]
    threshold = evaluation.langid_threshold
    target_fid = language_fidelity(target_answers, language, threshold=threshold)
    english_fid = language_fidelity(english_answers, "en", threshold=threshold)
    held = heldout_metrics(model, tokenizer, eval_rows, settings.scoring,
                           reference_logps=reference_logps)
    logps = held.pop("logps")
    del model, tokenizer
    gc.collect()

    result: dict[str, Any] = {"target_fidelity": target_fid.rate,
                              "english_retention": english_fid.rate, **held,
                              "n_prompts": len(ids), "n_heldout": eval_rows.num_rows}
    details: dict[str, Any] = {"target_detected": target_fid.detected,
                               "english_detected": english_fid.detected}
    if evaluation.judge.enabled:
        verdicts = _judge(evaluation, settings.judge, opponent_answers, (targets, target_answers),
                          (english, english_answers))
        result["judge_win_rate"] = verdicts["target"].win_rate if verdicts else None
        result["english_judge_win_rate"] = verdicts["english"].win_rate if verdicts else None
        details["judge"] = {k: asdict(v) for k, v in verdicts.items()}
    result["objective"] = objective_or_none(result, evaluation.objective.weights)
    result.update(answers={"ids": ids, "target": target_answers, "english": english_answers},
                  heldout_logps=logps, details=details)
    logger.info("evaluated %s on %d prompts + %d held-out pairs in %.1f s: target_fidelity "
                "%.2f, english_retention %.2f", model_dir, len(ids), eval_rows.num_rows,
                time.perf_counter() - started, target_fid.rate, english_fid.rate)
    if cache_uri is not None:
        _write_cache(cache_uri, fingerprint, result, prompts, storage_options)
    return result


def scalar_metrics(result: Mapping[str, Any]) -> dict[str, float]:
    """The measured numbers of an :func:`evaluate_model` result (what Tune should report)."""
    return {k: float(v) for k, v in result.items()
            if k not in EXTRA_KEYS and isinstance(v, (int, float)) and not isinstance(v, bool)}



def link_base(trial_uri: str, base_uri: str, storage_options: StorageOptions = None) -> None:
    """Record in a trial's folder where its base model's evaluation is (the judge's opponent
    with ``judge.opponent: base``): the base cache's name depends on the held-out set."""
    storage.write_bytes_atomic(storage.join(trial_uri, BASE_LINK_FILE),
                               json.dumps({"uri": base_uri}).encode("utf-8"), storage_options)


def linked_base(trial_uri: str, storage_options: StorageOptions = None) -> str | None:
    """The base evaluation folder :func:`link_base` recorded, or None."""
    uri = storage.join(trial_uri, BASE_LINK_FILE)
    if not storage.exists(uri, storage_options):
        return None
    with storage.open_input(uri, storage_options) as handle:
        return str(json.loads(handle.read().decode("utf-8"))["uri"])


def load_answers(uri: str, storage_options: StorageOptions = None) -> pa.Table | None:
    """An evaluation's ``answers.parquet`` (id, prompt, prompt_en, answer_target,
    answer_english), or None when that evaluation is not complete (no metrics.json)."""
    if not storage.exists(storage.join(uri, METRICS_FILE), storage_options):
        return None
    with storage.open_input(storage.join(uri, ANSWERS_FILE), storage_options) as handle:
        return pq.read_table(handle)


# ------------------------------------------------------------------------------ steps


def _check_rows(rows: pa.Table, language: str) -> None:
    missing = {"id", "language", "prompt_en", "response_en", "prompt", "response"} - set(
        rows.column_names)
    if missing:
        raise EvaluationError(f"held-out rows lack columns {sorted(missing)} (the translate "
                              f"stage's output has them)")
    if rows.num_rows == 0:
        raise EvaluationError("no held-out rows to evaluate on (evaluation.holdout is 0?)")
    others = set(rows.column("language").to_pylist()) - {language}
    if others:
        raise EvaluationError(f"held-out rows for language {language!r} also hold "
                              f"{sorted(others)}: pass one language's rows at a time")


def _generate(model_dir: str | Path, prompts: list[str], evaluation: EvaluationSection,
              template: str, batch_size: int) -> tuple[list[str], Any, Any]:
    """Answers, then the loaded transformers model and tokenizer for the held-out metrics."""
    if resolve_backend(evaluation.backend) == "vllm":
        generator = load_generator(model_dir, max_new_tokens=evaluation.max_new_tokens,
                                   template=template, backend="vllm")
        try:
            answers = generator(prompts)
        finally:
            generator.close()
        return (answers, *load_model(model_dir))
    model, tokenizer = load_model(model_dir)
    answers = TransformersGenerator(model, tokenizer, max_new_tokens=evaluation.max_new_tokens,
                                    template=template, batch_size=batch_size)(prompts)
    return answers, model, tokenizer


def _judge(evaluation: EvaluationSection, judge: JudgeGenerate | None,
           opponent: Mapping[str, Sequence[str]] | None,
           target: tuple[list[str], list[str]],
           english: tuple[list[str], list[str]]) -> dict[str, JudgeResult]:
    """Both win rates, or {} without an opponent (the opponent's own evaluation)."""
    if opponent is None:
        logger.info("judge enabled but no opponent answers here: judge metrics not measured "
                    "(a sweep judges after tuning, clo_ray.eval.judge_stage)")
        return {}
    from clo_ray.models.resolve import resolve_model

    section = evaluation.judge
    own = judge is None
    if judge is None:
        judge = make_judge(resolve_model(section.model or ""), section.backend,
                           section.max_new_tokens, batch_size=evaluation.batch_size)
    try:
        return {"target": judge_pairwise(judge, *target, list(opponent["target"])),
                "english": judge_pairwise(judge, *english, list(opponent["english"]))}
    finally:
        if own:
            judge.close()  # type: ignore[attr-defined]


def objective_or_none(metrics: Mapping[str, Any], weights: Mapping[str, float]) -> float | None:
    """The objective, or None (logged) when a weighted metric was not measured here: e.g.
    judge or lm-eval metrics, which are added to a trial's metrics after this evaluation."""
    unmeasured = [name for name in weights if metrics.get(name) is None
                  or (isinstance(metrics[name], float) and math.isnan(metrics[name]))]
    if unmeasured:
        logger.warning("objective not computed: %s not measured in this evaluation", unmeasured)
        return None
    return objective(metrics, weights)


# ------------------------------------------------------------------------------ cache


def _fingerprint(model_key: str, rows: pa.Table, settings: EvalSettings, reference: Any,
                 opponent: Mapping[str, Sequence[str]] | None) -> str:
    """sha256 of everything the result depends on (a needless miss is cheap, a wrong hit
    is not). Reference log-probs are rounded to 1e-6 so float noise in a reload still hits."""
    if reference is not None and hasattr(reference, "tolist"):
        reference = reference.tolist()
    columns = ("id", "prompt_en", "response_en", "prompt", "response")
    payload = {"format": EVAL_FORMAT, "model": model_key, "language": settings.language,
               "rows": {c: rows.column(c).to_pylist() for c in columns},
               "evaluation": settings.evaluation.model_dump(mode="json"),
               "template": settings.template, "max_length": settings.max_length,
               "beta": settings.beta,
               "reference": None if reference is None
               else [[round(float(v), 6) for v in row] for row in reference],
               "opponent": None if opponent is None else {k: list(v) for k, v in
                                                           sorted(opponent.items())}}
    text = json.dumps(payload, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _write_cache(uri: str, fingerprint: str, result: Mapping[str, Any], prompts: pa.Table,
                 storage_options: StorageOptions) -> None:
    answers = result["answers"]
    table = pa.table({"id": answers["ids"], "prompt": prompts.column("prompt"),
                      "prompt_en": prompts.column("prompt_en"),
                      "answer_target": pa.array(answers["target"], pa.string()),
                      "answer_english": pa.array(answers["english"], pa.string())})
    checked.write_parquet(storage.join(uri, ANSWERS_FILE), table, storage_options)
    checked.write_fingerprinted(storage.join(uri, METRICS_FILE), fingerprint,
                                {k: v for k, v in result.items() if k != "answers"},
                                storage_options)


def _read_cache(uri: str, fingerprint: str,
                storage_options: StorageOptions) -> dict[str, Any] | None:
    result = checked.read_fingerprinted(storage.join(uri, METRICS_FILE), fingerprint,
                                        storage_options)
    if result is None:
        return None
    try:
        table = checked.read_parquet(storage.join(uri, ANSWERS_FILE), storage_options)
    except (checked.CorruptFileError, FileNotFoundError) as bad:
        if isinstance(bad, checked.CorruptFileError):
            checked.set_aside(bad.uri, storage_options)
        return None  # metrics without their answers: evaluate again
    answers = {"ids": table.column("id").to_pylist(),
               "target": table.column("answer_target").to_pylist(),
               "english": table.column("answer_english").to_pylist()}
    return {**result, "answers": answers}
