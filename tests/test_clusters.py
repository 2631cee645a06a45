"""The cluster configs in clusters/: valid for Ray's own launcher schema, consistent with the
installed Ray, the sweep specs and the README's sizing, and closed to the internet.

Nothing here needs a cloud account or starts Ray: the launcher YAMLs go through Ray's JSON
schema (ray/autoscaler/ray-schema.json) and the offline half of `ray up` (prepare_config +
validate_config). The KubeRay manifests' own layout is tests/test_kuberay.py, their CRD
validation tests/test_kuberay_crds.py; images and secrets of all four are checked here.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import ray
import yaml
from cluster_files import CLUSTERS, RAYCLUSTER, RAYJOB, ROOT, docs, kind, walk

LAUNCHERS = {"aws": CLUSTERS / "aws.yaml", "gcp": CLUSTERS / "gcp.yaml"}
README = CLUSTERS / "README.md"
ALL_FILES = [*LAUNCHERS.values(), RAYCLUSTER, RAYJOB, README]

PRIVATE_PORTS = (8265, 10001)  # dashboard / job server, Ray client
PUBLIC_CIDRS = ("0.0.0.0/0", "::/0")
SUBMIT = "ray job submit --working-dir . -- python -m clo_ray.sweep sweeps/paper.yaml"
SWEEP_REF = re.compile(r"\bsweeps/[\w./-]+\.ya?ml\b")
RAY_IMAGE = re.compile(r"\brayproject/ray(?:-ml|-llm)?:([\w.-]+)")


def _launcher(name: str) -> dict[str, Any]:
    return yaml.safe_load(LAUNCHERS[name].read_text())


def _is_spot(cloud: str, node_config: dict[str, Any]) -> bool:
    if cloud == "aws":
        return node_config.get("InstanceMarketOptions", {}).get("MarketType") == "spot"
    scheduling = node_config.get("scheduling", {})
    return scheduling.get("provisioningModel") == "SPOT" or bool(scheduling.get("preemptible"))


def _ray_start_commands(config: dict[str, Any]) -> list[str]:
    return [c for key in ("head_start_ray_commands", "worker_start_ray_commands")
            for c in config[key] if "ray start" in c]


# ---------------------------------------------------------------------------- Ray's own schema


@pytest.fixture(scope="module")
def ray_schema() -> dict[str, Any]:
    import ray.autoscaler

    path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    schema = json.loads(path.read_text())
    jsonschema.validators.validator_for(schema).check_schema(schema)
    return schema


@pytest.mark.parametrize("cloud", sorted(LAUNCHERS))
def test_launcher_validates_against_rays_schema(cloud, ray_schema):
    config = _launcher(cloud)
    jsonschema.validate(config, ray_schema)  # raises with the offending path
    assert config["provider"]["type"] == cloud


@pytest.mark.parametrize("cloud", sorted(LAUNCHERS))
def test_launcher_passes_ray_up_offline_checks(cloud):
    """What `ray up` does before it calls the cloud: merge defaults, check node types/counts."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(_launcher(cloud)))
    validate_config(prepared)
    assert prepared["head_node_type"] in prepared["available_node_types"]


def test_schema_check_is_not_vacuous(ray_schema):
    bad = _launcher("aws")
    bad["available_node_types"]["head"]["resources"] = {"CPU": 0.5}  # must be integers
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, ray_schema)
    bad = _launcher("aws")
    bad["available_node_types"]["head"]["node_confg"] = {}  # typo: additionalProperties
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, ray_schema)


# ---------------------------------------------------------------------------- launcher layout


@pytest.mark.parametrize("cloud", sorted(LAUNCHERS))
def test_launcher_node_types(cloud):
    config = _launcher(cloud)
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    # Head: on-demand, advertises no CPU -> no trial, task or train worker lands there.
    assert head["resources"].get("CPU") == 0, "the head must advertise CPU 0"
    assert not head["resources"].get("GPU")
    assert not _is_spot(cloud, head["node_config"]), "the head must be on-demand"

    workers = {n: t for n, t in types.items() if n != config["head_node_type"]}
    total_max = 0
    for name, node in workers.items():
        assert 0 <= node.get("min_workers", 0) <= node["max_workers"], name
        total_max += node["max_workers"]
        spot = _is_spot(cloud, node["node_config"])
        # the capacity label marks the market (trial actors select on-demand); spot first
        assert node["labels"]["clo-ray/capacity"] == ("spot" if spot else "on-demand"), name
        assert node.get("priority", 0) == (10 if spot else 0), name
        assert set(node["resources"]) <= {"CPU", "GPU", "memory"}, "labels, not resources"
    assert total_max <= config["max_workers"]
    assert config["idle_timeout_minutes"] > 0

    gpus = {n: t["resources"].get("GPU", 0) for n, t in workers.items()}
    assert any(g == 8 for g in gpus.values()), "an 8-GPU type for 13B / ZeRO-3 8-GPU trials"
    assert any(0 < g < 8 for g in gpus.values()), "a smaller GPU type (translation, 3B-8B)"
    assert any(g == 8 and _is_spot(cloud, workers[n]["node_config"]) for n, g in gpus.items())


