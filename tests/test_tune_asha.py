"""ASHA early stopping and the multi-objective search inside real sweeps (tiny-llama, CPU).

One module-scoped local Ray cluster (2 CPUs: one trial and its one train worker fill it, so
trials run one at a time) with its dashboard (the state API needs it) and Ray Train's run
tracking on, so the test can ask which actors and processes belonged to which trial. On it,
through :func:`clo_ray.run_sweep` as a user calls it:

- ``asha_stop.yaml``: one cell, 3 trials of 7 steps, ASHA on the training ``target_nll``.
  Trials are stopped mid-training; their TorchTrainer must be gone with them (controller and
  worker actors DEAD, worker processes exited, placement group removed), and what they
  reported must not pass for held-out results.
- ``asha_pareto.yaml``: ``search.multi_objective`` over two budgets: each cell's Optuna study
  (in sqlite, ``search.optuna_storage``) optimises two metrics in opposite directions, and
  report.md / the PNG show the quality-vs-budget Pareto front of the trials.
"""

from __future__ import annotations

import json
import socket
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import optuna
import psutil
import pyarrow.parquet as pq
import pytest
import ray
import yaml
from ray.tune.schedulers import TrialScheduler
from ray.util.state import list_actors, list_placement_groups

from clo_ray import run_sweep
from clo_ray.layout import RunLayout
from clo_ray.ray_env import ray_runtime_env
from clo_ray.report.results import pareto_front
from clo_ray.spec.grid import Cell, grid_cells
from clo_ray.spec.schema import load_spec
from clo_ray.tune.searcher import CellScheduler
from clo_ray.tune.trainable import trial_run_name

SPECS = Path(__file__).resolve().parent / "specs"
STEPS = 7  # the asha_stop.yaml schedule; ASHA rungs at steps 1, 2, 4
pytestmark = pytest.mark.timeout(900)  # a leaked worker bundle would hang the sweep
slow = pytest.mark.slow  # the sweeps; the scheduler's unit test below is instant


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_cell_scheduler_stops_within_a_cell_only_and_only_on_training_reports():
    """One ASHA per cell: a trial is judged against its own cell's rungs, never another's."""
    clo, sft = (Cell("tiny", "sw", method, 8) for method in ("clo", "sft"))
    scheduler = CellScheduler(metric="target_nll", mode="min", grace_period_steps=2,
                              reduction_factor=2)
    trials = {name: SimpleNamespace(trial_id=name, config={"cell": cell._asdict()})
              for name, cell in (("clo-a", clo), ("clo-b", clo), ("sft-a", sft))}
    for trial in trials.values():
        scheduler.on_trial_add(None, trial)

    def report(name: str, **result) -> str:
        return scheduler.on_trial_result(None, trials[name], result)

    assert report("sft-a", step=2, target_nll=1.0) == TrialScheduler.CONTINUE
    # clo-a is far worse than the sft trial, but the first of its own cell at the rung
    assert report("clo-a", step=2, target_nll=5.0) == TrialScheduler.CONTINUE
    # a final (held-out) report carries no step: never judged, whatever its value
    assert report("clo-b", target_nll=99.0, trial_done=True) == TrialScheduler.CONTINUE
    assert report("clo-b", step=1, target_nll=9.0) == TrialScheduler.CONTINUE  # before rung
    assert report("clo-b", step=2, target_nll=6.0) == TrialScheduler.STOP  # behind clo-a
    assert sorted(scheduler.cells) == sorted([clo.key, sft.key])


