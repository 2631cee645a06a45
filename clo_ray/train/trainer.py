"""One training run (a sweep trial) as a Ray Train TorchTrainer, from the spec.

:func:`run_training` is what ``python -m clo_ray.train`` and the sweep's Tune trials call::

    result = run_training(spec, model="builtin:tiny-llama", languages=["sw"], method="clo",
                          budget=200)
    result.checkpoint  # the final checkpoint (trained tensors + manifest): export_model(...)

It prepares the data (translations -> budget subset + held-out split -> a content-addressed
pairs parquet in storage, shared by every trial with the same data), builds the loop config,
and fits a TorchTrainer whose workers run :func:`clo_ray.train.loop.train_loop_per_worker`.

Ray 2.60 (Train V2) and Tune: a Tune function trainable calls ``run_training(...,
callbacks=[ray.tune.integration.ray_train.TuneReportCallback()])``; the callback forwards
every ``ray.train.report`` of the trainer to the trial. Re-running the same ``run_name``
resumes from its last checkpoint (V2 restores a run from its storage folder).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
from ray.train import UserCallback

from clo_ray import storage
from clo_ray.errors import CloRayError
from clo_ray.spec import StageSpec, SweepSpec
from clo_ray.train.deepspeed_config import gradient_accumulation
from clo_ray.train.schedule import apply_overrides

logger = logging.getLogger(__name__)


class TrainingError(CloRayError):
    """A training run cannot be set up from the given spec, method and languages."""


@dataclass(frozen=True)
class PreparedPairs:
    """A trial's data in storage: training pairs (budget) and the held-out evaluation pairs."""

    train_uri: str
    eval_uri: str
    fingerprint: str  # of the training pairs: part of every reference-cache key
    n_train: int
    n_eval: int


# ----------------------------------------------------------------------------------- data


def cache_root(spec: SweepSpec) -> str:
    """Where content-addressed artifacts shared across runs live: ``<storage>/cache``."""
    return storage.join(spec.run.storage, "cache")


def load_translations(spec: SweepSpec, languages: Sequence[str]) -> dict[str, pa.Table]:
    """Each language's translated table, from the translate stage's cache (translating once)."""
    from clo_ray.data.translate import read_table, translate_corpus

    results = translate_corpus(spec, languages=list(languages))
    options = dict(spec.run.storage_options) or None
    return {lang: read_table(results[lang].translations, options) for lang in languages}