@pytest.mark.parametrize("cloud", sorted(LAUNCHERS))
def test_paper_trial_and_translators_fit_a_node_type(cloud):
    """One paper trial (all its train workers) fits one GPU node; a translator actor fits too."""
    from clo_ray.spec.schema import load_spec

    spec = load_spec(ROOT / "sweeps" / "paper.yaml")
    res = spec.resources
    gpu_types = [t["resources"] for t in _launcher(cloud)["available_node_types"].values()
                 if t["resources"].get("GPU")]
    trial_gpus = res.workers_per_trial * res.gpus_per_worker
    trial_cpus = res.workers_per_trial * res.cpus_per_worker
    assert any(r["GPU"] >= trial_gpus and r["CPU"] >= trial_cpus + 1 for r in gpu_types)
    assert any(r["GPU"] >= spec.translator.gpus_per_actor for r in gpu_types)


@pytest.mark.parametrize("cloud", sorted(LAUNCHERS))
def test_paper_trials_ask_for_what_only_on_demand_nodes_have(cloud):
    """A trial's own process (and so its Train controller) must never land on a spot node:
    paper.yaml's trial_labels select a label that on-demand types carry and spot types lack."""
    from clo_ray.ray_env import trial_resources
    from clo_ray.spec.schema import load_spec
    from clo_ray.sweep.preflight import selector_matches

    spec = load_spec(ROOT / "sweeps" / "paper.yaml")
    asked, selector = trial_resources(spec), spec.resources.trial_labels
    assert selector, "paper.yaml should pin trials to on-demand nodes (resources.trial_labels)"
    workers = _launcher(cloud)["available_node_types"]
    hosts = [n for n, t in workers.items()
             if all(t["resources"].get(k, 0) >= asked[k] for k in asked)
             and selector_matches(selector, t["labels"])]
    assert hosts, f"no node type can host a trial asking for {asked} on {selector}"
    for name in hosts:
        assert not _is_spot(cloud, workers[name]["node_config"]), f"{name} is a spot type"


@pytest.mark.parametrize("cloud", sorted(LAUNCHERS))
def test_node_labels_pass_rays_label_validation(cloud):
    from ray._private.label_utils import validate_node_label_syntax, validate_node_labels

    for node in _launcher(cloud)["available_node_types"].values():
        validate_node_labels(node.get("labels"))
        validate_node_label_syntax(node.get("labels"))


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
@pytest.mark.parametrize("cloud", sorted(LAUNCHERS))
def test_launcher_commands_are_valid_bash(cloud):
    config = _launcher(cloud)
    keys = ("initialization_commands", "setup_commands", "head_setup_commands",
            "worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands")
    for command in (c for key in keys for c in config.get(key, [])):
        done = subprocess.run(["bash", "-n", "-c", command], capture_output=True, text=True)
        assert done.returncode == 0, f"{command}\n{done.stderr}"


@pytest.mark.parametrize("cloud", sorted(LAUNCHERS))
def test_launcher_installs_clo_ray_with_vllm_and_syncs_the_repo(cloud):
    config = _launcher(cloud)
    assert any(re.search(r"pip install .*clo-ray\[vllm\]", c) for c in config["setup_commands"])
    assert config["file_mounts"].get("/home/ray/clo-ray") == "."
    assert ".gitignore" in config["rsync_filter"]  # .venv, runs/ ... never uploaded


# ---------------------------------------------------------------------------- images / versions