def spec_in(name: str, tmp: Path, **search):
    data = yaml.safe_load((SPECS / name).read_text())
    data["run"]["storage"] = str(tmp / "runs")
    data["search"].update(search)
    return load_spec(data)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    port = free_port()
    # RAY_API_SERVER_ADDRESS: a killed Train controller's placement group is removed by Ray
    # Train's detached PlacementGroupCleaner, which watches the controller through the state
    # API; without an address that API autodetects the cluster, and on a host running several
    # Ray instances (this shared box, a CI runner with a leftover one) it picks another: the
    # stopped trial's worker bundle then stays reserved and the next trial waits forever.
    env = {**ray_runtime_env()["env_vars"], "RAY_TRAIN_ENABLE_STATE_TRACKING": "1",
           "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}"}
    # address="local": a cluster of our own, never one another process started on this box
    context = ray.init(address="local", num_cpus=2, include_dashboard=True,
                       dashboard_host="127.0.0.1", dashboard_port=port, log_to_driver=False,
                       runtime_env={"env_vars": env})
    yield {"tmp": tmp_path_factory.mktemp("asha"),
           "gcs": context.address_info["gcs_address"],
           "dashboard": f"http://{context.dashboard_url}"}
    ray.shutdown()


def train_runs(cluster) -> dict[str, dict]:
    """Ray Train's record of every TorchTrainer run on the cluster, by run name."""
    from ray._private.authentication.http_token_authentication import (
        get_auth_headers_if_auth_enabled,  # the dashboard's token, as the state API sends it
    )

    request = urllib.request.Request(f"{cluster['dashboard']}/api/train/v2/runs/v1",
                                     headers=get_auth_headers_if_auth_enabled({}))
    with urllib.request.urlopen(request, timeout=60) as response:
        runs = json.loads(response.read())["train_runs"]
    return {run["name"]: run for run in runs}


@pytest.fixture(scope="module")
def asha(cluster):
    spec = spec_in("asha_stop.yaml", cluster["tmp"])
    grid = run_sweep(spec)
    run_dir = Path(RunLayout.of(spec).uri)
    trials = {str(r.metrics.get("trial_id")): r for r in grid}
    rows = [r for r in pq.read_table(run_dir / "results.parquet").to_pylist()
            if r["method"] != "base"]
    return {"spec": spec, "trials": trials, "rows": rows, "run_dir": run_dir,
            "train_runs": train_runs(cluster)}


def stopped(asha) -> list:
    return [asha["trials"][r["trial_id"]] for r in asha["rows"] if r["status"] == "stopped"]


@slow
def test_asha_stops_trials_mid_training_and_their_rows_hold_no_heldout_metrics(asha):
    rows = asha["rows"]
    assert len(rows) == 3 and not any(r["status"] == "failed" for r in rows), rows
    statuses = sorted(r["status"] for r in rows)
    assert "stopped" in statuses and "completed" in statuses, statuses
    for result in stopped(asha):
        # stopped at a rung: its last report is a training one, before the schedule's end
        assert 1 <= result.metrics["step"] < STEPS and "trial_done" not in result.metrics
        # and training stopped with it: Tune's result queue holds one report, so the workers
        # run at most a step or two past the report ASHA judged, never to the schedule's end
        history = asha["run_dir"] / "trials" / trial_run_name(result.config) / "history.jsonl"
        steps = [json.loads(line)["step"] for line in history.read_text().splitlines()]
        assert steps == list(range(1, len(steps) + 1)), steps
        assert result.metrics["step"] <= steps[-1] < STEPS, steps
    for row in rows:
        if row["status"] == "stopped":  # training-batch values are not held-out results
            assert row["target_nll"] is None and row["target_fidelity"] is None
            assert row["checkpoint"] is None and row["train_seconds"] > 0
            assert row["train_tokens"] > 0  # what it cost until stopped
        else:
            assert row["target_nll"] > 0 and 0 <= row["target_fidelity"] <= 1
            assert row["checkpoint"] and row["train_seconds"] > 0 and row["train_tokens"] > 0
    # the cell's study learned from the completed trials only
    state_file = sorted((asha["run_dir"] / "tune").glob("searcher-state-*.pkl"))[-1]
    seen = json.loads(state_file.read_text())["finished"]
    [cell] = grid_cells(asha["spec"])
    values = sorted(t["values"] is None for t in seen[cell.key])
    assert values == sorted(r["status"] == "stopped" for r in rows)


