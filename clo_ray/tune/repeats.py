"""Repeats: each cell's chosen configuration trained again with other seeds, for error bars.

A search picks one configuration per cell; one training of it is one draw of the data order
and the budget's subsample. With ``search.repeats: N`` the sweep re-trains each cell's best
trial (by ``search.metric``) with N - 1 more seeds after the search (the search's own trial
is seed 0): repeat r trains on its own subsample of the same budget (:func:`clo_ray.data.
pairs.prepare_pairs` with ``repeat=r``) in its own order (:func:`clo_ray.data.pairs.
repeat_seed`), and is evaluated on the same held-out pairs and prompt sets. The report then
shows each cell's mean over the N trainings with a 95% interval, and the judge compares a
method's repeat r with SFT's repeat r of the same cell (paired seeds).

The repeats are a second Tune experiment (``<run>/repeats``) of fixed configurations
(``tune.grid_search``), run by the same trainable and resumed from storage like the search.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any

from clo_ray import storage
from clo_ray.data.pairs import PreparedPairs
from clo_ray.layout import RunLayout
from clo_ray.ray_env import trial_placement
from clo_ray.spec.schema import SweepSpec
from clo_ray.tune.trainable import run_trial
from clo_ray.tune.tuner import concurrent_trials, run_config

logger = logging.getLogger(__name__)


def repeat_configs(spec: SweepSpec, rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One config per (cell, repeat 1 .. N-1): the cell's best completed search trial's
    params (rows: results.parquet's, repeat 0 only), in the grid's order."""
    if spec.search.repeats < 2:
        return []
    metric, mode = spec.search.metric, spec.search.mode
    best: dict[tuple[Any, ...], Mapping[str, Any]] = {}
    for row in rows:
        if row["method"] == "base" or row["status"] != "completed" or row.get("repeat"):
            continue
        key = (row["model"], row["language"], row["method"], row["budget"])
        value = row.get(metric)
        if value is None:
            best.setdefault(key, row)  # a cell measured nothing: its first trial
            continue
        held = best.get(key)
        held_value = held.get(metric) if held is not None else None
        if held_value is None or (value > held_value if mode == "max" else value < held_value):
            best[key] = row
    configs = []
    for (model, language, method, budget), row in best.items():
        for repeat in range(1, spec.search.repeats):
            configs.append({"cell": {"model": model, "language": language, "method": method,
                                     "budget": budget},
                            "cell_trial": "best", "params": json.loads(row["params"] or "{}"),
                            "repeat": repeat, "repeat_of": row["trial_id"]})
    return configs


def repeats_exist(spec: SweepSpec, generation: int = 0) -> bool:
    """Whether the repeats' experiment of ``generation`` is in storage (to be restored)."""
    from ray import tune

    layout = RunLayout.of(spec)
    filesystem, fs_path = storage.resolve(layout.generation_folder("repeats", generation),
                                          layout.options)
    return bool(tune.Tuner.can_restore(fs_path, storage_filesystem=filesystem))


def build_repeat_tuner(spec: SweepSpec, configs: list[dict[str, Any]], *,
                       pairs: Mapping[str, PreparedPairs],
                       prompt_sets: Mapping[str, Mapping[str, str]] | None = None,
                       placement_timeout_s: float | None = None,
                       generation: int = 0, callbacks: Sequence[Any] = (),
                       verbose: int = 1) -> Any:
    """The repeats' ``ray.tune.Tuner`` (restored when it exists in storage; None when it does
    not and ``configs`` is empty). ``generation``: a grown sweep's experiment number."""
    from ray import tune

    trainable = tune.with_resources(
        tune.with_parameters(run_trial, spec_data=spec.model_dump(mode="json", by_alias=True),
                             pairs=dict(pairs), placement_timeout_s=placement_timeout_s,
                             prompt_sets={k: dict(v) for k, v in (prompt_sets or {}).items()}),
        trial_placement(spec))
    layout = RunLayout.of(spec)
    folder = layout.generation_folder("repeats", generation)
    filesystem, fs_path = storage.resolve(folder, layout.options)
    if tune.Tuner.can_restore(fs_path, storage_filesystem=filesystem):
        logger.info("resuming the repeats at %s", folder)
        return tune.Tuner.restore(fs_path, trainable, resume_errored=True,
                                  storage_filesystem=filesystem)
    if not configs:
        return None
    parent, name = fs_path.rsplit("/", 1)
    return tune.Tuner(
        trainable, param_space={"job": tune.grid_search(configs)},
        tune_config=tune.TuneConfig(max_concurrent_trials=concurrent_trials(spec)),
        run_config=run_config(name, parent, filesystem, callbacks, verbose))
