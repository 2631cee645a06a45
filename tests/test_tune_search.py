"""Per-cell Optuna routing inside one real Ray Tune experiment (no training: a cheap trainable)."""

import json
from pathlib import Path

import optuna
import pytest
import ray
from ray import tune

from clo_ray.spec.grid import cell_of, grid_cells
from clo_ray.spec.schema import load_spec
from clo_ray.tune.searcher import STATE_FILE, CellSearcher, optuna_space


def tiny_spec(**search):
    return load_spec({
        "run": {"name": "search-test", "storage": "runs"},
        "corpus": {"path": "builtin:parallel-sample"},
        "translator": {"backend": "parallel"},
        "languages": ["sw"],
        "models": [{"name": "builtin:tiny-llama"}],
        "methods": ["clo", "sft"],
        "budgets": [16],
        "search": {"trials_per_cell": 3, "sampler": "tpe",
                   "space": {"lr": {"type": "float", "low": 1e-5, "high": 1e-3, "log": True},
                             "lambda": {"type": "float", "low": 0.1, "high": 0.9},
                             "modules": {"type": "categorical",
                                         "choices": ["attention", ["attention", "mlp"]]}},
                   **search},
        "evaluation": {"holdout": 8},
    })


def test_space_is_restricted_to_what_the_method_trains():
    spec = tiny_spec()
    assert set(optuna_space(spec, "clo")) == {"lr", "lambda", "modules"}
    assert set(optuna_space(spec, "sft")) == {"lr", "modules"}  # lambda is clo-only


@pytest.fixture(scope="module")
def ray_session():
    # the trainable below lives in this test module: Ray's workers must be able to import it
    here = str(Path(__file__).resolve().parent)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": here}})
    yield
    ray.shutdown()


def score(config):
    """Higher for the clo cell's lr near 1e-4; the sft cell scores a constant band."""
    cell, params = cell_of(config), config["params"]
    value = -abs(params["lr"] - 1e-4) * 1e3 if cell.method == "clo" else 10.0
    tune.report({"objective": value, "method": cell.method, "modules": str(params["modules"])})


def test_each_cell_study_sees_only_its_own_trials(ray_session, tmp_path):
    spec = tiny_spec()
    searcher = CellSearcher(spec, metrics=["objective"], modes=["max"], study_prefix="t")
    tuner = tune.Tuner(score, tune_config=tune.TuneConfig(
        search_alg=searcher, num_samples=len(grid_cells(spec)) * 3, max_concurrent_trials=2),
        run_config=tune.RunConfig(storage_path=str(tmp_path), name="exp", verbose=0))
    grid = tuner.fit()
    assert len(grid) == 6 and not grid.errors
    by_method = {}
    for result in grid:
        by_method.setdefault(result.metrics["method"], []).append(result.metrics["objective"])
    assert sorted(by_method) == ["clo", "sft"] and all(len(v) == 3 for v in by_method.values())
    for cell in grid_cells(spec):
        seen = searcher.study_trials(cell)
        assert len(seen) == 3
        expected = 10.0 if cell.method == "sft" else None
        for trial in seen:
            if expected is not None:
                assert trial["values"] == [expected]  # only sft results reached the sft study
            else:
                assert trial["values"][0] <= 0
            assert ("lambda" in trial["params"]) == (cell.method == "clo")
    # list-valued choices reach the trainable decoded
    assert {r.metrics["modules"] for r in grid} <= {"attention", "['attention', 'mlp']"}


def test_state_is_json_and_replays_into_fresh_studies(tmp_path):
    spec = tiny_spec()
    first = CellSearcher(spec, metrics=["objective"], modes=["max"], study_prefix="t")
    for i in range(4):
        config = first.suggest(f"trial-{i}")
        first.on_trial_complete(f"trial-{i}", {"objective": float(i)})
    path = tmp_path / STATE_FILE
    first.save(str(path))
    state = json.loads(path.read_text())  # plain JSON, no pickle
    assert sum(len(v) for v in state["finished"].values()) == 4
    again = CellSearcher(spec, metrics=["objective"], modes=["max"], study_prefix="t")
    again.restore(str(path))
    config = again.suggest("trial-next")
    cell = cell_of(config)
    study = again._studies[cell.key]
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(done) == 2  # this cell's two finished trials, replayed; none of the other cell's
    assert again.started[cell.key] == 3


def test_failed_or_metricless_trials_are_not_learned_from():
    spec = tiny_spec()
    searcher = CellSearcher(spec, metrics=["objective"], modes=["max"], study_prefix="t")
    searcher.suggest("a")
    searcher.on_trial_complete("a", error=True)
    searcher.suggest("b")
    searcher.on_trial_complete("b", {"other": 1.0})
    for cell in grid_cells(spec):
        study = searcher._studies.get(cell.key)
        if study:
            assert all(t.state == optuna.trial.TrialState.FAIL for t in study.trials)


def test_a_restored_searcher_continues_the_same_sequence(tmp_path):
    """Driver killed with one trial finished and one live: after restore the live trial is not
    suggested again, its result still reaches its study, and the next suggestions are the
    ones an uninterrupted searcher makes (each cell's k-th draw is seeded by (seed, cell, k))."""
    spec = tiny_spec(sampler="random")

    def searcher() -> CellSearcher:
        return CellSearcher(spec, metrics=["objective"], modes=["max"], study_prefix="t")

    straight = searcher()
    uninterrupted = [straight.suggest(f"u{i}") for i in range(6)]
    first = searcher()
    assert first.suggest("a") == uninterrupted[0]
    first.on_trial_complete("a", {"objective": 1.0})
    assert first.suggest("b") == uninterrupted[1]  # live when the driver dies
    path = tmp_path / STATE_FILE
    first.save(str(path))
    again = searcher()
    again.restore(str(path))
    again.on_trial_complete("b", {"objective": 2.0})  # Tune re-ran it under its own id
    assert [again.suggest(f"n{i}") for i in range(4)] == uninterrupted[2:]
    assert again.suggest("n5") is CellSearcher.FINISHED
    cell = cell_of(uninterrupted[1])
    study = again._studies[cell.key]
    values = sorted(t.values[0] for t in study.trials if t.state.is_finished() and t.values)
    assert 2.0 in values
    assert sorted(c["cell_trial"] for c in uninterrupted if cell_of(c) == cell) == [1, 2, 3]