@slow
def test_a_stopped_trials_trainer_is_torn_down(asha, cluster):
    runs = asha["train_runs"]
    for result in stopped(asha):
        run = runs[trial_run_name(result.config)]
        workers = [w for attempt in run["attempts"] for w in attempt["workers"]]
        assert workers, run
        actors = {run["controller_actor_id"]: "TrainController",
                  **{w["actor_id"]: "RayTrainWorker" for w in workers}}
        for actor_id, class_name in actors.items():
            [state] = list_actors(address=cluster["gcs"], filters=[("actor_id", "=", actor_id)],
                                  detail=True, raise_on_missing_output=False)
            assert state.class_name == class_name and state.state == "DEAD", state
            assert not psutil.pid_exists(state.pid), f"{class_name} pid {state.pid} still runs"
            if class_name == "RayTrainWorker":
                [group] = list_placement_groups(
                    address=cluster["gcs"],
                    filters=[("placement_group_id", "=", state.placement_group_id)])
                assert group.state == "REMOVED", group
    # each trial needs both CPUs: a trial that trained after a stopped one got the CPU the
    # stopped trial's worker held, so the teardown happened during the sweep, not at its end
    first_stopped = min(runs[trial_run_name(r.config)]["start_time_ns"] for r in stopped(asha))
    later = [run for run in runs.values() if run["start_time_ns"] > first_stopped]
    assert any(a["workers"] for run in later for a in run["attempts"]), later


@pytest.fixture(scope="module")
def pareto(cluster, asha):  # after the ASHA sweep: one sweep at a time on the 2-CPU cluster
    url = f"sqlite:///{cluster['tmp'] / 'optuna.db'}"
    spec = spec_in("asha_pareto.yaml", cluster["tmp"], optuna_storage=url)
    run_sweep(spec)
    run_dir = Path(RunLayout.of(spec).uri)
    rows = [r for r in pq.read_table(run_dir / "results.parquet").to_pylist()
            if r["method"] != "base"]
    return {"spec": spec, "url": url, "rows": rows, "run_dir": run_dir}


@slow
def test_multi_objective_studies_optimise_both_metrics_per_cell(pareto):
    spec, rows = pareto["spec"], pareto["rows"]
    assert sorted(r["budget"] for r in rows) == [4, 8]
    assert all(r["status"] == "completed" for r in rows), rows
    for cell in grid_cells(spec):
        study = optuna.load_study(study_name=f"{spec.run.name}/{cell.key}",
                                  storage=pareto["url"])
        assert study.directions == [optuna.study.StudyDirection.MAXIMIZE,
                                    optuna.study.StudyDirection.MINIMIZE]
        [trial] = study.trials
        [row] = [r for r in rows if r["budget"] == cell.budget]
        assert trial.values == pytest.approx([row["target_fidelity"], row["target_nll"]])
        assert trial.params["lr"] == pytest.approx(json.loads(row["params"])["lr"])
        assert [t.number for t in study.best_trials] == [trial.number]


@slow
def test_report_shows_the_pareto_front_of_quality_vs_budget(pareto):
    import matplotlib.image

    rows, run_dir = pareto["rows"], pareto["run_dir"]
    report = (run_dir / "report.md").read_text()
    for metric, maximize in (("target_fidelity", True), ("target_nll", False)):
        front = pareto_front([(r["budget"], r[metric]) for r in rows], maximize=maximize)
        section = report.split(f"## Pareto front: {metric}", 1)[1].split("\n## ", 1)[0]
        line = next(x for x in section.splitlines() if x.startswith("| tiny-llama |"))
        shown = [r["trial_id"] for r in rows if f"({r['trial_id']})" in line]
        assert sorted(shown) == sorted(rows[i]["trial_id"] for i in front), line
        image = matplotlib.image.imread(run_dir / f"pareto_{metric}.png")
        assert image.shape[0] > 100 and image.shape[1] > 100
