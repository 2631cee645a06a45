"""Ray Tune over the grid: one experiment, every cell searched by its own Optuna study.

A trial is a Tune *function trainable* (:func:`run_trial`) that runs the Train stage's
TorchTrainer (:func:`clo_ray.train.trainer.run_training`) with
``ray.tune.integration.ray_train.TuneReportCallback`` in its RunConfig - Ray 2.60's pattern
for Train V2 inside Tune: every ``ray.train.report`` of the workers reaches the trial, so ASHA
can stop it early. After training, the trial exports the checkpoint, evaluates it (and, once
per cell and cached, the base model it started from) and reports the final metrics.

:func:`build_tuner` returns a plain ``ray.tune.Tuner`` (restored from storage when the
experiment exists), so users can add callbacks or change the scheduler before ``fit()``::

    from clo_ray import load_spec, build_tuner
    tuner = build_tuner(load_spec("sweeps/smoke.yaml"))
    grid = tuner.fit()
"""

from __future__ import annotations

import logging
import re
import tempfile
import time
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from clo_ray import storage
from clo_ray.spec import SweepSpec, load_spec
from clo_ray.tune_search import CellScheduler, CellSearcher, cell_of, grid_cells, searcher_metrics

logger = logging.getLogger(__name__)

EXPERIMENT = "tune"  # the Tune experiment's folder under the run: <storage>/<run>/tune
# Base-model metrics each trial reports (as base_<name>): the report's untrained reference.
BASE_METRICS = ("target_fidelity", "english_retention", "target_nll", "english_nll")


def trial_run_name(config: dict[str, Any]) -> str:
    """The trial's Ray Train run name: stable, so a restarted trial resumes its checkpoint."""
    cell = cell_of(config)
    name = f"{cell.label}-{cell.language}-{cell.method}-{cell.budget}-t{config['cell_trial']}"
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def run_trial(config: dict[str, Any], spec_data: dict[str, Any]) -> None:
    """One trial: train the cell's model with the sampled params, evaluate, report."""
    import ray
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from clo_ray.train.trainer import prepare_pairs, run_training

    spec = load_spec(spec_data)
    cell, params = cell_of(config), config["params"]
    languages = cell.language.split("+")
    started = time.perf_counter()
    pairs = prepare_pairs(spec, languages, cell.budget)
    result = run_training(spec, model=cell.model, languages=languages, method=cell.method,
                          budget=cell.budget, overrides=params, run_name=trial_run_name(config),
                          callbacks=[TuneReportCallback()],
                          storage_path=storage.join(spec.run.uri, "trials"))
    train_seconds = time.perf_counter() - started
    metrics = ray.get(evaluation_task(spec).remote(
        spec, cell.model, languages[0], result.checkpoint, pairs.eval_uri,
        beta=float(params.get("beta", 0.1))))
    tune.report({**metrics, "train_seconds": train_seconds,
                 "train_tokens": result.metrics.get("tokens_total"),
                 "checkpoint": result.checkpoint.path, "trial_done": True})


def evaluation_task(spec: SweepSpec) -> Any:
    """:func:`evaluate_trial` as a Ray task on the resources training just released.

    Not in the trial's own process: that holds one CPU and no GPU, and generating with an 8B
    model there would crawl. The task takes one GPU when training had GPUs (one model copy
    serves generation) and the train workers' CPUs; ``max_calls=1`` so its process exits
    and frees the model (and GPU memory) when done.
    """
    import ray

    from clo_ray.train.trainer import worker_env

    res = spec.resources
    cpus = min(res.workers_per_trial * res.cpus_per_worker, max(res.cpus_per_worker, 1.0))
    # torch threads: the task's CPUs plus the trial's own CPU, idle while it waits for us.
    threads = int(cpus + trial_resources(spec)["CPU"])
    return ray.remote(max_calls=1)(_evaluate_with_threads).options(
        num_cpus=cpus, num_gpus=1 if res.gpus_per_worker else 0,
        scheduling_strategy="DEFAULT",  # outside the trial's placement group, like Train's
        # workers: the trial reserves one CPU only
        runtime_env={"env_vars": {**worker_env(bool(res.gpus_per_worker)),
                                  "CLO_RAY_EVAL_THREADS": str(max(1, threads))}})


def _evaluate_with_threads(*args: Any, **kwargs: Any) -> dict[str, float]:
    import os

    import torch

    torch.set_num_threads(int(os.environ.get("CLO_RAY_EVAL_THREADS", "1")))
    return evaluate_trial(*args, **kwargs)


