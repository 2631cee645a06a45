"""Checks a sweep runs before it spends anything: model references, then cluster capacity.

Both fail in seconds with every problem named. Without them a misspelt model surfaces only
in a trial's Ray log after Ray start, translation and pairs (minutes), and a worker that no
node can hold (``gpus_per_worker: 8`` on a CPU box) leaves Ray Train retrying its placement
forever: Train V2 treats a worker group that cannot start as retryable, without a limit.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

from clo_ray.errors import CloRayError, ModelResolutionError, SpecError
from clo_ray.models.resolve import check_model_reference
from clo_ray.ray_env import trial_resources
from clo_ray.spec.schema import SweepSpec


class ClusterCapacityError(CloRayError):
    """A trial needs more than the cluster can ever provide (at its largest size)."""


def model_references(spec: SweepSpec) -> list[tuple[str, str, str | None]]:
    """``(yaml path, reference, revision)`` of every model the sweep will load."""
    refs: list[tuple[str, str, str | None]] = [
        (f"models[{i}].name", m.name, m.revision) for i, m in enumerate(spec.models)]
    if spec.translator.backend != "parallel" and spec.translator.model:
        refs.append(("translator.model", spec.translator.model, None))
    judge = spec.evaluation.judge
    if judge.enabled and judge.model and judge.backend != "endpoint":
        refs.append(("evaluation.judge.model", judge.model, None))
    return refs


def judge_problems(spec: SweepSpec) -> list[str]:
    """``<yaml path>: <why>`` for each environment variable the endpoint judge names but the
    driver's environment lacks: found at start, not after days of training."""
    judge = spec.evaluation.judge
    if not judge.enabled or judge.backend != "endpoint" or judge.endpoint is None:
        return []
    problems = []
    for field in ("base_url_env", "model_env", "api_key_env"):
        name = getattr(judge.endpoint, field)
        if name is not None and not os.environ.get(name):
            problems.append(f"evaluation.judge.endpoint.{field}: the environment variable "
                            f"{name} is not set where the sweep's driver runs (the judge "
                            "stage reads it after the tune stage)")
    return problems


def model_problems(spec: SweepSpec) -> list[str]:
    """``<yaml path>: <why>`` for each model reference that will not resolve (no download)."""
    problems = []
    for where, ref, revision in model_references(spec):
        try:
            check_model_reference(ref, revision=revision)
        except ModelResolutionError as err:
            problems.append(f"{where}: {err}")
    return problems + judge_problems(spec)


def check_models(spec: SweepSpec, label: str) -> None:
    """Raise one SpecError naming each model reference that will not resolve (and each
    judge endpoint variable that is not set)."""
    if problems := model_problems(spec):
        raise SpecError(f"spec {label}: {len(problems)} model reference"
                        f"{'s' if len(problems) > 1 else ''} or setting"
                        f"{'s' if len(problems) > 1 else ''} will not resolve:\n  "
                        + "\n  ".join(problems))


@dataclass(frozen=True)
class NodeShape:
    """One kind of node: its resources and how many the cluster has or may grow to
    (``count`` is ``math.inf`` for an unbounded node type)."""

    resources: dict[str, float]
    count: float
    labels: dict[str, str] | None = None  # None: not known (the autoscaler's node types)


def selector_matches(selector: dict[str, str], labels: dict[str, str] | None) -> bool:
    """Whether a node with ``labels`` satisfies a Ray label selector (``value``, ``!value``,
    ``in(a,b)``, ``!in(a,b)``); unknown labels satisfy any selector."""
    if labels is None:
        return True
    for key, condition in selector.items():
        negated = condition.startswith("!")
        condition = condition[1:] if negated else condition
        if condition.startswith("in(") and condition.endswith(")"):
            allowed = {v.strip() for v in condition[3:-1].split(",")}
        else:
            allowed = {condition}
        if (labels.get(key) in allowed) == negated:
            return False
    return True


