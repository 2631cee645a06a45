"""How our Ray processes are started: the driver's Ray, runtime envs, worker env vars.

One module for what every Ray entry point (sweep, translate, train) must agree on: which
cluster the driver joins, what the job-level runtime env carries (it reaches Ray Train's
controller, which a trainer's own options cannot), what train and evaluation workers inherit
(CPU DeepSpeed, the driver's offline and cache settings), and what must never be copied into
Ray's logs (cloud credentials).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from clo_ray import storage

if TYPE_CHECKING:
    from clo_ray.spec.schema import SweepSpec

logger = logging.getLogger(__name__)


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
    env = ray_runtime_env()
    job = submitted_job_config()
    if job is None:
        return env
    job_env = job.get("runtime_env") or {}
    taken = set(job_env.get("env_vars") or {})
    env_vars = {k: v for k, v in env.pop("env_vars", {}).items() if k not in taken}
    env = {k: v for k, v in env.items() if k not in job_env}
    if taken & set(REPORT_POLL_ENV):
        logger.info("the job's runtime_env sets %s: keeping the job's value",
                    sorted(taken & set(REPORT_POLL_ENV)))
    return {**env, "env_vars": env_vars} if env_vars else env


def submitted_job_config() -> dict[str, Any] | None:
    """The job config Ray hands a ``ray job submit`` entrypoint (its runtime env, and its
    metadata with the submission id), or None for a driver started any other way."""
    import json
    import os

    from ray._private.runtime_env.constants import RAY_JOB_CONFIG_JSON_ENV_VAR

    raw = os.environ.get(RAY_JOB_CONFIG_JSON_ENV_VAR)
    if not raw:
        return None
    try:
        config = json.loads(raw)
    except ValueError:
        return None
    return config if isinstance(config, dict) else None


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


def ray_address(address: str | None = None) -> str:
    """The cluster a driver joins: ``address`` (a CLI option), else RAY_ADDRESS (what
    ``ray job submit`` sets), else ``"local"``: a Ray of its own.

    Never Ray's own fallback, the last ``ray start`` on this host: a laptop sweep would silently
    run its trials on whatever cluster another user or test left running.
    """
    import os

    return address or os.environ.get("RAY_ADDRESS") or "local"


def start_ray(runtime_env: dict[str, Any], address: str | None = None, *,
              log_to_driver: bool = True) -> str:
    """Join the cluster :func:`ray_address` names, or start a local one that knows its own
    dashboard; returns a line saying which (the sweep prints it).

    Under ``ray job submit`` our env vars are merged into the job's runtime env (its
    working_dir stays). A local Ray gets RAY_API_SERVER_ADDRESS: Ray Train's placement-group
    cleaner frees a stopped trial's worker bundles (every trial ASHA stops) through the state
    API, which without an address guesses, and with several Ray instances on the host picks
    the wrong one or fails: the CPUs stay reserved and later trials wait forever.
    ``log_to_driver``: forward the workers' stdout/stderr here (Ray's switch; either way it is
    in the session's log folder, which the line names).
    """
    import socket

    import ray

    target = ray_address(address)
    if target != "local":
        context = ray.init(address=target, runtime_env=runtime_env,
                           log_to_driver=log_to_driver)
        how = f"joined the Ray cluster at {target}"
    else:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        env = {**runtime_env, "env_vars": {**runtime_env.get("env_vars", {}),
                                           "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}"}}
        context = ray.init(address="local", dashboard_host="127.0.0.1", dashboard_port=port,
                           runtime_env=env, log_to_driver=log_to_driver)
        how = "started a local Ray cluster (set RAY_ADDRESS or --address to join another)"
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    have = ray.cluster_resources()
    info = getattr(context, "address_info", {})
    line = (f"ray: {how}; gcs {info.get('gcs_address', '?')}, {len(nodes)} node(s), "
            f"{have.get('CPU', 0):g} CPUs, {have.get('GPU', 0):g} GPUs")
    if not log_to_driver and info.get("session_dir"):
        line += f"\nray: the workers' output is in {info['session_dir']}/logs (each node's)"
    return line


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


def trial_resources(spec: SweepSpec) -> dict[str, float]:
    """What the trial's own process holds: one CPU (Ray refuses 0) plus
    ``resources.trial_resources``; the train workers ask for theirs (``resources``) when the
    TorchTrainer starts them."""
    return {"CPU": 1.0, **spec.resources.trial_resources}


def trial_placement(spec: SweepSpec) -> Any:
    """What Tune reserves for one trial: :func:`trial_resources` as a one-bundle placement
    group whose bundle carries ``resources.trial_labels`` as Ray's label selector, so the
    trial (and the Train controller Ray V2 pins to the trial's node) starts only on nodes
    with those labels, e.g. on-demand ones; with autoscaler v2 an unmet selector scales up a
    node type that has them."""
    from ray.tune import PlacementGroupFactory

    labels = dict(spec.resources.trial_labels)
    return PlacementGroupFactory([trial_resources(spec)],
                                 bundle_label_selector=[labels] if labels else None)
