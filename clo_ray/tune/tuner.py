"""Ray Tune over the grid: one experiment, every cell searched by its own Optuna study.

Each sample is a trial (:func:`clo_ray.tune.trainable.run_trial`: train, evaluate, report);
:class:`~clo_ray.tune.searcher.CellSearcher` routes suggestions to the cell's study and
:class:`~clo_ray.tune.searcher.CellScheduler` applies ASHA within a cell.

:func:`build_tuner` returns a plain ``ray.tune.Tuner`` (restored from storage when the
experiment exists), so users can add callbacks or change the scheduler before ``fit()``::

    from clo_ray import load_spec, build_tuner
    tuner = build_tuner(load_spec("sweeps/smoke.yaml"))
    grid = tuner.fit()
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from clo_ray import storage
from clo_ray.data.pairs import PreparedPairs
from clo_ray.layout import RunLayout
from clo_ray.ray_env import (
    keep_credentials_out_of_ray_logs,
    trial_placement,
    trial_resources,
)
from clo_ray.spec.grid import grid_cells
from clo_ray.spec.schema import SweepSpec
from clo_ray.tune.searcher import CellScheduler, CellSearcher, searcher_metrics
from clo_ray.tune.trainable import run_trial

logger = logging.getLogger(__name__)


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


def planned_trials(spec: SweepSpec) -> int:
    """Trials the experiment runs in all: ``trials_per_cell`` for every grid cell."""
    return len(grid_cells(spec)) * spec.search.trials_per_cell


def build_tuner(spec: SweepSpec, *, pairs: Mapping[str, PreparedPairs] | None = None,
                prompt_sets: Mapping[str, Mapping[str, str]] | None = None,
                restore: bool = True, placement_timeout_s: float | None = None) -> Any:
    """The sweep's ``ray.tune.Tuner``; restored (finished trials kept) when it exists.

    A run that grew (:mod:`clo_ray.sweep.growth`) has one experiment per generation; this is
    its first, and ``python -m clo_ray.sweep`` (:func:`clo_ray.sweep.runner.run_sweep`) runs
    them all. See :func:`generation_tuner` for the arguments.
    """
    tuner, _ = generation_tuner(spec, pairs=pairs, prompt_sets=prompt_sets, restore=restore,
                                placement_timeout_s=placement_timeout_s)
    return tuner


def generation_tuner(spec: SweepSpec, *, pairs: Mapping[str, PreparedPairs] | None = None,
                     prompt_sets: Mapping[str, Mapping[str, str]] | None = None,
                     restore: bool = True, placement_timeout_s: float | None = None,
                     generation: int = 0, done: Mapping[str, list[dict[str, Any]]] | None = None,
                     callbacks: Sequence[Any] = (), verbose: int = 1) -> tuple[Any, int]:
    """One generation's ``ray.tune.Tuner`` and the trials it runs in all; restored (finished
    trials kept) when it exists; None when there is nothing to run.

    ``generation``/``done``: a grown sweep's experiment number and the search trials its
    earlier generations ran, per cell (:mod:`clo_ray.sweep.growth`): it adds only the rest.

    ``pairs``: the pairs stage's output (:func:`clo_ray.data.pairs.prepare_sweep_pairs`);
    without it, the translate and pairs stages run here first (cached: a re-run reads them).
    ``prompt_sets``: the prepared prompt sets
    (:func:`clo_ray.eval.prompt_sets.prepare_prompt_sets`; without them, prepared here when
    the spec names any). ``placement_timeout_s``: how long a trial's train workers may wait
    to be placed (default :data:`clo_ray.train.trainer.DEFAULT_PLACEMENT_TIMEOUT_S`).
    ``callbacks``/``verbose``: see :func:`run_config`.
    """
    from ray import tune

    if pairs is None:
        from clo_ray.data.pairs import prepare_sweep_pairs
        from clo_ray.translate.stage import load_translations

        pairs = prepare_sweep_pairs(spec, load_translations(spec))
    if prompt_sets is None and spec.evaluation.prompt_sets:
        from clo_ray.eval.prompt_sets import load_sweep_prompt_sets, prepare_prompt_sets

        prompt_sets = prepare_prompt_sets(spec, load_sweep_prompt_sets(spec))
    keep_credentials_out_of_ray_logs()
    metrics, modes = searcher_metrics(spec)
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, spec_data=spec.model_dump(mode="json", by_alias=True),
                             pairs=dict(pairs), placement_timeout_s=placement_timeout_s,
                             prompt_sets={k: dict(v) for k, v in (prompt_sets or {}).items()}),
        trial_placement(spec))
    layout = RunLayout.of(spec)
    folder = layout.generation_folder("tune", generation)
    filesystem, fs_path = storage.resolve(folder, layout.options)
    searcher = CellSearcher(spec, metrics=metrics, modes=modes, study_prefix=spec.run.name,
                            done=done)
    planned = searcher.remaining()
    if restore and tune.Tuner.can_restore(fs_path, storage_filesystem=filesystem):
        logger.info("resuming the Tune experiment at %s", folder)
        return tune.Tuner.restore(fs_path, trainable, resume_errored=True,
                                  storage_filesystem=filesystem), planned
    if not planned:
        return None, 0
    scheduler = None
    if spec.search.scheduler.type == "asha":
        asha = spec.search.scheduler
        scheduler = CellScheduler(metric=asha.metric, mode=asha.mode,
                                  grace_period_steps=asha.grace_period * spec.train.report_every,
                                  reduction_factor=asha.reduction_factor)
    parent, name = fs_path.rsplit("/", 1)
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=searcher, scheduler=scheduler, num_samples=planned,
            max_concurrent_trials=concurrent_trials(spec)),
        run_config=run_config(name, parent, filesystem, callbacks, verbose)), planned


def run_config(name: str, parent: str, filesystem: Any, callbacks: Sequence[Any],
               verbose: int) -> Any:
    """An experiment's RunConfig: where it lives, and what it prints (``verbose``: Tune's
    own trial table at 1, nothing at 0; ``callbacks``: ours, e.g. the sweep's console lines).
    Both are stored with the experiment: a restored one prints as it was started."""
    from ray import tune

    return tune.RunConfig(name=name, storage_path=parent, storage_filesystem=filesystem,
                          callbacks=list(callbacks), verbose=verbose)


