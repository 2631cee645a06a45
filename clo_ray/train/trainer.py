"""One training run (a sweep trial) as a Ray Train TorchTrainer, from the spec.

:func:`run_training` is what ``python -m clo_ray.train`` and the sweep's Tune trials call::

    tables = load_translations(spec, ["sw"])
    pairs = prepare_pairs(spec, tables, ["sw"], 200)
    result = run_training(spec, pairs, model="builtin:tiny-llama", method="clo")
    result.checkpoint  # the final checkpoint (trained tensors + manifest): export_model(...)

It takes the pairs stage's output (:class:`~clo_ray.data.pairs.PreparedPairs`: where the
training and held-out pairs are in storage), builds the loop config, and fits a TorchTrainer
whose workers run :func:`clo_ray.train.loop.train_loop_per_worker`.

Ray 2.60 (Train V2) and Tune: a Tune function trainable calls ``run_training(...,
run=TrainRun(callbacks=[ray.tune.integration.ray_train.TuneReportCallback()]))``; the callback
forwards every ``ray.train.report`` of the trainer to the trial. Re-running the same run name
resumes from its last checkpoint (V2 restores a run from its storage folder).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ray.train import UserCallback

from clo_ray import storage
from clo_ray.data.pairs import PreparedPairs
from clo_ray.errors import CloRayError
from clo_ray.layout import RunLayout, safe_name
from clo_ray.ray_env import worker_env
from clo_ray.spec.schema import SweepSpec
from clo_ray.spec.training import StageSpec
from clo_ray.train.deepspeed_config import gradient_accumulation
from clo_ray.train.loop_config import LoopConfig
from clo_ray.train.schedule import apply_overrides

logger = logging.getLogger(__name__)


class TrainingError(CloRayError):
    """A training run cannot be set up from the given spec, method and languages."""


# ----------------------------------------------------------------------------------- data


# ----------------------------------------------------------------------------- the trainer


class MetricsHistory(UserCallback):
    """Ray Train callback: every report of rank 0 appended to ``<run>/history.jsonl``.

    Ray keeps only the last metrics (and those of kept checkpoints); the training curve is
    what a report plots and what tests read (steps after a resume show ``resumed_from_step``).
    It runs in the Ray Train controller, writes through :mod:`clo_ray.storage` (whole file,
    atomically: object stores cannot append) and continues an existing file when a run
    name is re-run.
    """

    def __init__(self, uri: str, storage_options: dict | None = None) -> None:
        self.uri, self.storage_options = uri, storage_options
        self.lines: list[str] | None = None

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]],
                     checkpoint: Any) -> None:
        import json

        if self.lines is None:
            self.lines = []
            if storage.exists(self.uri, self.storage_options):
                with storage.open_input(self.uri, self.storage_options) as fh:
                    self.lines = fh.read().decode().splitlines()
        row: dict[str, Any] = {k: v for k, v in (metrics[0] if metrics else {}).items()
                               if isinstance(v, (int, float, str))}
        row["checkpoint"] = checkpoint.path if checkpoint is not None else None
        self.lines.append(json.dumps(row, sort_keys=True))
        storage.write_bytes_atomic(self.uri, ("\n".join(self.lines) + "\n").encode(),
                                   self.storage_options)

    def after_exception(self, run_context: Any, worker_exceptions: dict) -> None:
        """Nothing to record: the retry's reports say where it resumed."""


def read_history(uri: str, storage_options: dict | None = None) -> list[dict[str, Any]]:
    """The reports a run recorded (see :class:`MetricsHistory`), oldest first."""
    import json

    with storage.open_input(uri, storage_options) as fh:
        return [json.loads(line) for line in fh.read().decode().splitlines() if line]


