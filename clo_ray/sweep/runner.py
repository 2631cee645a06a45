"""The sweep: the whole method, each stage over storage, resumable.

    spec -> corpus -> translate (cached) -> pairs (cached) -> tune (per trial: reference
    log-probs once per data set, cached; train; evaluate) -> judge (LLM-judge win rates
    against the cell's SFT trial, when enabled) -> report

Launch on a Ray cluster with ``ray job submit --working-dir . -- python -m clo_ray.sweep
sweeps/paper.yaml``, or locally with ``python -m clo_ray.sweep sweeps/smoke.yaml``; relative
paths in the spec are relative to the working directory. Re-running the same command after a
crash resumes: translations, pairs and reference log-probs come from the caches, and the Tune
experiment is restored so finished trials are not re-run. A *changed* spec under an existing
run name is refused (Ray would silently mix it into the old experiment). ``--plan`` validates
and prints the plan; ``--only STAGE`` runs one stage (reference log-probs and evaluation run
inside the trials, so they are part of ``tune``).
"""

from __future__ import annotations

import logging
from typing import Any

from clo_ray import storage
from clo_ray.errors import SpecError
from clo_ray.layout import RunLayout
from clo_ray.spec.schema import SweepSpec, check_corpus_size, spec_hash

STAGES = ("translate", "pairs", "tune", "judge", "report")
logger = logging.getLogger(__name__)


def claim_run(spec: SweepSpec) -> None:
    """Record the spec in the run folder, or refuse a different spec under the same name."""
    layout = RunLayout.of(spec)
    record = layout.read_spec_record()
    if record is None:
        layout.write_spec_record(spec_hash(spec), spec.model_dump(mode="json", by_alias=True))
        return
    if record[0] != spec_hash(spec):
        raise SpecError(
            f"run {spec.run.name!r} at {layout.uri} was started with a different spec "
            f"(hash {record[0]}, this one {spec_hash(spec)}): give this "
            "sweep a new run.name, or delete that folder to start over")


def run_sweep(spec: SweepSpec, *, only: str | None = None) -> Any:
    """Run the sweep (or one stage); returns Tune's ResultGrid when the tune stage ran.

    The driver loads the corpus once; the translate stage's tables feed the pairs stage, whose
    locations every trial is handed (a trial never loads the corpus).
    """
    import ray

    from clo_ray.data.corpus import load_corpus
    from clo_ray.data.pairs import prepare_sweep_pairs
    from clo_ray.ray_env import driver_runtime_env, start_ray
    from clo_ray.report.build import ReportOptions, build_report
    from clo_ray.report.schema import load_results, results_table
    from clo_ray.translate.stage import load_translations, translate_corpus
    from clo_ray.tune.tuner import build_tuner

    claim_run(spec)
    layout = RunLayout.of(spec)
    corpus = load_corpus(spec.corpus.path, spec.corpus.format,
                         source_language=spec.corpus.source_language,
                         max_rows=spec.corpus.max_rows, storage_options=layout.options)
    check_corpus_size(spec, len(corpus), spec.corpus.path)  # before anything expensive
    if only in (None, "translate", "pairs", "tune") and not ray.is_initialized():
        start_ray(driver_runtime_env())
    if only == "translate":
        translate_corpus(spec, corpus=corpus)
    pairs = None
    if only in (None, "pairs", "tune"):  # translate (cached) -> pairs (cached)
        pairs = prepare_sweep_pairs(spec, load_translations(spec, corpus=corpus))
        logger.info("pairs: %d data set(s) under %s", len(pairs), layout.pairs)
    grid = None
    if only in (None, "tune"):
        grid = build_tuner(spec, pairs=pairs).fit()
        storage.write_parquet_atomic(layout.results, results_table(grid, spec), layout.options)
    if only in (None, "judge"):  # after tune: a trial's SFT opponent may finish after it
        from clo_ray.eval.judge_stage import run_judge_stage

        run_judge_stage(spec)
    if only in (None, "report"):
        files = build_report(load_results(layout.results, layout.options), layout.uri,
                             ReportOptions.of(spec), layout.options)
        print(f"report: {files.markdown}")
    return grid