def evaluate_trial(spec: SweepSpec, model: str, language: str, checkpoint: Any, eval_uri: str,
                   *, beta: float) -> dict[str, float]:
    """Evaluate a trial's checkpoint against the base model's held-out log-probs.

    The base model is evaluated once per (model, language, held-out set) and cached in
    storage: its answers are the untrained reference line of the report and its held-out
    log-probs are the reference of the CLO preference metrics. The trial's own evaluation
    (its answers: the judge stage's input) is kept in ``trial_eval_uri``, and the
    ``evaluation.lm_eval`` tasks run on the exported model when any are named.
    """
    from clo_ray.eval.evaluate import (
        evaluate_model,
        link_base,
        objective_or_none,
        scalar_metrics,
        trial_eval_uri,
    )
    from clo_ray.models import resolve_model
    from clo_ray.train.checkpoint import export_model

    options = spec.run.storage_options or None
    with storage.open_input(eval_uri, options) as fh:
        rows = pq.read_table(fh)
    common = dict(language=language, evaluation=spec.evaluation,
                  template=spec.train.prompt_template, max_length=spec.train.max_length,
                  beta=beta, storage_options=options)
    held_out = eval_uri.rsplit("/", 1)[-1].split(".")[0]
    base_cache = storage.join(spec.run.storage, "cache", "eval", "base",
                              re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{model}-{language}-{held_out}"))
    base = evaluate_model(resolve_model(model), rows, cache_uri=base_cache, model_key=model,
                          **common)
    trial_uri, lm_eval = trial_eval_uri(spec.run.uri, checkpoint.path), spec.evaluation.lm_eval
    with checkpoint.as_directory() as directory, \
            tempfile.TemporaryDirectory(prefix="clo-export-") as exported:
        export_model(directory, exported)
        trained = evaluate_model(exported, rows, reference_logps=base["heldout_logps"],
                                 model_key=checkpoint.path, cache_uri=trial_uri, **common)
        if lm_eval.enabled:
            from clo_ray.eval.lm_eval import run_lm_eval

            trained.update(run_lm_eval(exported, lm_eval, cache_uri=trial_uri,
                                       model_key=checkpoint.path,
                                       storage_options=options).metrics)
            trained["objective"] = objective_or_none(trained, spec.evaluation.objective.weights)
    link_base(trial_uri, base_cache, options)
    out = scalar_metrics(trained)
    out.update({f"base_{k}": v for k, v in scalar_metrics(base).items() if k in BASE_METRICS})
    return out


def trial_resources(spec: SweepSpec) -> dict[str, float]:
    """What the trial's own process holds: one CPU (Ray refuses 0) plus
    ``resources.trial_resources`` (e.g. ``on_demand``: the trial, and the Train controller Ray
    places on its node, stay off spot nodes); the train workers ask for theirs
    (``resources``) when the TorchTrainer starts them."""
    return {"CPU": 1.0, **spec.resources.trial_resources}


def concurrent_trials(spec: SweepSpec) -> int:
    """How many trials may run at once: ``search.max_concurrent_trials``, else as many as the
    cluster's current CPUs/GPUs hold *with their train workers*.

    Tune only sees the trial's own CPU; without this cap it starts trials until no CPU is left
    for any TorchTrainer's workers and every trial waits forever. On an autoscaling cluster
    the current size says little: set ``search.max_concurrent_trials`` there.
    """
    import ray

    if spec.search.max_concurrent_trials:
        return spec.search.max_concurrent_trials
    res = spec.resources
    have = ray.cluster_resources()
    trial_cpus = trial_resources(spec)["CPU"]
    fits = [have.get("CPU", 0) // (trial_cpus + res.workers_per_trial * res.cpus_per_worker)]
    if res.gpus_per_worker:
        fits.append(have.get("GPU", 0) // (res.workers_per_trial * res.gpus_per_worker))
    return max(1, int(min(fits)))


def experiment_path(spec: SweepSpec) -> str:
    return storage.join(spec.run.uri, EXPERIMENT)


def keep_credentials_out_of_ray_logs() -> None:
    """Stop Ray Tune copying the driver's AWS keys into each trial's runtime_env.

    Ray Tune 2.60 puts AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN from the
    driver's environment into every trial actor's ``runtime_env.env_vars``, and Ray's
    runtime_env agent logs runtime envs verbatim (``session_*/logs/runtime_env_agent.log``,
    shown by the dashboard): the secret key would sit in plain text on the head node. The
    trials do not need the copy: like every Ray process (Train workers included) they inherit
    the variables from the raylet (local Ray started by the driver, a job's runtime_env, the
    node's own setup) or use the node's instance role. tests/test_s3.py greps Ray's logs.
    """
    from ray.tune.execution import class_cache

    names = getattr(class_cache, "ENV_VARS_TO_PROPAGATE", None)
    if isinstance(names, (set, frozenset)):
        class_cache.ENV_VARS_TO_PROPAGATE = set(names) - storage.CREDENTIAL_ENV_VARS


def build_tuner(spec: SweepSpec, *, restore: bool = True) -> Any:
    """The sweep's ``ray.tune.Tuner``; restored (finished trials kept) when it exists."""
    from ray import tune

    keep_credentials_out_of_ray_logs()
    metrics, modes = searcher_metrics(spec)
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, spec_data=spec.model_dump(mode="json", by_alias=True)),
        trial_resources(spec))
    path = experiment_path(spec)
    options = spec.run.storage_options or None
    filesystem, fs_path = storage.resolve(path, options)
    if restore and tune.Tuner.can_restore(fs_path, storage_filesystem=filesystem):
        logger.info("resuming the Tune experiment at %s", path)
        return tune.Tuner.restore(fs_path, trainable, resume_errored=True,
                                  storage_filesystem=filesystem)
    scheduler = None
    if spec.search.scheduler.type == "asha":
        asha = spec.search.scheduler
        scheduler = CellScheduler(metric=asha.metric, mode=asha.mode,
                                  grace_period_steps=asha.grace_period * spec.train.report_every,
                                  reduction_factor=asha.reduction_factor)
    searcher = CellSearcher(spec, metrics=metrics, modes=modes, study_prefix=spec.run.name)
    parent, name = fs_path.rsplit("/", 1)
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=searcher, scheduler=scheduler,
            num_samples=len(grid_cells(spec)) * spec.search.trials_per_cell,
            max_concurrent_trials=concurrent_trials(spec)),
        run_config=tune.RunConfig(name=name, storage_path=parent,
                                  storage_filesystem=filesystem, verbose=1))


