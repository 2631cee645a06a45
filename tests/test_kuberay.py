"""The KubeRay manifests in clusters/kuberay/: the cluster they describe (autoscaling GPU
groups, labels, priorities, idle timeouts, as Ray's own KubeRay reader sees them), the RayJob
that runs the paper sweep on that same cluster and retries, and that both stay private and
authenticated. Their CRD validation is tests/test_kuberay_crds.py."""

from __future__ import annotations

import json
import re
from typing import Any

import yaml
from cluster_files import RAYCLUSTER, RAYJOB, ROOT, docs, kind, walk

ENTRYPOINT = re.compile(r"^python -m clo_ray\.sweep (sweeps/[\w./-]+\.ya?ml)$")


def _groups(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [spec["headGroupSpec"], *spec["workerGroupSpecs"]]


def _containers(group: dict[str, Any]) -> list[dict[str, Any]]:
    return group["template"]["spec"]["containers"]


def _start_resources(group: dict[str, Any]) -> dict[str, float]:
    """rayStartParams.resources as KubeRay passes it: '"{\\"name\\": n}"'."""
    raw = group.get("rayStartParams", {}).get("resources")
    if raw is None:
        return {}
    return json.loads(raw.strip().strip('"').replace('\\"', '"'))


def test_raycluster_autoscales_with_gpu_groups():
    cluster = kind(RAYCLUSTER, "RayCluster")
    assert cluster["apiVersion"] == "ray.io/v1"
    spec = cluster["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["autoscalerOptions"]["version"] == "v2"  # scales for label selectors
    assert spec["headGroupSpec"]["resources"] == {"CPU": "0"}
    assert not any("nvidia.com/gpu" in c["resources"]["limits"]
                   for c in _containers(spec["headGroupSpec"]))
    gpu_counts = []
    for group in spec["workerGroupSpecs"]:
        assert 0 <= group["minReplicas"] <= group["maxReplicas"], group["groupName"]
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        pod = group["template"]["spec"]
        limits = pod["containers"][0]["resources"]["limits"]
        spot = pod.get("nodeSelector", {}).get("cloud.google.com/gke-spot") == "true"
        assert group["labels"]["clo-ray/capacity"] == ("spot" if spot else "on-demand")
        assert group["labels"]["ray.io/market-type"] == ("spot" if spot else "on-demand")
        assert group.get("priority", 0) == (10 if spot else 0), group["groupName"]
        assert group["idleTimeoutSeconds"] > 0 and not _start_resources(group)
        if "nvidia.com/gpu" not in limits:
            continue
        gpus = int(limits["nvidia.com/gpu"])
        gpu_counts.append(gpus)
        assert pod["containers"][0]["resources"]["requests"]["nvidia.com/gpu"] == str(gpus)
        assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"]), group["groupName"]
        assert "cloud.google.com/gke-accelerator" in pod["nodeSelector"], group["groupName"]
    assert 8 in gpu_counts and any(g < 8 for g in gpu_counts)


def test_rayjob_runs_the_paper_sweep_on_the_same_cluster_spec():
    job = kind(RAYJOB, "RayJob")
    assert job["apiVersion"] == "ray.io/v1"
    spec = job["spec"]
    match = ENTRYPOINT.match(spec["entrypoint"])
    assert match and match.group(1) == "sweeps/paper.yaml", spec["entrypoint"]
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert runtime_env["working_dir"].endswith(".zip")  # one commit of the repo, unpacked
    assert any("clo-ray[vllm]" in p for p in runtime_env["pip"]["packages"])
    # vLLM + CUDA torch per node take longer than Ray's default 600 s setup timeout
    assert runtime_env["config"]["setup_timeout_seconds"] >= 1200
    assert spec["shutdownAfterJobFinishes"] is True
    # unattended recovery: retried on a new cluster, resuming with no flag a human must add
    # (tests/test_job_submit.py kills head and driver and re-submits the same entrypoint)
    assert spec["backoffLimit"] >= 1 and "--takeover" not in spec["entrypoint"]
    # an attempt may spend the runtime_env's whole setup timeout before it is RUNNING
    assert spec["preRunningDeadlineSeconds"] > runtime_env["config"]["setup_timeout_seconds"]
    # The RayJob's cluster is exactly the RayCluster manifest's spec (no drift between them).
    assert spec["rayClusterSpec"] == kind(RAYCLUSTER, "RayCluster")["spec"]
    assert kind(RAYJOB, "ServiceAccount") == kind(RAYCLUSTER, "ServiceAccount")


def test_kuberay_is_private_and_authenticated():
    clusters = [kind(RAYCLUSTER, "RayCluster")["spec"],
                kind(RAYJOB, "RayJob")["spec"]["rayClusterSpec"]]
    for cluster in clusters:
        assert cluster["authOptions"]["mode"] == "token"
        assert cluster["headGroupSpec"]["serviceType"] == "ClusterIP"
    for manifest in (RAYCLUSTER, RAYJOB):
        found = docs(manifest)
        assert not any(d["kind"] in ("Ingress", "Service", "Route") for d in found)
        for doc in found:
            for path, key, value in walk(doc):
                assert not (key == "serviceType" and value != "ClusterIP"), path
                assert not (key == "hostNetwork" and value), path
                assert key != "hostPort", path
                assert not (key == "dashboard-host" and value not in ("127.0.0.1", "localhost"))


def test_rays_kuberay_reader_sees_labels_priorities_and_idle_timeouts():
    """The RayCluster as Ray's own autoscaler reads it (the converter KubeRay's autoscaler
    sidecar runs): head CPU 0, the paper trial's label selector met only by on-demand groups,
    spot groups preferred, a GPU node kept longer when idle than a CPU one."""
    from ray.autoscaler._private.kuberay.autoscaling_config import (
        _derive_autoscaling_config_from_ray_cr,
    )

    from clo_ray.spec.schema import load_spec
    from clo_ray.sweep.preflight import selector_matches

    cluster = kind(RAYCLUSTER, "RayCluster")
    cluster["metadata"]["namespace"] = "default"  # the API server fills it in
    types = _derive_autoscaling_config_from_ray_cr(cluster)["available_node_types"]
    assert types["headgroup"]["resources"]["CPU"] == 0
    selector = load_spec(ROOT / "sweeps" / "paper.yaml").resources.trial_labels
    hosts = {name for name, t in types.items() if name != "headgroup"
             and selector_matches(selector, t["labels"])}
    assert hosts == {"cpu-ondemand", "gpu8-ondemand"}
    assert types["gpu8-spot"]["priority"] > types["gpu8-ondemand"].get("priority", 0)
    assert types["gpu8-spot"]["idle_timeout_s"] > types["cpu-ondemand"]["idle_timeout_s"]
    assert types["gpu8-spot"]["resources"]["GPU"] == 8