def method_stages(spec: SweepSpec, method: str, overrides: Mapping[str, Any] | None = None
                  ) -> list[StageSpec]:
    """The stages a method runs: its schedule (``overrides["schedule"]`` or its first) with
    the search overrides applied."""
    methods = {m.name: m for m in spec.methods}
    if method not in methods:
        raise TrainingError(f"unknown method {method!r}; the spec has {sorted(methods)}")
    schedules = methods[method].schedules or [method]
    name = (overrides or {}).get("schedule", schedules[0])
    if name not in schedules:
        raise TrainingError(f"method {method!r} has no schedule {name!r} ({schedules})")
    return apply_overrides(spec.stages(name), overrides or {})


def loop_config(spec: SweepSpec, *, model: str, stages: Sequence[StageSpec],
                pairs: PreparedPairs, extra: Mapping[str, Any] | None = None,
                seed: int | None = None) -> LoopConfig:
    """What every worker's loop receives (see :class:`~clo_ray.train.loop_config.LoopConfig`);
    ``extra``: its testing / time-boxing keys (``stop_after_steps``, ``sample_log``, ...);
    ``seed``: the data order and dropout seed (default ``run.seed``; a repeat's own)."""
    workers = spec.resources.workers_per_trial
    gradient_accumulation(spec.train.batch_pairs, spec.train.micro_batch_pairs, workers)
    return LoopConfig(
        model=model, languages=tuple(pairs.languages), stages=tuple(stages), train=spec.train,
        resources=spec.resources, seed=spec.run.seed if seed is None else seed,
        pairs_uri=pairs.train_uri,
        eval_uri=pairs.eval_uri, pairs_fingerprint=pairs.fingerprint,
        reference_root=RunLayout.of(spec).reference,
        storage_options=dict(spec.run.storage_options) or None).with_extra(extra)


# How long a run's train workers may wait to be placed before the run fails (a busy or
# shrunken cluster); the sweep's --placement-timeout sets it. Ray Train V2 itself retries an
# unplaceable worker group without end (a retryable controller error, unlimited by default).
DEFAULT_PLACEMENT_TIMEOUT_S = 1800.0
_START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"  # Train's wait per attempt


class PlacementTimeoutError(TrainingError):
    """A run's train workers could not be placed within the placement timeout."""


def placement_retries(timeout_s: float) -> int:
    """Ray Train's controller retries allowed for ``timeout_s`` of waiting: each attempt waits
    ``RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S`` (60 s unless set) for the placement group."""
    import math
    import os

    per_attempt = float(os.environ.get(_START_TIMEOUT_ENV, 60.0))
    return max(0, math.ceil(timeout_s / per_attempt) - 1)