def prepare_pairs(spec: SweepSpec, languages: Sequence[str], budget: int | Mapping[str, int],
                  translations: Mapping[str, pa.Table] | None = None) -> PreparedPairs:
    """Budget subset and held-out split of the translations, written once by content.

    ``budget`` is pairs per language (one number for all, or one per language). The split is
    :func:`clo_ray.data.pairs.split_pairs` (one language) / ``split_multi`` (several): nested
    budgets and a fixed held-out set under ``spec.run.seed``.
    """
    from clo_ray.data.pairs import pairs_fingerprint, split_multi, split_pairs

    tables = dict(translations) if translations is not None else load_translations(spec,
                                                                                   languages)
    missing = [lang for lang in languages if lang not in tables]
    if missing:
        raise TrainingError(f"no translations for {missing} (have {sorted(tables)})")
    budgets = budget if isinstance(budget, Mapping) else dict.fromkeys(languages, int(budget))
    holdout, seed = spec.evaluation.holdout, spec.run.seed
    if len(languages) == 1:
        split = split_pairs(tables[languages[0]], budget=budgets[languages[0]],
                            holdout=holdout, seed=seed)
    else:
        split = split_multi({lang: tables[lang] for lang in languages},
                            {lang: budgets[lang] for lang in languages}, holdout=holdout,
                            seed=seed)
    fingerprint = pairs_fingerprint(split.train)
    root = storage.join(cache_root(spec), "pairs")
    train_uri = storage.join(root, f"{fingerprint}.train.parquet")
    eval_uri = storage.join(root, f"{pairs_fingerprint(split.eval)}.eval.parquet")
    for uri, table in ((train_uri, split.train), (eval_uri, split.eval)):
        if not storage.exists(uri, spec.run.storage_options):
            storage.write_parquet_atomic(uri, table, spec.run.storage_options)
    return PreparedPairs(train_uri, eval_uri, fingerprint, split.train.num_rows,
                         split.eval.num_rows)


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
        row = {k: v for k, v in (metrics[0] if metrics else {}).items()
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


def loop_config(spec: SweepSpec, *, model: str, languages: Sequence[str],
                stages: Sequence[StageSpec], pairs: PreparedPairs,
                extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The plain dict every worker's loop receives (JSON-able: it travels through Ray)."""
    workers = spec.resources.workers_per_trial
    gradient_accumulation(spec.train.batch_pairs, spec.train.micro_batch_pairs, workers)
    config = {
        "model": model,
        "languages": list(languages),
        "stages": [stage.model_dump(mode="json", by_alias=True) for stage in stages],
        "train": spec.train.model_dump(mode="json"),
        "resources": spec.resources.model_dump(mode="json"),
        "seed": spec.run.seed,
        "pairs_uri": pairs.train_uri,
        "eval_uri": pairs.eval_uri,
        "pairs_fingerprint": pairs.fingerprint,
        "reference_root": spec.run.storage,  # the cache is <storage>/cache/reference/<key>
        "storage_options": dict(spec.run.storage_options),
    }
    config.update(extra or {})
    return config


def build_trainer(spec: SweepSpec, config: dict[str, Any], *, run_name: str,
                  callbacks: Sequence[Any] = (), storage_path: str | None = None) -> Any:
    """A TorchTrainer for one run: workers and resources, storage, retries, checkpoints."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from clo_ray.train.loop import train_loop_per_worker

    resources = spec.resources
    use_gpu = resources.gpus_per_worker > 0
    per_worker = {"CPU": resources.cpus_per_worker}
    if use_gpu:
        per_worker["GPU"] = resources.gpus_per_worker
    root = storage_path or storage.join(spec.run.uri, "train")
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
        failure_config=ray.train.FailureConfig(max_failures=resources.max_failures),
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
        callbacks=[history, *callbacks],
        worker_runtime_env={"env_vars": worker_env(use_gpu)},
    )
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=config,
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=resources.workers_per_trial,
                                               use_gpu=use_gpu,
                                               resources_per_worker=per_worker),
        run_config=run_config,
    )


# Ray Train V2's controller collects a report when it polls the workers (every 2 s by
# default), and a worker's next ray.train.report blocks until the previous one is collected:
# steps faster than the poll wait for it. 0.2 s keeps that wait small at a negligible cost.
REPORT_POLL_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"}


def ray_runtime_env() -> dict[str, Any]:
    """The job-level runtime env to start Ray with (``ray.init(runtime_env=...)``) for
    training: it reaches the Train controller, which a trainer's own options cannot."""
    return {"env_vars": dict(REPORT_POLL_ENV)}


def driver_runtime_env() -> dict[str, Any]:
    """:func:`ray_runtime_env` for a driver that may be a submitted job's (``ray job submit``).

    Ray 2.60 merges the job's runtime env (its ``working_dir``, ``env_vars``, ...; passed to
    the driver as ``RAY_JOB_CONFIG_JSON_ENV_VAR``) with the one the driver gives ``ray.init``,
    and raises ValueError when both set the same field or env var, even to equal values
    (``_merge_runtime_env``). The job's values are the user's explicit choice, so ours give
    way on those keys and the rest is merged: the job keeps its working_dir either way.
    """
    import json
    import os

    from ray._private.runtime_env.constants import RAY_JOB_CONFIG_JSON_ENV_VAR

    env = ray_runtime_env()
    injected = os.environ.get(RAY_JOB_CONFIG_JSON_ENV_VAR)
    if not injected:
        return env
    job_env = json.loads(injected).get("runtime_env") or {}
    taken = set(job_env.get("env_vars") or {})
    env_vars = {k: v for k, v in env.pop("env_vars", {}).items() if k not in taken}
    env = {k: v for k, v in env.items() if k not in job_env}
    if taken & set(REPORT_POLL_ENV):
        logger.info("the job's runtime_env sets %s: keeping the job's value",
                    sorted(taken & set(REPORT_POLL_ENV)))
    return {**env, "env_vars": env_vars} if env_vars else env


def worker_env(use_gpu: bool) -> dict[str, str]:
    """Env of the train workers: CPU DeepSpeed without a GPU, and the driver's offline/cache
    settings (a worker resolving a model must look where the driver looked)."""
    import os

    env = {"TOKENIZERS_PARALLELISM": "false"}
    if not use_gpu:
        env["DS_ACCELERATOR"] = "cpu"
    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HOME", "HF_HUB_CACHE",
                "CLO_RAY_CACHE"):
        if os.environ.get(key):
            env[key] = os.environ[key]
    return env


def default_run_name(spec: SweepSpec, model: str, languages: Sequence[str], method: str,
                     budget: int | Mapping[str, int]) -> str:
    """``<model label>-<langs>-<method>-<budget>``: stable, so a re-run resumes."""
    label = next((m.label for m in spec.models if m.name == model), None) or \
        model.removeprefix("builtin:").rstrip("/").rsplit("/", 1)[-1]
    size = "+".join(str(budget[lang]) for lang in languages) if isinstance(budget, Mapping) \
        else str(budget)
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{label}-{'+'.join(languages)}-{method}-{size}")


def run_training(spec: SweepSpec, *, model: str, languages: Sequence[str], method: str,
                 budget: int | Mapping[str, int], overrides: Mapping[str, Any] | None = None,
                 run_name: str | None = None, translations: Mapping[str, pa.Table] | None = None,
                 callbacks: Sequence[Any] = (), extra_config: Mapping[str, Any] | None = None,
                 storage_path: str | None = None) -> Any:
    """Train ``model`` on ``languages`` with ``method`` at ``budget`` pairs; the Ray Result.

    ``overrides``: search values (``lr``, ``beta``, ``schedule``, ...; see
    :func:`clo_ray.train.schedule.apply_overrides`). ``translations``: per-language tables
    (default: the translate stage's cached output). ``callbacks``: extra Ray Train RunConfig
    callbacks (Tune's ``TuneReportCallback``). ``extra_config``: loop keys such as
    ``stop_after_steps``. ``run_name``: the folder under ``<run.uri>/train``; a run of that
    name with a checkpoint is *resumed*, so trials of one cell with different overrides need
    their own names (Tune: the trial id); the default names one run per grid cell. Raises
    the run's error if it failed after its retries.
    """
    languages = list(languages)
    if not languages:
        raise TrainingError("at least one target language is needed")
    stages = method_stages(spec, method, overrides)
    pairs = prepare_pairs(spec, languages, budget, translations)
    config = loop_config(spec, model=model, languages=languages, stages=stages, pairs=pairs,
                         extra=extra_config)
    name = run_name or default_run_name(spec, model, languages, method, budget)
    trainer = build_trainer(spec, config, run_name=name, callbacks=callbacks,
                            storage_path=storage_path)
    logger.info("training %s: %d pairs (%d held out), %d stage(s), %d worker(s)", name,
                pairs.n_train, pairs.n_eval, len(stages), spec.resources.workers_per_trial)
    return trainer.fit()
