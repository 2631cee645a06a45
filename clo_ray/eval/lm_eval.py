"""lm-evaluation-harness tasks on an exported model: the adapter behind ``evaluation.lm_eval``.

The paper checks that CLO keeps general ability (MMMLU, BELEBELE); lm-evaluation-harness
runs such tasks, so a trial can report them next to its own metrics. This module calls its
Python API (``TaskManager`` + ``simple_evaluate`` with the ``hf`` model) on a model directory
and flattens the result into metric names, so callers never see lm-eval's nested dict.

Metric names (the contract with Tune, results.parquet and the report):

- ``lm_eval.<task>``: the task's main metric, i.e. the first entry of its ``metric_list``
  that it reported (``acc`` for multiple-choice tasks like BELEBELE and Global-MMLU); for a
  group (``global_mmlu_full_sw``), ``acc`` when aggregated, else its first metric;
- ``lm_eval.<task>.<metric>`` for every number the task reports (``acc``, ``acc_norm``,
  ``exact_match.strict-match`` when a filter other than lm-eval's ``none`` produced it);
  standard errors are left out (``N/A`` under ``limit``, and not a quality).

Why dots, not lm-eval's ``acc,none`` or ``task/acc``: Tune reads ``/`` as nesting (a flat
``a/b`` key is unflattened into ``{"a": {"b": ...}}`` by its dataframe helpers), MLflow, a
common Tune callback, refuses ``,`` and ``:`` in metric names, and parquet, Optuna and
pandas take dots as plain characters. Task names therefore may not contain dots (checked in
the spec).

Errors a user can cause are :class:`LmEvalError`, raised *before* any model loads: lm-eval
not installed, an unknown task (with close names), a missing ``include_path``. A dataset
that cannot be read offline is reported as such with the task names. With ``cache_uri`` the
result is stored as ``lm_eval.json`` (atomic, fingerprinted by model key, tasks, task YAMLs
and settings) and a re-run reads it instead of loading the model.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import json
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from clo_ray import checked, storage
from clo_ray.benchmarks import benchmark_tasks
from clo_ray.errors import CloRayError
from clo_ray.spec.evaluation import EvaluationSection, LmEvalSection
from clo_ray.storage import StorageOptions

logger = logging.getLogger(__name__)

PREFIX = "lm_eval."
LM_EVAL_FILE = "lm_eval.json"
CACHE_FORMAT = 1


class LmEvalError(CloRayError, RuntimeError):
    """lm-eval cannot run what the spec asks (not installed, unknown task, unreadable data)."""


@dataclass(frozen=True)
class LmEvalResult:
    """Flat metrics (see the module docstring) and examples evaluated per leaf task."""

    metrics: dict[str, float]
    samples: dict[str, int]
    seconds: float


def metric_name(task: str, metric: str | None = None) -> str:
    """``lm_eval.<task>`` or ``lm_eval.<task>.<metric>`` (the naming above)."""
    return f"{PREFIX}{task}" if metric is None else f"{PREFIX}{task}.{metric}"


def run_lm_eval(model_dir: str | Path, section: LmEvalSection, *,
                cache_uri: str | None = None, model_key: str | None = None,
                storage_options: StorageOptions = None,
                device: str | None = None) -> LmEvalResult:
    """Run ``section.tasks`` on the Hugging Face model in ``model_dir``; flat metrics back.

    ``model_key`` names the weights in the cache fingerprint (default ``model_dir``: pass the
    checkpoint URI when the model is exported to a temporary folder). ``device``: default
    ``cuda`` when torch sees a GPU, else ``cpu``.
    """
    if not section.tasks:
        raise LmEvalError("evaluation.lm_eval.tasks is empty: name at least one task")
    simple_evaluate, task_manager = _prepare(section)  # fails before any model loads
    fingerprint = _fingerprint(model_key or str(model_dir), section)
    if cache_uri is not None and (hit := _read_cache(cache_uri, fingerprint, storage_options)):
        logger.info("lm-eval cache hit: %s", cache_uri)
        return hit
    started = time.perf_counter()
    try:
        raw = simple_evaluate(
            model="hf", model_args={"pretrained": str(model_dir)}, tasks=list(section.tasks),
            task_manager=task_manager, num_fewshot=section.num_fewshot, limit=section.limit,
            batch_size=section.batch_size, device=device or _default_device(),
            apply_chat_template=section.apply_chat_template, log_samples=False,
            bootstrap_iters=0)
    except Exception as err:
        if _is_data_error(err):
            raise LmEvalError(f"lm-eval could not read the data of task(s) {section.tasks}: "
                              f"{err}. Offline, a task's dataset must be in the Hugging Face "
                              "cache already, or be a task of your own (include_path) whose "
                              "YAML reads local files (dataset_path: json, dataset_kwargs: "
                              "{data_files: ...})") from err
        raise
    result = flatten_results(raw, section.tasks, seconds=time.perf_counter() - started)
    logger.info("lm-eval on %s: %s in %.1f s", model_dir,
                {k: round(v, 4) for k, v in result.metrics.items() if k.count(".") == 1},
                result.seconds)
    if cache_uri is not None:
        checked.write_fingerprinted(storage.join(cache_uri, LM_EVAL_FILE), fingerprint,
                                    asdict(result), storage_options)
    return result


def run_benchmarks(model_dir: str | Path, evaluation: EvaluationSection, language: str, *,
                   cache_uri: str, model_key: str, storage_options: StorageOptions = None
                   ) -> dict[str, float]:
    """``evaluation.benchmarks`` in ``language`` and English: one lm-eval run per number of
    shots (MMMLU 0, BELEBELE 1), each cached in its own folder. Returns every task's
    ``lm_eval.*`` metrics plus ``benchmark.<name>`` (the target-language task's main metric)
    and ``benchmark.<name>.en`` (English's), so tables and objectives can name a benchmark
    whatever the language."""
    tasks = benchmark_tasks(evaluation.benchmarks, language, evaluation.benchmark_shots)
    metrics: dict[str, float] = {}
    for shots in sorted({t.shots for t in tasks}):
        names = list(dict.fromkeys(t.task for t in tasks if t.shots == shots))
        section = evaluation.lm_eval.model_copy(update={"tasks": names, "num_fewshot": shots})
        metrics.update(run_lm_eval(model_dir, section, model_key=model_key,
                                   cache_uri=storage.join(cache_uri, f"benchmarks-{shots}shot"),
                                   storage_options=storage_options).metrics)
    for task in tasks:
        side = "" if task.language == language else ".en"
        metrics[f"benchmark.{task.benchmark}{side}"] = metrics[metric_name(task.task)]
    return metrics


def flatten_results(raw: Mapping[str, Any], tasks: Sequence[str], *,
                    seconds: float = 0.0) -> LmEvalResult:
    """lm-eval's result dict -> :class:`LmEvalResult` for the tasks asked for."""
    results, configs = raw.get("results", {}), raw.get("configs", {})
    metrics: dict[str, float] = {}
    for task in tasks:
        values: dict[str, float] = {}
        for key, value in results.get(task, {}).items():
            if "," not in key or "_stderr" in key or not _is_number(value):
                continue
            name, filter_name = key.split(",", 1)
            values[name if filter_name == "none" else f"{name}.{filter_name}"] = float(value)
        if not values:
            raise LmEvalError(f"lm-eval returned no metric for task {task!r} (got "
                              f"{sorted(results.get(task, {}))}): is it a task that "
                              "computes metrics (not predict-only)?")
        metrics[metric_name(task)] = values[_main_metric(values, configs.get(task))]
        metrics.update({metric_name(task, m): v for m, v in values.items()})
    samples = {task: int(n["effective"]) for task, n in raw.get("n-samples", {}).items()}
    return LmEvalResult(metrics, samples, seconds)


# ------------------------------------------------------------------------------ steps


def _prepare(section: LmEvalSection) -> tuple[Any, Any]:
    """lm-eval's ``simple_evaluate`` and a TaskManager that knows every task asked for."""
    try:
        from lm_eval import simple_evaluate
        from lm_eval.tasks import TaskManager
    except ImportError as err:
        raise LmEvalError(f"evaluation.lm_eval needs lm-evaluation-harness ({err}): install "
                          "it with `pip install 'clo-ray[lmeval]'` where trials run, or "
                          "empty evaluation.lm_eval.tasks") from err
    include = section.include_path
    if include is not None and not Path(include).expanduser().is_dir():
        raise LmEvalError(f"evaluation.lm_eval.include_path {include!r} is not a folder here "
                          f"(cwd {Path.cwd()}): give a local folder of task YAMLs")
    manager = _task_manager(TaskManager, include, tuple(_task_yamls(include).items()))
    known = set(manager.all_tasks)
    unknown = [t for t in section.tasks if t not in known]
    if unknown:
        hints = {t: difflib.get_close_matches(t, manager.all_tasks, n=3) for t in unknown}
        raise LmEvalError(
            f"unknown lm-eval task(s) {unknown}"
            + "".join(f"; {t!r}: did you mean {', '.join(h)}?" for t, h in hints.items() if h)
            + (f" (searched lm-eval's tasks and {include})" if include else
               " (a task of your own needs evaluation.lm_eval.include_path)"))
    return simple_evaluate, manager


@functools.lru_cache(maxsize=4)
def _task_manager(factory: Any, include: str | None, yamls: tuple[tuple[str, str], ...]) -> Any:
    """One TaskManager per include folder *content* (``yamls``: an edited YAML is a new key):
    indexing lm-eval's ~15k task YAMLs takes seconds, and a process may evaluate often."""
    return factory(include_path=str(Path(include).expanduser()) if include else None)


def _task_yamls(include: str | None) -> dict[str, str]:
    """sha256 of every task YAML under ``include``, by relative path."""
    if not include:
        return {}
    root = Path(include).expanduser()
    return {str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(root.rglob("*.y*ml"))}


def _main_metric(values: Mapping[str, float], config: Mapping[str, Any] | None) -> str:
    listed = [m.get("metric") for m in (config or {}).get("metric_list", []) or []
              if isinstance(m, Mapping)]
    for name in [*listed, "acc"]:  # a filtered metric counts: exact_match.strict-match
        found = [v for v in values if isinstance(name, str) and v.split(".")[0] == name]
        if found:
            return found[0]
    return next(iter(values))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) \
        and math.isfinite(value)


def _is_data_error(err: BaseException) -> bool:
    """A dataset that is not there (offline hub, missing file), as opposed to a bug."""
    module = type(err).__module__ or ""
    return isinstance(err, (FileNotFoundError, ConnectionError)) or module.startswith(
        ("datasets", "huggingface_hub"))


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


# ------------------------------------------------------------------------------ cache


def _fingerprint(model_key: str, section: LmEvalSection) -> str:
    """sha256 of the weights' key, the settings, lm-eval's version and the user's task YAMLs
    (an edited YAML must miss); ``batch_size`` does not change results, so it is left out."""
    from importlib.metadata import version

    yamls = _task_yamls(section.include_path)
    payload = {"format": CACHE_FORMAT, "model": model_key, "lm_eval": version("lm_eval"),
               "section": section.model_dump(mode="json", exclude={"batch_size"}),
               "yamls": yamls}
    text = json.dumps(payload, sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _read_cache(uri: str, fingerprint: str,
                storage_options: StorageOptions) -> LmEvalResult | None:
    result = checked.read_fingerprinted(storage.join(uri, LM_EVAL_FILE), fingerprint,
                                        storage_options)
    return None if result is None else LmEvalResult(**result)