def build_trainer(spec: SweepSpec, config: LoopConfig, *, run_name: str,
                  callbacks: Sequence[Any] = (), storage_path: str | None = None,
                  placement_timeout_s: float = DEFAULT_PLACEMENT_TIMEOUT_S) -> Any:
    """A TorchTrainer for one run: workers and resources, storage, retries, checkpoints."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from clo_ray.train.loop import train_loop_per_worker

    resources = spec.resources
    use_gpu = resources.gpus_per_worker > 0
    per_worker = {"CPU": resources.cpus_per_worker}
    if use_gpu:
        per_worker["GPU"] = resources.gpus_per_worker
    root = storage_path or RunLayout.of(spec).train_runs
    if "://" not in root:
        root = storage.resolve(root)[1]  # absolute: Ray's processes have other cwds
    path, filesystem = root, None
    options = dict(spec.run.storage_options) or None
    if options:  # custom endpoint / credentials: hand Ray the filesystem
        filesystem, path = storage.resolve(root, options)
    history = MetricsHistory(storage.join(root, run_name, "history.jsonl"), options)
    run_config = ray.train.RunConfig(
        name=run_name,
        storage_path=path,
        storage_filesystem=filesystem,
        failure_config=ray.train.FailureConfig(
            max_failures=resources.max_failures,
            controller_failure_limit=placement_retries(placement_timeout_s)),
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
        callbacks=[history, *callbacks],
        worker_runtime_env={"env_vars": worker_env(use_gpu)},
    )
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"loop": config},  # Ray wants a dict; the loop unwraps it
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=resources.workers_per_trial, use_gpu=use_gpu,
            resources_per_worker=per_worker, placement_strategy=resources.placement_strategy,
            label_selector=dict(resources.worker_labels) or None),
        run_config=run_config,
    )


def default_run_name(spec: SweepSpec, model: str, languages: Sequence[str], method: str,
                     budget: str) -> str:
    """``<model label>-<langs>-<method>-<budget>``: stable, so a re-run resumes."""
    label = next((m.label for m in spec.models if m.name == model), None) or \
        model.removeprefix("builtin:").rstrip("/").rsplit("/", 1)[-1]
    return safe_name(f"{label}-{'+'.join(languages)}-{method}-{budget}")


@dataclass(frozen=True)
class TrainRun:
    """Where one training run is kept and what rides along with it: the knobs a caller sets
    per run rather than per spec.

    ``name``: the folder under ``storage_path`` (default ``<run>/train``); a run of that name
    with a checkpoint is *resumed*, so trials of one cell with different overrides need their
    own names (Tune: the trial id); ``None`` names one run per grid cell. ``callbacks``: extra
    Ray Train RunConfig callbacks (Tune's ``TuneReportCallback``). ``extra``: loop keys such
    as ``stop_after_steps`` (see :data:`clo_ray.train.loop_config.EXTRA_KEYS`).
    ``placement_timeout_s``: how long the workers may wait for their resources before the
    run fails with :class:`PlacementTimeoutError` (not forever). ``seed``: data order and
    dropout seed (default ``run.seed``; a repeat of a cell's best configuration has its own).
    """

    name: str | None = None
    storage_path: str | None = None
    callbacks: Sequence[Any] = ()
    extra: Mapping[str, Any] | None = None
    placement_timeout_s: float = DEFAULT_PLACEMENT_TIMEOUT_S
    seed: int | None = None


def run_training(spec: SweepSpec, pairs: PreparedPairs, *, model: str, method: str,
                 overrides: Mapping[str, Any] | None = None,
                 run: TrainRun = TrainRun()) -> Any:
    """Train ``model`` with ``method`` on the prepared ``pairs``; the Ray Result.

    ``pairs``: the pairs stage's output (:func:`clo_ray.data.pairs.prepare_pairs`): the run
    reads its training pairs from storage, never the corpus. ``overrides``: search values
    (``lr``, ``beta``, ``schedule``, ...; see :func:`clo_ray.train.schedule.apply_overrides`).
    ``run``: its name, storage, callbacks and loop extras (:class:`TrainRun`). Raises the
    run's error if it failed after its retries.
    """
    stages = method_stages(spec, method, overrides)
    config = loop_config(spec, model=model, stages=stages, pairs=pairs, extra=run.extra,
                         seed=run.seed)
    name = run.name or default_run_name(spec, model, pairs.languages, method, pairs.budget)
    trainer = build_trainer(spec, config, run_name=name, callbacks=run.callbacks,
                            storage_path=run.storage_path,
                            placement_timeout_s=run.placement_timeout_s)
    logger.info("training %s: %d pairs (%d held out), %d stage(s), %d worker(s)", name,
                pairs.n_train, pairs.n_eval, len(stages), spec.resources.workers_per_trial)
    try:
        return trainer.fit()
    except Exception as err:
        if _unplaced(err):
            res = spec.resources
            raise PlacementTimeoutError(
                f"run {name}: its {res.workers_per_trial} train worker(s) of "
                f"{res.cpus_per_worker:g} CPU / {res.gpus_per_worker:g} GPU each were not "
                f"placed within {run.placement_timeout_s:g} s: the cluster is busy, "
                "shrank, or is still scaling up. Re-run the sweep when it has room (finished "
                "work is kept), or allow longer waits with --placement-timeout") from None
        raise


def _unplaced(err: BaseException) -> bool:
    """Whether ``err`` is Ray Train giving up on placing a worker group."""
    from ray.train.v2._internal.exceptions import WorkerGroupStartupTimeoutError

    failure = getattr(err, "controller_failure", None)
    return isinstance(failure, WorkerGroupStartupTimeoutError)
