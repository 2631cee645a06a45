"""A model's answers to the sweep's prompt sets: what the judge compares, kept in storage.

Each trial (and each cell's base model, once) answers every prompt set of the spec in its
target language and, unless the set says otherwise, in English, with the set's generation
settings (greedy, or sampled with a seed). Per set, under the evaluation's folder::

    sets/<name>/answers.parquet   id, dataset, instruction_en, instruction, answer_target,
                                  answer_english (null when the set has english: false)
    sets/<name>/metrics.json      fingerprinted: language fidelity of both sides, settings

The judge stage (:mod:`clo_ray.eval.judge_stage`) reads the answers of a trial and of its
opponents from there; a re-run whose fingerprint matches generates nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pyarrow as pa

from clo_ray import checked, storage
from clo_ray.eval.fidelity import language_fidelity
from clo_ray.eval.generate import Sampling, load_generator
from clo_ray.eval.prompt_sets import read_prompts
from clo_ray.report.schema import PROMPT_SET_PREFIX
from clo_ray.spec.evaluation import EvaluationSection, PromptSetSpec
from clo_ray.storage import StorageOptions

logger = logging.getLogger(__name__)

SETS_FORMAT = 1  # bump when answers change meaning: old caches then miss
ANSWERS_FILE, METRICS_FILE = "answers.parquet", "metrics.json"
PREFIX = PROMPT_SET_PREFIX  # metric names: prompts.<set>.target_fidelity, ...


def set_folder(eval_uri: str, name: str) -> str:
    """Where an evaluation keeps its answers to prompt set ``name``."""
    return storage.join(eval_uri, "sets", name)


def answer_prompt_sets(model_dir: str | Path, evaluation: EvaluationSection,
                       tables: Mapping[str, Mapping[str, str]], language: str, template: str,
                       *, eval_uri: str, model_key: str, storage_options: StorageOptions = None,
                       batch_size: int = 8) -> dict[str, float]:
    """Answer every prompt set (``tables``: set name -> language -> prepared table URI) and
    return their fidelity metrics (``prompts.<set>.target_fidelity`` /
    ``.english_retention``) and prompt counts (``.n_target`` / ``.n_english``: the report's
    intervals need them). The model loads once, and only if some set is not cached."""
    metrics: dict[str, float] = {}
    generator: Any = None
    try:
        for section in evaluation.prompt_sets:
            target = read_prompts(tables[section.name][language], storage_options)
            english = read_prompts(tables[section.name]["en"], storage_options) \
                if section.english else None
            folder = set_folder(eval_uri, section.name)
            fingerprint = _fingerprint(model_key, section, evaluation, template, target,
                                       english)
            found = checked.read_fingerprinted(storage.join(folder, METRICS_FILE), fingerprint,
                                               storage_options)
            if found is None:
                if generator is None:
                    generator = load_generator(model_dir, max_new_tokens=evaluation.max_new_tokens,
                                               template=template, backend=evaluation.backend,
                                               batch_size=batch_size)
                found = _answer(generator, section, evaluation, language, target, english,
                                folder, fingerprint, storage_options)
            metrics.update({f"{PREFIX}{section.name}.{k}": float(v) for k, v in found.items()
                            if isinstance(v, float) or k in ("n_target", "n_english")})
    finally:
        if generator is not None:
            generator.close()
    return metrics


def load_set_answers(eval_uri: str, name: str,
                     storage_options: StorageOptions = None) -> pa.Table | None:
    """An evaluation's answers to prompt set ``name``, or None when it has none (yet)."""
    folder = set_folder(eval_uri, name)
    if not storage.exists(storage.join(folder, METRICS_FILE), storage_options):
        return None
    return checked.read_parquet(storage.join(folder, ANSWERS_FILE), storage_options,
                                fix="re-run the sweep to answer the prompt set again")


def _answer(generator: Any, section: PromptSetSpec, evaluation: EvaluationSection,
            language: str, target: pa.Table, english: pa.Table | None, folder: str,
            fingerprint: str, storage_options: StorageOptions) -> dict[str, Any]:
    started = time.perf_counter()
    settings = section.generation
    generator.sampling = None if settings.greedy else Sampling(
        settings.temperature, settings.top_p, settings.seed)
    generator.max_new_tokens = settings.max_new_tokens or evaluation.max_new_tokens
    prompts = target.column("instruction").to_pylist()
    english_prompts = english.column("instruction").to_pylist() if english is not None else []
    answers = generator(prompts + english_prompts)
    target_answers, english_answers = answers[:len(prompts)], answers[len(prompts):]
    threshold = evaluation.langid_threshold
    result: dict[str, Any] = {
        "target_fidelity": language_fidelity(target_answers, language,
                                             threshold=threshold).rate,
        "n_target": len(prompts), "n_english": len(english_prompts),
        "generation": settings.model_dump(mode="json"),
        "max_new_tokens": generator.max_new_tokens}
    if english is not None:
        result["english_retention"] = language_fidelity(english_answers, "en",
                                                        threshold=threshold).rate
    by_id = dict(zip(english.column("id").to_pylist(), english_answers, strict=True)) \
        if english is not None else {}
    table = pa.table({"id": target.column("id"), "dataset": target.column("dataset"),
                      "instruction_en": target.column("instruction_en"),
                      "instruction": target.column("instruction"),
                      "answer_target": pa.array(target_answers, pa.string()),
                      "answer_english": pa.array([by_id.get(i) for i in
                                                  target.column("id").to_pylist()],
                                                 pa.string())})
    checked.write_parquet(storage.join(folder, ANSWERS_FILE), table, storage_options)
    checked.write_fingerprinted(storage.join(folder, METRICS_FILE), fingerprint, result,
                                storage_options)
    logger.info("prompt set %s: %d + %d answers in %.1f s (%s)", section.name, len(prompts),
                len(english_prompts), time.perf_counter() - started,
                "greedy" if settings.greedy else f"temperature {settings.temperature}")
    return result


def _fingerprint(model_key: str, section: PromptSetSpec, evaluation: EvaluationSection,
                 template: str, target: pa.Table, english: pa.Table | None) -> str:
    payload = {"format": SETS_FORMAT, "model": model_key, "set": section.model_dump(mode="json"),
               "max_new_tokens": evaluation.max_new_tokens, "backend": evaluation.backend,
               "langid_threshold": evaluation.langid_threshold, "template": template,
               "target": target.to_pydict(),
               "english": english.to_pydict() if english is not None else None}
    text = json.dumps(payload, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
