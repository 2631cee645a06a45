"""How a sweep ends, said by its exit code: failed trials (1, each listed), interrupted (130,
no partial report), a cluster that can never hold a trial (2, before any trial), and which
Ray cluster it runs on (its own unless told)."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from clo_ray.ray_env import ray_address
from clo_ray.spec.schema import load_spec
from clo_ray.sweep.preflight import ClusterCapacityError, NodeShape, check_capacity

SPECS = Path(__file__).resolve().parent / "specs"


def tiny_spec(tmp: Path, **sections) -> Path:
    data = yaml.safe_load((SPECS / "tiny_sweep.yaml").read_text())
    data["run"]["storage"] = str(tmp / "runs")
    data["methods"], data["search"]["trials_per_cell"] = ["sft"], 1
    data["report"] = {"plots": False}
    data.update(sections)
    path = tmp / "spec.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def sweep(spec: Path, tmp: Path, **kwargs) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.run([sys.executable, "-m", "clo_ray.sweep", str(spec)], cwd=tmp,
                          capture_output=True, text=True, timeout=900,
                          env={**env, "HF_HUB_OFFLINE": "1"}, **kwargs)


# ------------------------------------------------------------------------------ fast


def test_capacity_names_the_numbers():
    spec = load_spec({**yaml.safe_load((SPECS / "minimal.yaml").read_text()),
                      "resources": {"workers_per_trial": 2, "gpus_per_worker": 8}})
    laptop = [NodeShape({"CPU": 2.0, "memory": 1e9}, 1)]
    with pytest.raises(ClusterCapacityError) as info:
        check_capacity(spec, laptop, "the 1 live node(s)")
    text = str(info.value)
    assert "2 train worker(s) of {CPU: 1, GPU: 8}" in text and "hold only 0" in text
    assert "3 CPUs in all" in text and "have 2" in text
    # an autoscaler whose GPU type grows without bound can hold it
    check_capacity(spec, [*laptop, NodeShape({"CPU": 8.0, "GPU": 8.0}, math.inf)], "types")
    # two 8-GPU nodes at most: enough for 2 workers of 8
    check_capacity(spec, [NodeShape({"CPU": 96.0, "GPU": 8.0}, 2)], "types")
    with pytest.raises(ClusterCapacityError, match="hold only 1"):
        check_capacity(spec, [NodeShape({"CPU": 96.0, "GPU": 8.0}, 1)], "types")


def test_trial_resources_must_exist_on_some_node():
    spec = load_spec({**yaml.safe_load((SPECS / "minimal.yaml").read_text()),
                      "resources": {"trial_resources": {"on_demand": 1}}})
    with pytest.raises(ClusterCapacityError, match=r"\{CPU: 1, on_demand: 1\}"):
        check_capacity(spec, [NodeShape({"CPU": 4.0}, 1)], "nodes")
    check_capacity(spec, [NodeShape({"CPU": 4.0, "on_demand": 1.0}, 1)], "nodes")


def test_trial_and_worker_labels_must_match_some_node():
    spec = load_spec({**yaml.safe_load((SPECS / "minimal.yaml").read_text()),
                      "resources": {"trial_labels": {"clo-ray/capacity": "on-demand"},
                                    "worker_labels": {"clo-ray/capacity": "!on-demand"}}})
    spot = NodeShape({"CPU": 4.0}, 1, {"clo-ray/capacity": "spot"})
    on_demand = NodeShape({"CPU": 4.0}, 1, {"clo-ray/capacity": "on-demand"})
    with pytest.raises(ClusterCapacityError, match="with labels .*on-demand"):
        check_capacity(spec, [spot], "nodes")
    with pytest.raises(ClusterCapacityError, match="worker_labels.*hold only 0"):
        check_capacity(spec, [on_demand], "nodes")
    check_capacity(spec, [spot, on_demand], "nodes")
    # the autoscaler's node types carry no labels in Ray's cluster config: not refused
    check_capacity(spec, [NodeShape({"CPU": 4.0}, math.inf)], "types")


def test_ray_address_is_explicit(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert ray_address() == "local"  # never the last `ray start` of this host
    assert ray_address("10.0.0.1:6379") == "10.0.0.1:6379"
    monkeypatch.setenv("RAY_ADDRESS", "auto")
    assert ray_address() == "auto" and ray_address("x:1") == "x:1"


# ------------------------------------------------------------------------------ real runs


@pytest.mark.slow
def test_impossible_resources_fail_at_start_not_forever(tmp_path):
    spec = tiny_spec(tmp_path, resources={"workers_per_trial": 1, "cpus_per_worker": 64,
                                          "zero_stage": 0, "precision": "fp32"})
    started = time.monotonic()
    done = sweep(spec, tmp_path)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "can never run a trial" in done.stderr and "{CPU: 64}" in done.stderr
    assert "ray: started a local Ray cluster" in done.stdout  # says where it runs
    assert not list((tmp_path / "runs").glob("*/tune"))  # no trial was started
    assert time.monotonic() - started < 300


@pytest.mark.slow
def test_failed_trials_exit_1_and_are_listed(tmp_path):
    """A model folder with a config but no weights passes the start checks and fails in the
    trial: the sweep still writes results and the report, lists the trial, and exits 1."""
    import shutil

    from clo_ray.models.resolve import resolve_model

    broken = tmp_path / "no-weights"
    broken.mkdir()
    for item in resolve_model("builtin:tiny-llama").iterdir():
        if item.is_file() and not item.name.endswith((".safetensors", ".bin")):
            shutil.copy(item, broken / item.name)
    spec = tiny_spec(tmp_path, models=[{"name": str(broken), "label": "broken"}])
    done = sweep(spec, tmp_path)
    assert done.returncode == 1, done.stdout[-2000:] + done.stderr[-3000:]
    err = done.stderr
    assert "1 of 1 trial(s) failed:" in err and "broken/sw/sft/8" in err, err[-3000:]
    log = next(line.split("log: ", 1)[1] for line in err.splitlines() if "log: " in line)
    assert Path(log).is_file(), log
    assert (tmp_path / "runs" / "tiny" / "report.md").is_file()
    import pyarrow.parquet as pq

    rows = pq.read_table(tmp_path / "runs" / "tiny" / "results.parquet").to_pylist()
    assert [r["status"] for r in rows if r["method"] != "base"] == ["failed"]


@pytest.mark.slow
def test_ctrl_c_exits_130_without_a_partial_report(tmp_path):
    spec = tiny_spec(tmp_path, search={"trials_per_cell": 2, "sampler": "random",
                                       "max_concurrent_trials": 1,
                                       "space": {"lr": {"type": "float", "low": 1.0e-4,
                                                        "high": 1.0e-2, "log": True}}})
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    log = open(tmp_path / "driver.log", "w")
    driver = subprocess.Popen([sys.executable, "-m", "clo_ray.sweep", str(spec)], cwd=tmp_path,
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                              env={**env, "HF_HUB_OFFLINE": "1"})
    tune_dir, deadline = tmp_path / "runs" / "tiny" / "tune", time.time() + 600
    try:
        while not any("RUNNING" in p.read_text(errors="replace")
                      for p in tune_dir.glob("experiment_state-*.json")):
            assert driver.poll() is None, (tmp_path / "driver.log").read_text()[-3000:]
            assert time.time() < deadline, "no trial started in 10 minutes"
            time.sleep(1)
        driver.send_signal(signal.SIGINT)  # what Ctrl-C sends the driver
        code = driver.wait(timeout=300)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    out = (tmp_path / "driver.log").read_text()
    assert code == 130, out[-3000:]
    assert "interrupted" in out and "to resume" in out, out[-3000:]
    assert not (tmp_path / "runs" / "tiny" / "results.parquet").exists()
    assert not (tmp_path / "runs" / "tiny" / "report.md").exists()
