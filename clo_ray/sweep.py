"""``python -m clo_ray.sweep SPEC``: the whole method, each stage over storage, resumable.

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

import argparse
import logging
import sys
from typing import Any

import yaml

from clo_ray import storage
from clo_ray.errors import CloRayError, SpecError
from clo_ray.spec import SweepSpec, check_corpus_size, spec_hash

STAGES = ("translate", "pairs", "tune", "judge", "report")
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


def start_ray(runtime_env: dict[str, Any]) -> None:
    """Join the cluster Ray would join (RAY_ADDRESS, as ``ray job submit`` sets, or the last
    ``ray start`` on this host), else start a local one that knows its own dashboard.

    Under ``ray job submit`` our env vars are merged into the job's runtime env (its
    working_dir stays). A local Ray gets RAY_API_SERVER_ADDRESS: Ray Train's placement-group
    cleaner frees a stopped trial's worker bundles (every trial ASHA stops) through the state
    API, which without an address guesses, and with several Ray instances on the host picks
    the wrong one or fails: the CPUs stay reserved and later trials wait forever.
    """
    import os
    import socket

    import ray
    from ray._private.utils import read_ray_address

    if os.environ.get("RAY_ADDRESS") or read_ray_address():
        ray.init(runtime_env=runtime_env)
        return
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**runtime_env, "env_vars": {**runtime_env.get("env_vars", {}),
                                       "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}"}}
    ray.init(address="local", dashboard_host="127.0.0.1", dashboard_port=port, runtime_env=env)


def run_sweep(spec: SweepSpec, *, only: str | None = None) -> Any:
    """Run the sweep (or one stage); returns Tune's ResultGrid when the tune stage ran."""
    import ray

    from clo_ray.data.corpus import load_corpus
    from clo_ray.data.translate import translate_corpus
    from clo_ray.report import build_report, load_results
    from clo_ray.train.trainer import driver_runtime_env, prepare_pairs
    from clo_ray.tune import build_tuner, results_table

    claim_run(spec)
    options = spec.run.storage_options or None
    corpus = load_corpus(spec.corpus.path, spec.corpus.format,
                         source_language=spec.corpus.source_language,
                         max_rows=spec.corpus.max_rows, storage_options=options)
    check_corpus_size(spec, len(corpus), spec.corpus.path)  # before anything expensive
    if only in (None, "translate", "pairs", "tune") and not ray.is_initialized():
        start_ray(driver_runtime_env())
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
    if only in (None, "judge"):  # after tune: a trial's SFT opponent may finish after it
        from clo_ray.eval.judge_stage import run_judge_stage

        run_judge_stage(spec)
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