def results_table(grid: Any, spec: SweepSpec) -> pa.Table:
    """One row per trial in :data:`clo_ray.report.RESULTS_SCHEMA` (extra metrics carried)."""
    import json

    from clo_ray.report import METRIC_COLUMNS, extra_metric_names, results_schema

    rows, bases = [], {}
    for result in grid:
        config, metrics = result.config or {}, result.metrics or {}
        if "cell" not in config:
            continue
        cell = cell_of(config)
        done = bool(metrics.get("trial_done"))
        status = "failed" if result.error else "completed" if done else "stopped"
        row = {"run": spec.run.name, "trial_id": str(metrics.get("trial_id", result.path)),
               "model": cell.label, "language": cell.language, "method": cell.method,
               "budget": cell.budget, "status": status,
               "params": json.dumps(config.get("params", {}), sort_keys=True),
               "checkpoint": metrics.get("checkpoint"),
               # an early-stopped trial's cost: Tune's clock and the tokens up to its last report
               "train_seconds": _float(metrics.get("train_seconds" if done else "time_total_s")),
               "train_tokens": metrics.get("train_tokens" if done else "tokens_total")}
        # Only the final report holds held-out metrics; a stopped (or failed) trial's last
        # report is a training one, whose target_nll etc. are training-batch values that
        # must not be ranked against held-out ones: not measured, so null.
        row.update({m: _float(metrics.get(m)) if done else None for m in METRIC_COLUMNS})
        row.update({m: _float(metrics[m]) for m in extra_metric_names(metrics) if done})
        rows.append(row)
        base = {m: _float(metrics.get(f"base_{m}")) for m in BASE_METRICS}
        if any(v is not None for v in base.values()):  # the untrained model: budget 0
            bases[(cell.label, cell.language)] = {
                "run": spec.run.name, "trial_id": f"base-{cell.label}-{cell.language}",
                "model": cell.label, "language": cell.language, "method": "base",
                "budget": 0, "status": "completed", "params": "{}", **base}
    extra = extra_metric_names({name for row in rows for name in row})
    return pa.Table.from_pylist(rows + list(bases.values()), schema=results_schema(extra))


def _float(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) \
        else None