def _all_images() -> list[tuple[str, str]]:
    found = []
    for cloud in LAUNCHERS:
        for path, key, value in walk(_launcher(cloud)):
            if key in ("image", "head_image", "worker_image"):
                found.append((f"{cloud}{path}.{key}", value))
    for manifest in (RAYCLUSTER, RAYJOB):
        for doc in docs(manifest):
            for path, key, value in walk(doc):
                if key == "image":
                    found.append((f"{manifest.name}{path}", value))
    return found


def test_every_image_is_the_installed_ray_version():
    images = _all_images()
    assert len(images) >= 2 + 2 * 6  # both launchers, head + 5 worker groups in each manifest
    for where, image in images:
        match = RAY_IMAGE.search(image)
        assert match, f"{where}: {image} is not a Ray image"
        assert match.group(1).startswith(f"{ray.__version__}-"), f"{where}: {image}"
        assert "-py311" in image and image.endswith("-gpu"), f"{where}: {image}"
    # Every Ray image tag mentioned anywhere (comments, README, Dockerfile snippet) agrees.
    for path in ALL_FILES:
        for tag in RAY_IMAGE.findall(path.read_text()):
            assert tag.startswith(f"{ray.__version__}-"), f"{path.name}: rayproject/ray:{tag}"
    for manifest in (kind(RAYCLUSTER, "RayCluster")["spec"],
                     kind(RAYJOB, "RayJob")["spec"]["rayClusterSpec"]):
        assert manifest["rayVersion"] == ray.__version__


# ---------------------------------------------------------------------------- sweeps referenced


def _sweep_refs() -> set[str]:
    return {ref for path in ALL_FILES for ref in SWEEP_REF.findall(path.read_text())}


def test_every_referenced_sweep_validates():
    from clo_ray.spec.schema import load_spec

    refs = _sweep_refs()
    assert "sweeps/paper.yaml" in refs
    for ref in sorted(refs):
        assert (ROOT / ref).is_file(), f"{ref} is referenced in clusters/ but does not exist"
        load_spec(ROOT / ref)  # raises SpecError listing every problem


def test_readme_shows_submit_and_port_forwarding():
    text = README.read_text()
    assert SUBMIT in text
    assert "ray dashboard clusters/aws.yaml" in text
    assert "kubectl port-forward" in text


def test_readme_sizing_matches_the_plan():
    """The README's worked example quotes --plan for sweeps/paper.yaml: keep them in step."""
    from clo_ray.spec.schema import load_spec
    from clo_ray.sweep.plan import build_plan, format_plan

    paper = yaml.safe_load((ROOT / "sweeps" / "paper.yaml").read_text())
    plan = build_plan(load_spec(paper))
    text, out = README.read_text(), format_plan(plan)
    quoted = text.split("```text\n", 1)[1].split("```", 1)[0].strip().splitlines()
    for line in quoted:
        assert line in out, f"README quotes a plan line --plan no longer prints: {line}"
    assert f"**{plan.trial_wall_hours:,.1f}\n   node-hours**" in text
    longest = max(plan.cells, key=lambda c: c.trial_s or 0.0)
    assert longest.model == "Llama-2-13b-hf" and "Llama-2-13b's first" in text
    assert f"{longest.trial_s / 60:.0f} minutes on H100s" in text
    paper["resources"]["assumed_tflops_per_worker"] = 125
    a100 = build_plan(load_spec(paper))
    assert f"**{a100.total_hours:,.1f} GPU-hours, {a100.trial_wall_hours:,.1f} node-hours**" \
        in text
    assert f"{a100.trial_wall_hours:,.1f} / 8 ~ **{a100.trial_wall_hours / 8:.0f} hours" in text


# ---------------------------------------------------------------------------- security


def _ports(rule: dict[str, Any]) -> range:
    low, high = rule.get("FromPort", -1), rule.get("ToPort", -1)
    return range(0, 65536) if low == -1 else range(low, high + 1)


def public_exposures(config: Any) -> list[str]:
    """Rules in a launcher config that open the dashboard/client ports to the internet."""
    found = []
    for path, key, value in walk(config):
        if key == "IpPermissions":  # AWS security-group ingress
            for rule in value:
                cidrs = [r.get("CidrIp") for r in rule.get("IpRanges", [])]
                cidrs += [r.get("CidrIpv6") for r in rule.get("Ipv6Ranges", [])]
                if any(c in PUBLIC_CIDRS for c in cidrs):
                    found += [f"{path}: {p}" for p in PRIVATE_PORTS if p in _ports(rule)]
        if key == "sourceRanges" and any(c in PUBLIC_CIDRS for c in value):  # GCP firewall
            found.append(f"{path}: {value}")
    for command in _ray_start_commands(config) if isinstance(config, dict) else []:
        host = re.search(r"--dashboard-host[= ](\S+)", command)
        if host and host.group(1) not in ("127.0.0.1", "localhost", "::1"):
            found.append(f"dashboard bound to {host.group(1)}")
    return found


