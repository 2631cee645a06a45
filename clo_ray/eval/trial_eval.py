"""A trial's evaluation: its checkpoint and (once per held-out set, cached) its base model.

Runs as a Ray task on the resources training just released (:func:`evaluation_task`), called
by the Tune trial (:mod:`clo_ray.tune.trainable`). What one model's evaluation measures is
:func:`clo_ray.eval.evaluate.evaluate_model`; this module decides which models are evaluated,
where their results are kept (:class:`~clo_ray.layout.RunLayout`) and what the trial reports.
"""

from __future__ import annotations

import tempfile
from typing import Any

from clo_ray.data.pairs import read_pairs
from clo_ray.eval.prompt_sets import PreparedSets
from clo_ray.eval.set_answers import PREFIX, answer_prompt_sets
from clo_ray.layout import RunLayout
from clo_ray.ray_env import trial_resources, worker_env
from clo_ray.report.schema import BASE_METRICS
from clo_ray.spec.schema import SweepSpec


def evaluation_task(spec: SweepSpec, function: Any = None) -> Any:
    """:func:`evaluate_trial` (or ``function``, another evaluation of one trial) as a Ray task
    on the resources training just released.

    Not in the trial's own process: that holds one CPU and no GPU, and generating with an 8B
    model there would crawl. The task takes one GPU when training had GPUs (one model copy
    serves generation) and the train workers' CPUs; ``max_calls=1`` so its process exits
    and frees the model (and GPU memory) when done.
    """
    import ray

    res = spec.resources
    cpus = min(res.workers_per_trial * res.cpus_per_worker, max(res.cpus_per_worker, 1.0))
    # torch threads: the task's CPUs plus the trial's own CPU, idle while it waits for us.
    threads = int(cpus + trial_resources(spec)["CPU"])
    evaluate = function or evaluate_trial

    def with_threads(*args: Any, **kwargs: Any) -> dict[str, float]:
        import os

        import torch

        torch.set_num_threads(int(os.environ.get("CLO_RAY_EVAL_THREADS", "1")))
        return dict(evaluate(*args, **kwargs))

    return ray.remote(max_calls=1)(with_threads).options(
        num_cpus=cpus, num_gpus=1 if res.gpus_per_worker else 0,
        scheduling_strategy="DEFAULT",  # outside the trial's placement group, like Train's
        # workers: the trial reserves one CPU only
        runtime_env={"env_vars": {**worker_env(bool(res.gpus_per_worker)),
                                  "CLO_RAY_EVAL_THREADS": str(max(1, threads))}})


def evaluate_trial(spec: SweepSpec, model: str, language: str, checkpoint: Any, eval_uri: str,
                   *, beta: float, prompt_sets: PreparedSets | None = None) -> dict[str, float]:
    """Evaluate a trial's checkpoint against the base model's held-out log-probs.

    The base model is evaluated once per (model, language, held-out set) and cached in
    storage: its answers are the untrained reference line of the report and its held-out
    log-probs are the reference of the CLO preference metrics. The trial's own evaluation
    (its answers: the judge stage's input) is kept in ``RunLayout.trial_eval``. Both models
    answer the prompt sets (``prompt_sets``: the driver's prepared tables,
    :mod:`clo_ray.eval.set_answers`), and the ``evaluation.lm_eval`` tasks and
    ``evaluation.benchmarks`` run on the exported model when any are named.
    """
    from clo_ray.eval.evaluate import (
        EvalSettings,
        evaluate_model,
        link_base,
        objective_or_none,
        scalar_metrics,
    )
    from clo_ray.models.resolve import resolve_model
    from clo_ray.train.checkpoint import export_model

    options = spec.run.storage_options or None
    rows = read_pairs(eval_uri, options)
    settings = EvalSettings(language=language, evaluation=spec.evaluation,
                            template=spec.train.prompt_template,
                            max_length=spec.train.max_length, beta=beta,
                            storage_options=options, batch_size=spec.evaluation.batch_size)
    held_out = eval_uri.rsplit("/", 1)[-1].split(".")[0]
    layout = RunLayout.of(spec)
    base_cache = layout.base_eval(model, language, held_out)
    base_dir = resolve_model(model)
    base = evaluate_model(base_dir, rows, settings, cache_uri=base_cache, model_key=model)
    evaluation = spec.evaluation
    if evaluation.prompt_sets and prompt_sets:
        base |= answer_prompt_sets(base_dir, evaluation, prompt_sets, language,
                                   settings.template, eval_uri=base_cache, model_key=model,
                                   storage_options=options, batch_size=evaluation.batch_size)
    trial_uri, lm_eval = layout.trial_eval(checkpoint.path), evaluation.lm_eval
    with checkpoint.as_directory() as directory, \
            tempfile.TemporaryDirectory(prefix="clo-export-") as exported:
        export_model(directory, exported)
        trained = evaluate_model(exported, rows, settings, model_key=checkpoint.path,
                                 reference_logps=base["heldout_logps"], cache_uri=trial_uri)
        if evaluation.prompt_sets and prompt_sets:
            trained.update(answer_prompt_sets(exported, evaluation, prompt_sets, language,
                                              settings.template, eval_uri=trial_uri,
                                              model_key=checkpoint.path,
                                              storage_options=options,
                                              batch_size=evaluation.batch_size))
        if lm_eval.enabled or evaluation.benchmarks:
            from clo_ray.eval.lm_eval import run_benchmarks, run_lm_eval

            if lm_eval.enabled:
                trained.update(run_lm_eval(exported, lm_eval, cache_uri=trial_uri,
                                           model_key=checkpoint.path,
                                           storage_options=options).metrics)
            if evaluation.benchmarks:
                trained.update(run_benchmarks(exported, evaluation, language,
                                              cache_uri=trial_uri, model_key=checkpoint.path,
                                              storage_options=options))
                # the base model's scores once per cell (cached): the table's reference row
                base.update({k: v for k, v in run_benchmarks(
                    base_dir, evaluation, language, cache_uri=base_cache, model_key=model,
                    storage_options=options).items() if k.startswith("benchmark.")})
            trained["objective"] = objective_or_none(trained, evaluation.objective.weights)
    link_base(trial_uri, base_cache, options)
    out = scalar_metrics(trained)
    out.update({f"base_{k}": v for k, v in scalar_metrics(base).items()
                if k in BASE_METRICS or k.startswith(("benchmark.", PREFIX))})
    return out
