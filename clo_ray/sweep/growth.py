"""Sweeps that grow: a spec that only extends the grid continues an existing run.

A run folder records its spec. Re-running with another spec under the same name is allowed
when the new spec only *adds* work: more budgets, languages, models or methods (with their
schedules), more trials per cell, more repeats, more prompt sets or benchmarks. Each such
spec is a *generation* of the run with its own Tune experiment (``tune``, ``tune-grow-1``,
...; repeats likewise): finished
generations are restored, never re-run, and the newest one gets only the trials the earlier
ones lack, its per-cell searchers replaying the earlier trials of a cell they extend.
Everything that would change what finished work means (a schedule, the data, a seed, the
evaluation's settings, a model's revision) is refused, naming each key with its old and new value.

An added prompt set or benchmark is measured on the finished trials by a post-hoc pass over
their checkpoints (:mod:`clo_ray.eval.added`), not by re-training them; new trials measure it
as part of their own evaluation.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from typing import Any

from clo_ray.errors import SpecError
from clo_ray.layout import RunLayout
from clo_ray.ray_env import submitted_job_config
from clo_ray.spec.grid import Cell
from clo_ray.spec.schema import SweepSpec, load_spec, spec_hash

# Lists that may gain entries (old entries kept, in any order), by their path in the spec.
GROWABLE_LISTS = (("budgets",), ("languages",), ("models",), ("methods",),
                  ("evaluation", "prompt_sets"), ("evaluation", "benchmarks"),
                  ("evaluation", "judge", "prompt_sets"))
# Counts that may go up.
GROWABLE_COUNTS = (("search", "trials_per_cell"), ("search", "repeats"))


def _show(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, ensure_ascii=False)
    return text if len(text) <= 80 else text[:77] + "..."


def _differences(old: Any, new: Any, path: str) -> Iterator[str]:
    """``key: old -> new`` for every leaf that differs (dicts and same-length lists recursed)."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new), key=str):
            where = f"{path}.{key}" if path else str(key)
            if key not in new:
                yield f"{where}: {_show(old[key])} -> (removed)"
            elif key not in old:
                yield f"{where}: (absent) -> {_show(new[key])}"
            else:
                yield from _differences(old[key], new[key], where)
    elif isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        for i, (was, now) in enumerate(zip(old, new, strict=True)):
            yield from _differences(was, now, f"{path}[{i}]")
    elif old != new:
        yield f"{path}: {_show(old)} -> {_show(new)}"


def _plain(data: Mapping[str, Any]) -> dict[str, Any]:
    """A deep copy as plain JSON data (what the spec record holds)."""
    copied: dict[str, Any] = json.loads(json.dumps(data))
    return copied


