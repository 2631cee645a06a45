"""Evaluations added to finished trials: the prompt sets and benchmarks a grown spec adds.

When a run grows by a prompt set or a benchmark (:mod:`clo_ray.sweep.growth`), its finished
trials never measured it. Training them again would spend their compute to learn nothing
new, so each finished trial's checkpoint is evaluated on what it lacks, and only that, in a
Ray task like the trial's own evaluation (:func:`~clo_ray.eval.trial_eval.evaluation_task`),
and the metrics join its row; the cell's base model answers in the same task (cached once per
cell). Answers land where a trial's own evaluation keeps them (the trial's and the base
model's evaluation folders), so the judge stage finds them like any others. lm-eval results
go to an ``added/`` folder beside the trial's own, whose cache names the benchmarks it ran:
sharing the folder would make the two evaluations overwrite each other's cache.

Each task records what it measured in ``added.json`` (fingerprinted by what was asked) in
the trial's evaluation folder, so a re-run of the sweep starts no task for it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from clo_ray import checked, storage
from clo_ray.errors import CloRayError
from clo_ray.layout import RunLayout
from clo_ray.report.schema import PROMPT_SET_PREFIX, extra_metric_names, results_schema
from clo_ray.spec.grid import Cell, model_reference
from clo_ray.spec.schema import SweepSpec

logger = logging.getLogger(__name__)

ADDED_FILE = "added.json"


class AddedEvaluationError(CloRayError):
    """A finished trial cannot be evaluated on what the grown spec adds."""


@dataclass(frozen=True)
class Missing:
    """What a finished trial's row lacks of the spec's evaluation."""

    prompt_sets: tuple[str, ...]
    benchmarks: tuple[str, ...]

    def __bool__(self) -> bool:
        return bool(self.prompt_sets or self.benchmarks)


def missing_evaluations(row: Mapping[str, Any], spec: SweepSpec) -> Missing:
    """The prompt sets and benchmarks of ``spec`` that a completed trial's row has no value
    for (nothing for base rows, failed or stopped trials: they are not evaluated)."""
    if row["method"] == "base" or row["status"] != "completed" or not row.get("checkpoint"):
        return Missing((), ())
    evaluation = spec.evaluation
    sets = tuple(s.name for s in evaluation.prompt_sets
                 if row.get(f"{PROMPT_SET_PREFIX}{s.name}.target_fidelity") is None)
    benchmarks = tuple(b for b in evaluation.benchmarks if row.get(f"benchmark.{b}") is None)
    return Missing(sets, benchmarks)


def add_missing_evaluations(spec: SweepSpec, table: pa.Table,
                            prompt_sets: Mapping[str, Mapping[str, str]] | None) -> pa.Table:
    """``table`` (results rows) with every finished trial's missing evaluations measured
    (module docstring) and the base rows completed from the same tasks."""
    rows = table.to_pylist()
    todo = [(row, gap) for row in rows if (gap := missing_evaluations(row, spec))]
    if not todo:
        return table
    import ray

    from clo_ray.eval.trial_eval import evaluation_task

    logger.info("evaluating %d finished trial(s) on what the grown spec adds", len(todo))
    task = evaluation_task(spec, evaluate_missing)
    found = ray.get([task.remote(spec, model_reference(spec, Cell(
        row["model"], row["language"], row["method"], row["budget"])), row["language"],
        row["checkpoint"], gap, prompt_sets=prompt_sets) for row, gap in todo])
    bases = {(r["model"], r["language"]): r for r in rows if r["method"] == "base"}
    for (row, _), metrics in zip(todo, found, strict=True):
        row.update({k: v for k, v in metrics.items() if not k.startswith("base_")})
        base = bases.get((row["model"], row["language"]))
        if base is not None:
            base.update({k.removeprefix("base_"): v for k, v in metrics.items()
                         if k.startswith("base_")})
    extra = extra_metric_names({name for row in rows for name in row})
    return pa.Table.from_pylist(rows, schema=results_schema(extra))


def evaluate_missing(spec: SweepSpec, model: str, language: str, checkpoint: str,
                     missing: Missing, *,
                     prompt_sets: Mapping[str, Mapping[str, str]] | None) -> dict[str, float]:
    """Measure ``missing`` on one finished trial's checkpoint and on its base model
    (``model``: its reference, e.g. ``builtin:tiny-llama``); returns
    the trial's metrics and the base model's as ``base_<name>`` (as a trial reports them)."""
    from clo_ray.eval.evaluate import linked_base, scalar_metrics
    from clo_ray.eval.lm_eval import run_benchmarks
    from clo_ray.eval.set_answers import answer_prompt_sets
    from clo_ray.models.resolve import resolve_model
    from clo_ray.train.checkpoint import export_model

    options = spec.run.storage_options or None
    layout = RunLayout.of(spec)
    trial_uri = layout.trial_eval(checkpoint)
    record = storage.join(trial_uri, ADDED_FILE)
    evaluation = spec.evaluation.model_copy(update={
        "prompt_sets": [s for s in spec.evaluation.prompt_sets if s.name in missing.prompt_sets],
        "benchmarks": list(missing.benchmarks)})
    key = _fingerprint(evaluation.model_dump(mode="json"), prompt_sets, checkpoint)
    done = checked.read_fingerprinted(record, key, options)
    if done is not None:
        return dict(done)
    base_uri = linked_base(trial_uri, options)
    if base_uri is None:
        raise AddedEvaluationError(
            f"trial checkpoint {checkpoint}: its evaluation folder {trial_uri} does not name "
            "its base model's evaluation; the trial was evaluated by an older clo-ray: give "
            "the grown sweep a new run.name")
    if missing.prompt_sets and not prompt_sets:
        raise AddedEvaluationError("the grown spec adds prompt sets but none were prepared")
    base_dir, template = resolve_model(model), spec.train.prompt_template
    trained: dict[str, float] = {}
    base: dict[str, float] = {}
    with _checkpoint(checkpoint, spec).as_directory() as directory, \
            tempfile.TemporaryDirectory(prefix="clo-export-") as exported:
        export_model(directory, exported)
        for model_dir, uri, model_key, out in ((exported, trial_uri, checkpoint, trained),
                                               (base_dir, base_uri, model, base)):
            if missing.prompt_sets:
                out.update(answer_prompt_sets(model_dir, evaluation, prompt_sets or {},
                                              language, template, eval_uri=uri,
                                              model_key=model_key, storage_options=options,
                                              batch_size=evaluation.batch_size))
            if missing.benchmarks:
                out.update(run_benchmarks(model_dir, evaluation, language,
                                          cache_uri=storage.join(uri, "added"),
                                          model_key=model_key, storage_options=options))
    metrics = scalar_metrics(trained)
    metrics.update({f"base_{k}": v for k, v in scalar_metrics(base).items()
                    if k.startswith(("benchmark.", PROMPT_SET_PREFIX))})
    checked.write_fingerprinted(record, key, metrics, options)
    return metrics


def _checkpoint(path: str, spec: SweepSpec) -> Any:
    """The Ray Train checkpoint at ``path`` in the run's storage filesystem (what
    results.parquet records: Ray's ``Checkpoint.path``, without a scheme)."""
    import ray.train

    filesystem, _ = storage.resolve(spec.run.storage, spec.run.storage_options or None)
    return ray.train.Checkpoint(path, filesystem=filesystem)


def _fingerprint(evaluation: Mapping[str, Any], prompt_sets: Any, checkpoint: str) -> str:
    payload = {"evaluation": evaluation, "prompt_sets": prompt_sets, "checkpoint": checkpoint}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()
