"""Reading the cluster configs in clusters/: shared by tests/test_clusters.py (launchers,
README, security) and tests/test_kuberay.py (the KubeRay manifests)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTERS = ROOT / "clusters"
RAYCLUSTER = CLUSTERS / "kuberay" / "raycluster.yaml"
RAYJOB = CLUSTERS / "kuberay" / "rayjob.yaml"


def docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def kind(path: Path, kind: str) -> dict[str, Any]:
    (doc,) = [d for d in docs(path) if d.get("kind") == kind]
    return doc


def walk(node: Any, path: str = ""):
    """Every (path, key, value) in nested dicts/lists."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield path, key, value
            yield from walk(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from walk(value, f"{path}[{i}]")
