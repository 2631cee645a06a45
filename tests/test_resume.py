"""A resumed sweep is the same sweep: the driver is killed inside a trial's training and again
during a trial's evaluation, the same command is re-run each time, and what the finished run
holds is exactly what an uninterrupted run with the same seed holds.

One cell (tiny-llama, sw, sft, 8 pairs) x 2 trials run one at a time, 12 steps each with a
checkpoint at every step. (The kill between trials is tests/test_sweep.py's.)
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from clo_ray.spec.schema import load_spec
from clo_ray.tune.searcher import CellSearcher

SPECS = Path(__file__).resolve().parent / "specs"
STEPS = 12  # with a checkpoint each: the kill lands mid-training, not after
pytestmark = pytest.mark.slow


def write_spec(tmp: Path) -> Path:
    data = yaml.safe_load((SPECS / "tiny_sweep.yaml").read_text())
    data["run"]["storage"] = str(tmp / "runs")
    data["methods"] = ["sft"]
    data["schedules"] = {"sft": [{"loss": "sft", "modules": "attention", "steps": STEPS,
                                  "lr": 1.0e-3, "warmup_ratio": 0.0}]}
    data["search"].update(trials_per_cell=2, max_concurrent_trials=1)
    data["train"].update(checkpoint_every=1)
    # a longer evaluation (8 prompts x 32 tokens) leaves a window to kill the driver in
    data["evaluation"].update(max_prompts=8, max_new_tokens=32)
    data["report"] = {"plots": False}
    path = tmp / "spec.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def histories(run_dir: Path) -> dict[str, list[dict]]:
    return {p.parent.name: [json.loads(line) for line in p.read_text().splitlines() if line]
            for p in sorted((run_dir / "trials").glob("*/history.jsonl"))}


def final_reports(run_dir: Path) -> list[tuple[dict, dict]]:
    """(Tune config, final report) of each trial whose evaluated report reached Tune."""
    out = []
    for result in (run_dir / "tune").glob("*/result.json"):
        try:
            rows = [json.loads(line) for line in result.read_text().splitlines() if line]
            config = json.loads((result.parent / "params.json").read_text())
        except (ValueError, OSError):  # being written
            continue
        out += [(config, row) for row in rows if row.get("trial_done")]
    return out


def reported_done(run_dir: Path) -> set[str]:
    """Train run names (the checkpoint's parent folder) of the trials reported finished."""
    return {Path(row["checkpoint"].rstrip("/")).parent.name
            for _, row in final_reports(run_dir)}


def start(spec: Path, tmp: Path, name: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.Popen([sys.executable, "-m", "clo_ray.sweep", str(spec)], cwd=tmp,
                            stdout=open(tmp / f"{name}.log", "w"), stderr=subprocess.STDOUT,
                            start_new_session=True, env={**env, "HF_HUB_OFFLINE": "1"})


def kill_when(driver: subprocess.Popen, tmp: Path, name: str, ready) -> None:
    deadline = time.time() + 600
    while not ready():
        assert driver.poll() is None, (tmp / f"{name}.log").read_text()[-3000:]
        assert time.time() < deadline, f"{name}: the kill point never came"
        time.sleep(0.2)
    os.killpg(driver.pid, signal.SIGKILL)  # the driver and the Ray it started: a lost node
    driver.wait()


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("resume")
    spec = write_spec(tmp)
    run_dir = tmp / "runs" / "tiny"

    def mid_training() -> bool:  # a trial has checkpointed step 1 of 3
        return any(any(r.get("stage_step") == 1 for r in rows)
                   and not any(r.get("stage_step") == STEPS for r in rows)
                   for rows in histories(run_dir).values())

    kill_when(start(spec, tmp, "first"), tmp, "first", mid_training)
    [in_training] = [n for n, rows in histories(run_dir).items()
                     if not any(r.get("stage_step") == STEPS for r in rows)]

    pending: set[str] = set()

    def in_evaluation() -> bool:  # a trial trained all its steps, its evaluation not reported
        nonlocal pending
        trained = {n for n, rows in histories(run_dir).items()
                   if any(r.get("stage_step") == STEPS for r in rows)}
        pending = trained - reported_done(run_dir)
        return bool(pending)

    kill_when(start(spec, tmp, "second"), tmp, "second", in_evaluation)
    in_eval = sorted(pending - reported_done(run_dir))  # not reported by the kill either
    third = start(spec, tmp, "third")
    code = third.wait(timeout=1200)
    assert code == 0, (tmp / "third.log").read_text()[-3000:]
    return {"run_dir": run_dir, "spec": spec, "in_training": in_training, "in_eval": in_eval}


def test_trials_and_params_are_those_of_an_uninterrupted_run(resumed):
    spec = load_spec(resumed["spec"])
    fresh = CellSearcher(spec, metrics=["objective"], modes=["max"], study_prefix="x")
    expected = set()
    for i in range(2):  # the random sampler's draws do not depend on results
        config = fresh.suggest(f"t{i}")
        expected.add((config["cell_trial"], round(config["params"]["lr"], 12)))
    rows = pq.read_table(resumed["run_dir"] / "results.parquet").to_pylist()
    trials = [r for r in rows if r["method"] != "base"]
    assert [r["status"] for r in trials] == ["completed"] * 2
    assert {round(json.loads(r["params"])["lr"], 12) for r in trials} == \
        {lr for _, lr in expected}
    finished = {(config["cell_trial"], round(config["params"]["lr"], 12))
                for config, _ in final_reports(resumed["run_dir"])}
    assert finished == expected  # each (index, params) once: nothing re-suggested
    names = sorted(histories(resumed["run_dir"]))
    assert [name.rsplit("-", 1)[1] for name in names] == ["t1", "t2"]  # one folder each


def trained_steps(rows: list[dict]) -> list[int]:
    return [r["stage_step"] for r in rows if "stage_step" in r and r["tokens_total"]]


def test_the_trial_killed_in_training_resumes_and_trains_the_rest(resumed):
    rows = histories(resumed["run_dir"])[resumed["in_training"]]
    [first] = [i for i, r in enumerate(rows) if r["resumed_from_step"]][:1] or [None]
    assert first is not None, rows  # it was resumed, not started over
    at = rows[first]["resumed_from_step"]
    assert 1 <= at < STEPS, rows  # from a mid-training checkpoint
    assert trained_steps(rows[first:]) == list(range(at + 1, STEPS + 1)), rows  # the rest, once
    assert set(trained_steps(rows[:first])) >= set(range(1, at + 1)), rows


def test_the_trial_killed_in_evaluation_is_evaluated_not_retrained(resumed):
    assert resumed["in_eval"], "the driver was not killed during an evaluation"
    for name in resumed["in_eval"]:
        rows = histories(resumed["run_dir"])[name]
        assert set(trained_steps(rows)) == set(range(1, STEPS + 1)), rows
        last = rows[-1]  # the restarted run found its final checkpoint: nothing trained
        assert "stage_step" not in last and last["resumed_from_step"] == STEPS, rows
        assert last["tokens_total"] == 0, rows


def test_no_trial_is_completed_without_having_trained_its_steps(resumed):
    for name, rows in histories(resumed["run_dir"]).items():
        assert sorted(set(trained_steps(rows))) == list(range(1, STEPS + 1)), (name, rows)
