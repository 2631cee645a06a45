"""``python -m clo_ray.sweep SPEC``: the whole method, each stage over storage, resumable.

    spec -> corpus -> translate (cached) -> pairs (cached) -> tune (per trial: reference
    log-probs once per data set, cached; train; evaluate) -> report

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

import argparse
import logging
import sys
from typing import Any

import yaml

from clo_ray import storage
from clo_ray.errors import CloRayError, SpecError
from clo_ray.spec import SweepSpec, check_corpus_size, spec_hash

STAGES = ("translate", "pairs", "tune", "report")
SPEC_FILE, RESULTS_FILE = "spec.yaml", "results.parquet"
logger = logging.getLogger(__name__)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m clo_ray.sweep",
        description="Run a CLO sweep described by a YAML spec (see sweeps/*.yaml).")
    parser.add_argument("spec", help="the sweep spec, e.g. sweeps/smoke.yaml")
    parser.add_argument("--plan", action="store_true",
                        help="validate the spec and print grid cells, trials, data and an "
                             "estimated GPU-hour cost; starts nothing")
    parser.add_argument("--only", choices=STAGES, metavar="STAGE",
                        help=f"run one stage only ({', '.join(STAGES)})")
    return parser


def claim_run(spec: SweepSpec) -> None:
    """Record the spec in the run folder, or refuse a different spec under the same name."""
    options = spec.run.storage_options or None
    uri = storage.join(spec.run.uri, SPEC_FILE)
    data = spec.model_dump(mode="json", by_alias=True)
    if storage.exists(uri, options):
        with storage.open_input(uri, options) as fh:
            previous = yaml.safe_load(fh.read())
        if previous.get("spec_hash") != spec_hash(spec):
            raise SpecError(
                f"run {spec.run.name!r} at {spec.run.uri} was started with a different spec "
                f"(hash {previous.get('spec_hash')}, this one {spec_hash(spec)}): give this "
                "sweep a new run.name, or delete that folder to start over")
        return
    text = yaml.safe_dump({"spec_hash": spec_hash(spec), "spec": data}, sort_keys=False)
    storage.write_bytes_atomic(uri, text.encode(), options)


def run_sweep(spec: SweepSpec, *, only: str | None = None) -> Any:
    """Run the sweep (or one stage); returns Tune's ResultGrid when the tune stage ran."""
    import ray

    from clo_ray.data.corpus import load_corpus
    from clo_ray.data.translate import translate_corpus
    from clo_ray.report import build_report, load_results
    from clo_ray.train.trainer import prepare_pairs, ray_runtime_env
    from clo_ray.tune import build_tuner, results_table

    claim_run(spec)
    options = spec.run.storage_options or None
    corpus = load_corpus(spec.corpus.path, spec.corpus.format,
                         source_language=spec.corpus.source_language,
                         max_rows=spec.corpus.max_rows, storage_options=options)
    check_corpus_size(spec, len(corpus), spec.corpus.path)  # before anything expensive
    if not ray.is_initialized():
        # a cluster when RAY_ADDRESS is set (ray job submit), else local
        ray.init(runtime_env=ray_runtime_env())
    if only in (None, "translate"):
        translate_corpus(spec, corpus=corpus)
    if only in (None, "pairs"):
        for language in spec.languages:
            for budget in spec.budgets:
                prepare_pairs(spec, [language], budget)
    grid = None
    results_uri = storage.join(spec.run.uri, RESULTS_FILE)
    if only in (None, "tune"):
        grid = build_tuner(spec).fit()
        storage.write_parquet_atomic(results_uri, results_table(grid, spec), options)
    if only in (None, "report"):
        files = build_report(load_results(results_uri, options), spec.run.uri,
                             metrics=spec.report.metrics or None, mode=spec.search.mode,
                             rank_by=spec.search.metric,
                             plots=spec.report.plots, title=spec.run.name,
                             multi_objective=spec.search.multi_objective,
                             formats=tuple(spec.report.formats), storage_options=options)
        print(f"report: {files.markdown}")
    return grid


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code (2 for an invalid spec or input)."""
    args = _parser().parse_args(argv)
    from clo_ray.plan import build_plan, format_plan
    from clo_ray.spec import load_spec

    try:
        spec = load_spec(args.spec)
        if args.plan:
            print(format_plan(build_plan(spec)))
            return 0
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s",
                            datefmt="%H:%M:%S")
        run_sweep(spec, only=args.only)
    except CloRayError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"results: {storage.join(spec.run.uri, RESULTS_FILE)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
