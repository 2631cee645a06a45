"""The trial: what one Tune sample runs (train the cell's model, evaluate it, report).

A trial is a Tune *function trainable* (:func:`run_trial`) that runs the Train stage's
TorchTrainer (:func:`clo_ray.train.trainer.run_training`) with
``ray.tune.integration.ray_train.TuneReportCallback`` in its RunConfig - Ray 2.60's pattern
for Train V2 inside Tune: every ``ray.train.report`` of the workers reaches the trial, so ASHA
can stop it early. It is handed the pairs stage's output (where its data set is in storage)
and never loads the corpus. After training, its checkpoint is evaluated in a Ray task
(:func:`clo_ray.eval.trial_eval.evaluation_task`) and the final metrics are reported.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from clo_ray.data.pairs import PreparedPairs, pairs_key, repeat_seed
from clo_ray.layout import RunLayout, safe_name
from clo_ray.spec.grid import cell_of, model_reference
from clo_ray.spec.schema import load_spec


def trial_run_name(config: Mapping[str, Any]) -> str:
    """The trial's Ray Train run name: stable, so a restarted trial resumes its checkpoint."""
    cell = cell_of(config)
    repeat = config.get("repeat", 0)
    return safe_name(f"{cell.model}-{cell.language}-{cell.method}-{cell.budget}"
                     f"-t{config['cell_trial']}" + (f"-r{repeat}" if repeat else ""))


def run_trial(config: dict[str, Any], spec_data: dict[str, Any],
              pairs: Mapping[str, PreparedPairs],
              placement_timeout_s: float | None = None,
              prompt_sets: Mapping[str, Mapping[str, str]] | None = None) -> None:
    """One trial: train the cell's model with the sampled params, evaluate, report.

    ``pairs``: the pairs stage's data sets by :func:`clo_ray.data.pairs.pairs_key`;
    ``prompt_sets``: the prepared prompt sets (set name -> language -> table URI). A repeat
    (:mod:`clo_ray.tune.repeats`: ``config["job"]`` with ``repeat`` > 0) trains the same
    params on its own subsample with its own seed.
    """
    import ray
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from clo_ray.eval.trial_eval import evaluation_task
    from clo_ray.train.schedule import preference_beta
    from clo_ray.train.trainer import (
        DEFAULT_PLACEMENT_TIMEOUT_S,
        TrainRun,
        method_stages,
        run_training,
    )

    spec = load_spec(spec_data)
    config = config.get("job", config)  # a repeat's config comes wrapped (tune.grid_search)
    cell, params, repeat = cell_of(config), config["params"], config.get("repeat", 0)
    data = pairs[pairs_key(cell.language, cell.budget, repeat)]
    model = model_reference(spec, cell)
    started = time.perf_counter()
    result = run_training(spec, data, model=model, method=cell.method, overrides=params,
                          run=TrainRun(name=trial_run_name(config),
                                       storage_path=RunLayout.of(spec).trials,
                                       callbacks=[TuneReportCallback()],
                                       placement_timeout_s=placement_timeout_s
                                       or DEFAULT_PLACEMENT_TIMEOUT_S,
                                       seed=repeat_seed(spec.run.seed, repeat)))
    train_seconds = time.perf_counter() - started
    beta = preference_beta(method_stages(spec, cell.method, params))
    metrics = ray.get(evaluation_task(spec).remote(
        spec, model, data.languages[0], result.checkpoint, data.eval_uri, beta=beta,
        prompt_sets=prompt_sets))
    tune.report({**metrics, "train_seconds": train_seconds,
                 "train_tokens": result.metrics.get("tokens_total"),
                 "checkpoint": result.checkpoint.path, "trial_done": True, "repeat": repeat})