def growth_problems(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """Why ``new`` (a spec dump) is not ``old`` plus more grid: one line per differing key.

    Both are ``SweepSpec.model_dump(mode="json", by_alias=True)`` of validated specs (defaults
    filled in), with ``run.storage`` ignored (it names the folder, see ``spec_hash``).
    """
    old, new = _plain(old), _plain(new)
    for data in (old, new):
        data.get("run", {}).pop("storage", None)
    problems = _shots_problems(old, new)  # before the benchmark lists are popped
    for path in GROWABLE_LISTS:
        key = ".".join(path)
        was, now = _parent(old, path), _parent(new, path)
        if not (isinstance(was.get(path[-1]), list) and isinstance(now.get(path[-1]), list)):
            continue  # absent or null (judge.prompt_sets: every set): compared as a value below
        was, now = was.pop(path[-1]), now.pop(path[-1])
        for entry in (e for e in was if e not in now):
            name = entry.get("name") if isinstance(entry, dict) else None
            same = [e for e in now if isinstance(e, dict) and name and e.get("name") == name]
            if same:  # a model (or method) changed in place: name its keys
                problems += list(_differences(entry, same[0], f"{key}[{name}]"))
            else:
                problems.append(f"{key}: {_show(was)} -> {_show(now)} (removes "
                                f"{_show(entry)})")
    for section, key in GROWABLE_COUNTS:
        was, now = old.get(section, {}).pop(key, 1), new.get(section, {}).pop(key, 1)
        if now < was:
            problems.append(f"{section}.{key}: {was} -> {now} (only more is growth)")
    was_schedules, now_schedules = old.pop("schedules", {}), new.pop("schedules", {})
    for name, stages in was_schedules.items():
        if name not in now_schedules:
            problems.append(f"schedules.{name}: removed")
        else:
            problems += list(_differences(stages, now_schedules[name], f"schedules.{name}"))
    problems += list(_differences(old, new, ""))
    return problems


def _parent(data: dict[str, Any], path: tuple[str, ...]) -> dict[str, Any]:
    """The dict holding ``path``'s last key (an empty one when a parent is missing)."""
    for key in path[:-1]:
        child = data.get(key)
        data = child if isinstance(child, dict) else {}
    return data


def _shots_problems(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``evaluation.benchmark_shots`` may gain entries for added benchmarks only."""
    was = old.get("evaluation", {}).pop("benchmark_shots", {})
    now = new.get("evaluation", {}).pop("benchmark_shots", {})
    kept = old.get("evaluation", {}).get("benchmarks") or []
    problems = list(_differences(was, {k: v for k, v in now.items() if k in was},
                                 "evaluation.benchmark_shots"))
    for name in sorted(set(now) - set(was)):
        if name in kept:
            problems.append(f"evaluation.benchmark_shots.{name}: (default) -> {now[name]} "
                            "(a benchmark the run already measured)")
    return problems


JOB_DIR = "${ray_job_working_dir}"


def job_working_dir() -> str | None:
    """The working directory of a Ray job whose runtime env ships one (``ray job submit
    --working-dir``, a RayJob's ``working_dir``): Ray unpacks it to a new session folder on
    every head, so a retried or re-submitted job sees its files under another path."""
    config = submitted_job_config() or {}
    if not (config.get("runtime_env") or {}).get("working_dir"):
        return None
    return os.getcwd()


def _map_strings(data: Any, change: Any) -> Any:
    """``data`` (JSON-like) with ``change`` applied to every string in it."""
    if isinstance(data, dict):
        return {k: _map_strings(v, change) for k, v in data.items()}
    if isinstance(data, list):
        return [_map_strings(v, change) for v in data]
    return change(data) if isinstance(data, str) else data


def portable_paths(data: Any, here: str | None) -> Any:
    """``data`` with local paths inside the job's working dir ``here`` written from
    :data:`JOB_DIR`: what the spec record and its hash hold, so the same spec submitted again
    (a RayJob retry on a new cluster) is the same run. Unchanged when not a job."""
    if here is None:
        return data
    root = here.rstrip("/")
    return _map_strings(data, lambda s: JOB_DIR + s[len(root):]
                        if s == root or s.startswith(root + "/") else s)


def local_paths(data: Any, here: str) -> Any:
    """The inverse of :func:`portable_paths` for this process's working dir ``here``."""
    root = here.rstrip("/")
    return _map_strings(data, lambda s: root + s[len(JOB_DIR):] if s.startswith(JOB_DIR) else s)


def claim_run(spec: SweepSpec) -> list[SweepSpec]:
    """Record the spec in the run folder; returns the run's generations as validated specs
    (oldest first, ``spec`` last). Refuses a spec that is not the recorded one plus more grid.
    """
    layout = RunLayout.of(spec)
    record = layout.read_spec_record()
    data = portable_paths(spec.model_dump(mode="json", by_alias=True), job_working_dir())
    digest = spec_hash(spec, data)
    if record is None:
        layout.write_spec_record(digest, data)
        return [spec]
    old_hash, old_data = record
    generations = layout.read_generations()
    hashes = [g.get("spec_hash") for g in generations]
    if old_hash != digest and digest in hashes:
        raise SpecError(f"run {spec.run.name!r} at {layout.uri} has grown past this spec (it "
                        f"is generation {hashes.index(digest) + 1} of {len(hashes)}): re-run "
                        f"the latest spec, recorded in {layout.spec_record}")
    if old_hash != digest:
        problems = growth_problems(old_data, data)
        if problems:
            raise SpecError(
                f"run {spec.run.name!r} at {layout.uri} was started with a different spec "
                f"(hash {old_hash}, this one {digest}), and the change is more than added grid "
                f"(budgets, languages, models, methods, trials per cell, repeats, prompt "
                f"sets, benchmarks):\n  "
                + "\n  ".join(problems)
                + "\ngive this sweep a new run.name, or delete that folder to start over")
        generations.append({"spec_hash": digest, "spec": data})
        layout.write_spec_record(digest, data, generations)
    return [_generation_spec(g["spec"], spec) for g in generations[:-1]] + [spec]


def _generation_spec(data: dict[str, Any], current: SweepSpec) -> SweepSpec:
    """An earlier generation's spec, validated again, stored where the run is now."""
    data = local_paths(_plain(data), os.getcwd())
    data["run"]["storage"] = current.run.storage
    data["run"]["storage_options"] = dict(current.run.storage_options)
    return load_spec(data)


def finished_by_cell(rows: list[dict[str, Any]], metrics: list[str]) -> dict[str, list[dict]]:
    """Search trials of earlier generations per cell key, as :class:`CellSearcher` keeps them
    (``params`` as Optuna saw them, ``values`` of the searched metrics, 1-based ``index``)."""
    from clo_ray.tune.searcher import encode_params  # ray and optuna: not on --plan's path

    out: dict[str, list[dict]] = {}
    for row in rows:
        if row["method"] == "base" or row.get("repeat"):
            continue
        key = Cell(row["model"], row["language"], row["method"], row["budget"]).key
        values = [row.get(m) for m in metrics]
        done = row["status"] == "completed" and all(isinstance(v, (int, float)) for v in values)
        entries = out.setdefault(key, [])
        entries.append({"params": encode_params(json.loads(row["params"] or "{}")),
                        "values": [float(v) for v in values if v is not None] if done else None,
                        "index": len(entries) + 1})
    return out
