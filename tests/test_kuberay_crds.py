"""The KubeRay manifests in clusters/kuberay/ against KubeRay's own CRD schemas (RayCluster,
RayJob), validated strictly: a misspelled or misplaced field fails, as the API server's
strict field validation would reject it. The schemas are read from the workspace's
shared/schemas/kuberay/ (not vendored); the tests skip, naming the path, where absent."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
RAYCLUSTER = ROOT / "clusters" / "kuberay" / "raycluster.yaml"
RAYJOB = ROOT / "clusters" / "kuberay" / "rayjob.yaml"

CRD_DIR = ROOT.parent / "shared" / "schemas" / "kuberay"  # where CI has them (not vendored)


def _closed(schema: Any) -> Any:
    """The API server's strict field validation as JSON Schema: an object schema that lists
    its properties, allows no others and does not preserve unknown fields is closed."""
    if isinstance(schema, dict):
        if (schema.get("type") == "object" and "properties" in schema
                and "additionalProperties" not in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            schema["additionalProperties"] = False
        for value in schema.values():
            _closed(value)
    elif isinstance(schema, list):
        for value in schema:
            _closed(value)
    return schema


@pytest.fixture(scope="module")
def crd_validators() -> dict[str, jsonschema.protocols.Validator]:
    if not CRD_DIR.is_dir():
        pytest.skip(f"KubeRay's CRD schemas are not at {CRD_DIR} (the workspace's "
                    "shared/schemas/kuberay, next to this checkout): cannot validate strictly")
    validators = {}
    for kind in ("RayCluster", "RayJob"):
        crd = yaml.safe_load((CRD_DIR / f"ray.io_{kind.lower()}s.yaml").read_text())
        version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
        schema = _closed(copy.deepcopy(version["schema"]["openAPIV3Schema"]))
        validators[kind] = jsonschema.Draft7Validator(schema)
    return validators


def _errors(validators: dict[str, Any], doc: dict[str, Any]) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message[:200]}"
            for e in validators[doc["kind"]].iter_errors(doc)]


@pytest.mark.parametrize("path", [RAYCLUSTER, RAYJOB], ids=["raycluster", "rayjob"])
def test_kuberay_manifests_validate_strictly_against_the_crds(crd_validators, path):
    docs = [d for d in yaml.safe_load_all(path.read_text())
            if d and d.get("kind") in ("RayCluster", "RayJob")]
    assert docs, f"no RayCluster or RayJob in {path}"
    for doc in docs:
        assert _errors(crd_validators, doc) == [], path


def test_a_misspelled_or_misplaced_field_fails_the_crd_check(crd_validators):
    doc = next(d for d in yaml.safe_load_all(RAYJOB.read_text()) if d and d["kind"] == "RayJob")
    misspelled = copy.deepcopy(doc)
    misspelled["spec"]["backofLimit"] = misspelled["spec"].pop("backoffLimit")
    assert any("backofLimit" in e for e in _errors(crd_validators, misspelled))
    misplaced = copy.deepcopy(doc)  # a worker-group field put on the cluster spec
    misplaced["spec"]["rayClusterSpec"]["maxReplicas"] = 4
    assert any("maxReplicas" in e for e in _errors(crd_validators, misplaced))
    wrong_type = copy.deepcopy(doc)
    wrong_type["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["maxReplicas"] = "four"
    assert any("maxReplicas" in e for e in _errors(crd_validators, wrong_type))