@pytest.mark.parametrize("cloud", sorted(LAUNCHERS))
def test_launcher_never_exposes_dashboard_or_client(cloud):
    config = _launcher(cloud)
    assert public_exposures(config) == []
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start
    assert not re.search(r"(--ray-client-server-port|--dashboard-port)[= ]", head_start)


def test_exposure_check_catches_an_open_dashboard():
    bad = _launcher("aws")
    bad["provider"]["security_group"]["IpPermissions"] = [
        {"FromPort": 8265, "ToPort": 8265, "IpProtocol": "tcp",
         "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}]
    assert public_exposures(bad)
    bad = _launcher("gcp")
    bad["head_start_ray_commands"] = [c.replace("--dashboard-host=127.0.0.1",
                                                "--dashboard-host=0.0.0.0")
                                      for c in bad["head_start_ray_commands"]]
    assert public_exposures(bad)


@pytest.mark.parametrize("cloud", sorted(LAUNCHERS))
def test_launcher_keeps_token_auth_on(cloud):
    config = _launcher(cloud)
    starts = _ray_start_commands(config)
    assert len(starts) == 2 and all("RAY_AUTH_MODE=token ray start" in c for c in starts)
    assert "-e RAY_AUTH_MODE=token" in config["docker"]["run_options"]
    # The head makes the token (never echoed), the launcher copies it to workers.
    generate = [c for c in config["head_setup_commands"] if "get-auth-token" in c]
    assert generate and all(c.rstrip().endswith("> /dev/null") for c in generate)
    assert "/home/ray/.ray/auth_token" in config["cluster_synced_files"]


SECRET_SHAPES = {
    "AWS access key id": re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),
    "AWS secret key": re.compile(r"aws_secret_access_key\s*[:=]", re.I),
    "Hugging Face token": re.compile(r"\bhf_[A-Za-z0-9]{30,}\b"),
    "private key": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----|\"private_key\"\s*:"),
    "Ray token value": re.compile(r"RAY_AUTH_TOKEN\s*[:=]\s*['\"]?[0-9a-f]{16,}"),
}


def test_no_secrets_in_cluster_files():
    for path in ALL_FILES:
        text = path.read_text()
        for what, shape in SECRET_SHAPES.items():
            assert not shape.search(text), f"{path.name} contains what looks like a {what}"
        assert "RAY_AUTH_MODE=disabled" not in text
    for manifest in (RAYCLUSTER, RAYJOB):
        for doc in docs(manifest):
            for _, key, value in walk(doc):
                if key != "env":
                    continue
                for var in value:  # secret-looking variables only ever come from a Secret
                    if re.search(r"TOKEN|SECRET|KEY|PASSWORD", var["name"]):
                        assert "value" not in var and "secretKeyRef" in var["valueFrom"], var


# ------------------------------------------------------------------ the image and the vllm extra


def test_the_dockerfile_builds_rays_image_with_the_vllm_extra():
    text = (CLUSTERS / "Dockerfile").read_text()
    base = re.search(r"^FROM (\S+)$", text, re.M)
    assert base and RAY_IMAGE.match(base.group(1))
    assert RAY_IMAGE.match(base.group(1)).group(1).startswith(f"{ray.__version__}-")
    assert '-e "/home/ray/clo-ray[vllm]"' in text


def test_the_vllm_extra_pins_what_rays_llm_extra_pins():
    """ray.data.llm is tested with the vLLM that `ray[llm]` pins; our extra is that version."""
    import importlib.metadata as metadata

    ray_llm = [r for r in metadata.requires("ray") or [] if r.startswith("vllm")
               and 'extra == "llm"' in r]
    pinned = re.search(r"==([\w.]+)", ray_llm[0]).group(1) if ray_llm else None
    ours = re.search(r"^vllm = (\[.*\])$", (ROOT / "pyproject.toml").read_text(), re.M)
    assert pinned and ours and json.loads(ours.group(1)) == [f"vllm=={pinned}"], ray_llm