def cluster_shapes() -> tuple[list[NodeShape], str]:
    """The nodes the connected cluster can ever have, and where that came from: the
    autoscaler's node types at their ``max_count`` when it has a config, else the live nodes."""
    import ray
    from ray._private.state import state

    try:
        config = state.get_cluster_config()
    except Exception:  # noqa: BLE001 - an older GCS without the key: fall back to live nodes
        config = None
    if config is not None and config.node_group_configs:
        shapes = [NodeShape(dict(group.resources),
                            math.inf if group.max_count < 0 else float(group.max_count))
                  for group in config.node_group_configs]
        return shapes, "the autoscaler's node types at their max_count"
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    return ([NodeShape({k: float(v) for k, v in n["Resources"].items()}, 1.0,
                       dict(n.get("Labels") or {})) for n in nodes],
            f"the {len(nodes)} live node(s) of a cluster without an autoscaler")


def check_capacity(spec: SweepSpec, shapes: list[NodeShape], source: str) -> None:
    """Raise ClusterCapacityError when one trial cannot be placed on ``shapes`` at all: its
    own actor (``trial_resources``) on one node, ``workers_per_trial`` worker bundles over the
    nodes, and the CPUs of both together."""
    res = spec.resources
    bundle = {"CPU": res.cpus_per_worker, **({"GPU": res.gpus_per_worker}
                                             if res.gpus_per_worker else {})}
    actor = trial_resources(spec)
    problems = []

    def fits(need: dict[str, float], have: dict[str, float]) -> float:
        return min((math.floor(have.get(k, 0.0) / v + 1e-9) for k, v in need.items() if v > 0),
                   default=math.inf)

    workers_on = [s for s in shapes if selector_matches(res.worker_labels, s.labels)]
    bundles = sum(fits(bundle, s.resources) * s.count for s in workers_on
                  if fits(bundle, s.resources))
    if bundles < res.workers_per_trial:
        problems.append(f"a trial needs {res.workers_per_trial} train worker(s) of "
                        f"{_show(bundle)} (resources.workers_per_trial, cpus_per_worker, "
                        f"gpus_per_worker{', worker_labels' if res.worker_labels else ''}),"
                        f" but {source} hold only {bundles:g}")
    if not any(fits(actor, s.resources) >= 1 and selector_matches(res.trial_labels, s.labels)
               for s in shapes):
        labels = f" with labels {res.trial_labels}" if res.trial_labels else ""
        problems.append(f"a trial's own process needs {_show(actor)} on one node{labels} "
                        "(resources.trial_resources plus 1 CPU, resources.trial_labels), "
                        "which no node has")
    cpus = sum(s.resources.get("CPU", 0.0) * s.count for s in shapes)
    need_cpus = actor["CPU"] + res.workers_per_trial * res.cpus_per_worker
    if need_cpus > cpus:
        problems.append(f"a trial needs {need_cpus:g} CPUs in all (1 for the trial + "
                        f"{res.workers_per_trial} x {res.cpus_per_worker:g} for its workers), "
                        f"but {source} have {cpus:g}")
    if problems:
        largest = max(shapes, key=lambda s: s.resources.get("CPU", 0.0), default=None)
        raise ClusterCapacityError(
            "this cluster can never run a trial of this sweep:\n  - " + "\n  - ".join(problems)
            + (f"\n  (largest node: {_show(largest.resources)})" if largest else "")
            + "\n  Lower the resources section, or run on a cluster that has such nodes "
              "(clusters/*.yaml).")


def _show(resources: dict[str, Any]) -> str:
    shown = {k: v for k, v in sorted(resources.items())
             if not k.startswith(("node:", "accelerator_type:")) and k != "object_store_memory"
             and k != "memory"}
    return "{" + ", ".join(f"{k}: {float(v):g}" for k, v in shown.items()) + "}"
