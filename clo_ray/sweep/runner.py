"""The sweep: the whole method, each stage over storage, resumable.

    spec -> corpus -> translate (cached) -> pairs (cached) -> tune (per trial: reference
    log-probs once per data set, cached; train; evaluate) -> judge (LLM-judge win rates
    against the cell's SFT trial, when enabled) -> report

Launch on a Ray cluster with ``ray job submit --working-dir . -- python -m clo_ray.sweep
sweeps/paper.yaml``, or locally with ``python -m clo_ray.sweep sweeps/smoke.yaml``; relative
paths in the spec are relative to the working directory. Re-running the same command after a
crash resumes: translations, pairs and reference log-probs come from the caches, and the Tune
experiment is restored so finished trials are not re-run. A spec that only adds grid (budgets,
languages, models, methods, trials, repeats) under an existing run name grows the run
(:mod:`clo_ray.sweep.growth`: only the new work runs); any other change is refused.
``--plan`` validates and prints the plan; ``--only STAGE`` runs one stage (reference log-probs
and evaluation run inside the trials, so they are part of ``tune``).
"""

from __future__ import annotations

import logging
from typing import Any

from clo_ray import checked
from clo_ray.errors import CloRayError
from clo_ray.layout import RunLayout
from clo_ray.spec.schema import SweepSpec, check_corpus_kind, check_corpus_size
from clo_ray.sweep.console import driver_log, logging_to, quiet_libraries
from clo_ray.sweep.growth import claim_run
from clo_ray.sweep.lease import Lease
from clo_ray.sweep.outcome import TuneOutcome
from clo_ray.sweep.preflight import check_capacity, check_models, cluster_shapes

STAGES = ("translate", "pairs", "tune", "judge", "report")
logger = logging.getLogger(__name__)


class TrialsFailed(CloRayError):
    """Some trials of a finished sweep raised; results and report include them as failed."""

    def __init__(self, outcome: TuneOutcome, grid: Any) -> None:
        super().__init__(outcome.summary())
        self.outcome, self.grid = outcome, grid


def run_sweep(spec: SweepSpec, *, only: str | None = None, address: str | None = None,
              allow_failed_trials: bool = False, label: str | None = None,
              placement_timeout_s: float | None = None, verbose: bool = True,
              takeover: bool = False) -> Any:
    """Run the sweep (or one stage); returns Tune's ResultGrid when the tune stage ran.

    Before anything is written or started: every model reference resolves, the corpus loads
    and fits the budgets; only then is the run folder claimed (a failed start leaves the run
    name free), Ray joined or started (``address``, else RAY_ADDRESS, else a local Ray) and
    one trial checked against what the cluster can ever hold. The driver loads the corpus
    once; the translate stage's tables feed the pairs stage, whose locations every trial is
    handed (a trial never loads the corpus).

    Raises SweepInterrupted when the tune stage ended before all trials (nothing is reported:
    re-run to resume), and TrialsFailed after the report when a trial raised, unless
    ``allow_failed_trials``. ``placement_timeout_s``: how long a trial's workers may wait
    for resources before that trial fails (it does not hang). ``verbose=False``: the quiet
    console of :mod:`clo_ray.sweep.console` (``python -m clo_ray.sweep`` without
    ``--verbose``); the driver's log is written to the run's ``logs/sweep.log`` either way.
    A second driver on a run another one drives raises :class:`~clo_ray.sweep.lease.RunBusy`
    before it claims anything; ``takeover``: take the run's lease even if it looks alive.
    """
    import ray

    from clo_ray.data.corpus import load_corpus
    from clo_ray.data.pairs import prepare_sweep_pairs
    from clo_ray.eval.prompt_sets import load_sweep_prompt_sets, prepare_prompt_sets
    from clo_ray.ray_env import driver_runtime_env, start_ray
    from clo_ray.report.build import ReportOptions, build_report
    from clo_ray.report.schema import load_results
    from clo_ray.sweep.tune_stage import run_tune_stage
    from clo_ray.translate.stage import load_translations, translate_corpus

    check_models(spec, label or spec.run.name)
    layout = RunLayout.of(spec)
    corpus = load_corpus(spec.corpus.path, spec.corpus.format,
                         source_language=spec.corpus.source_language,
                         max_rows=spec.corpus.max_rows, storage_options=layout.options)
    check_corpus_size(spec, len(corpus), spec.corpus.path)  # before anything expensive
    check_corpus_kind(spec, corpus.preferences, spec.corpus.path)
    prompt_sets = load_sweep_prompt_sets(spec)  # checked before anything expensive too
    # one driver per run (clo_ray.sweep.lease), taken before the run is claimed
    with Lease(layout, takeover=takeover), logging_to(driver_log(layout)) as log_file:
        generations = claim_run(spec)  # this spec, or the run's specs so far plus this one
        print(f"log: {log_file} (everything the driver logs)", flush=True)
        if only in (None, "translate", "pairs", "tune") and not ray.is_initialized():
            if not verbose:
                quiet_libraries()  # before ray.init: its own INFO lines go to the log file
            print(start_ray(driver_runtime_env(), address, log_to_driver=verbose), flush=True)
        if only in (None, "tune"):
            check_capacity(spec, *cluster_shapes())
        if only == "translate":
            translate_corpus(spec, corpus=corpus)
        pairs = None
        if only in (None, "pairs", "tune"):  # translate (cached) -> pairs (cached)
            pairs = prepare_sweep_pairs(spec, load_translations(spec, corpus=corpus))
            logger.info("pairs: %d data set(s) under %s", len(pairs), layout.pairs)
        grid, outcome = None, None
        if only in (None, "tune"):  # every generation's trials, then each cell's repeats
            stage = run_tune_stage(generations, pairs=pairs or {},
                                   prompt_sets=prepare_prompt_sets(spec, prompt_sets),
                                   placement_timeout_s=placement_timeout_s,
                                   quiet=not verbose)
            grid, outcome = stage.grid, stage.outcome
            checked.write_parquet(layout.results, stage.table, layout.options)
        if only in (None, "judge"):  # after tune: a trial's SFT opponent may finish after it
            from clo_ray.eval.judge_stage import run_judge_stage

            run_judge_stage(spec)
        if only in (None, "report"):
            files = build_report(load_results(layout.results, layout.options), layout.uri,
                                 ReportOptions.of(spec), layout.options,
                                 judgements=layout.read_judgements())
            if files.summary:
                print(f"\n{files.summary}\n", flush=True)
            print(f"report: {files.markdown}")
        if outcome is not None and outcome.failed and not allow_failed_trials:
            raise TrialsFailed(outcome, grid)
        return grid
