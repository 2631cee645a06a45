"""Sweeps that grow: which spec changes extend a run, which are refused (naming each key with
its old and new value), and the run's generations in its spec record. The end-to-end grow
run (old trials untouched, only new cells train) is in tests/test_sweep_grow.py."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from clo_ray.errors import SpecError
from clo_ray.layout import RunLayout
from clo_ray.spec.schema import load_spec, spec_hash
from clo_ray.sweep.growth import claim_run, finished_by_cell, growth_problems

SPEC = Path(__file__).resolve().parent / "specs" / "tiny_sweep.yaml"


def base(tmp_path: Path) -> dict[str, Any]:
    data = yaml.safe_load(SPEC.read_text())
    data["run"]["storage"] = str(tmp_path / "runs")
    return data


def dump(data: dict[str, Any]) -> dict[str, Any]:
    return load_spec(data).model_dump(mode="json", by_alias=True)


def grown(data: dict[str, Any]) -> dict[str, Any]:
    more = copy.deepcopy(data)
    more["budgets"] = [8, 16]
    more["languages"] = ["sw", "zh"]
    more["models"].append({"name": "builtin:smollm2-135m"})
    more["methods"] = ["clo", "sft", "sft_dpo"]  # a built-in schedule joins
    more["search"]["trials_per_cell"] = 3
    more["search"]["repeats"] = 2
    return more


def test_added_grid_is_growth(tmp_path):
    data = base(tmp_path)
    assert growth_problems(dump(data), dump(grown(data))) == []
    moved = grown(data) | {"run": {**data["run"], "storage": str(tmp_path / "elsewhere")}}
    assert growth_problems(dump(data), dump(moved)) == []  # the folder's place is no meaning


def evaluated(data: dict[str, Any], *, sets: list[str], benchmarks: list[str],
              shots: dict[str, int] | None = None) -> dict[str, Any]:
    more = copy.deepcopy(data)
    more["evaluation"]["prompt_sets"] = [{"name": n, "path": "builtin:eval-prompts",
                                          "max_prompts": 2} for n in sets]
    more["evaluation"]["benchmarks"] = benchmarks
    more["evaluation"]["benchmark_shots"] = shots or {}
    return more


def test_added_prompt_sets_and_benchmarks_are_growth(tmp_path):
    data = evaluated(base(tmp_path), sets=["a"], benchmarks=["belebele"])
    more = evaluated(grown(data), sets=["a", "b"], benchmarks=["belebele", "mmmlu"],
                     shots={"mmmlu": 5})  # shots for an added benchmark: part of adding it
    more["evaluation"]["judge"] = {"prompt_sets": None}
    assert growth_problems(dump(data), dump(more)) == []


def test_changing_what_was_measured_is_refused(tmp_path):
    data = evaluated(base(tmp_path), sets=["a"], benchmarks=["belebele"])
    fewer = evaluated(data, sets=[], benchmarks=["belebele"])
    assert growth_problems(dump(data), dump(fewer))[0].startswith(
        "evaluation.prompt_sets: [{")
    capped = copy.deepcopy(data)
    capped["evaluation"]["prompt_sets"][0]["max_prompts"] = 3
    assert growth_problems(dump(data), dump(capped)) == [
        "evaluation.prompt_sets[a].max_prompts: 2 -> 3"]
    shots = evaluated(data, sets=["a"], benchmarks=["belebele"], shots={"belebele": 5})
    assert growth_problems(dump(data), dump(shots)) == [
        "evaluation.benchmark_shots.belebele: (default) -> 5 (a benchmark the run already "
        "measured)"]
    judged = copy.deepcopy(data)
    judged["evaluation"]["judge"] = {"prompt_sets": ["a"]}  # every set (null) -> a subset
    assert growth_problems(dump(data), dump(judged)) == [
        'evaluation.judge.prompt_sets: null -> ["a"]']


@pytest.mark.parametrize("change, lines", [
    (lambda d: d["schedules"]["clo"][0].update(lr=2e-3),
     ["schedules.clo[0].lr: 0.001 -> 0.002"]),
    (lambda d: d["run"].update(seed=7), ["run.seed: 0 -> 7"]),
    (lambda d: d["corpus"].update(max_rows=100), ["corpus.max_rows: null -> 100"]),
    (lambda d: d["models"][0].update(trust_remote_code=True),
     ["models[builtin:tiny-llama].trust_remote_code: false -> true"]),
    (lambda d: d.update(budgets=[16]), ["budgets: [8] -> [16] (removes 8)"]),
    (lambda d: d["search"].update(trials_per_cell=1),
     ["search.trials_per_cell: 2 -> 1 (only more is growth)"]),
    (lambda d: d["evaluation"].update(max_prompts=3, holdout=6),
     ["evaluation.holdout: 8 -> 6", "evaluation.max_prompts: 2 -> 3"]),
])
def test_meaning_changes_are_named_with_old_and_new(tmp_path, change, lines):
    data = base(tmp_path)
    changed = grown(data)  # growth and a change together: the change is still refused
    change(changed)
    assert growth_problems(dump(data), dump(changed)) == lines


def test_claim_records_generations_and_refuses_what_is_not_growth(tmp_path):
    first, second = load_spec(base(tmp_path)), load_spec(grown(base(tmp_path)))
    assert claim_run(first) == [first]
    assert claim_run(first) == [first]  # the same spec again: the same run
    generations = claim_run(second)
    assert [spec_hash(g) for g in generations] == [spec_hash(first), spec_hash(second)]
    assert generations[-1] is second and generations[0] == first
    layout = RunLayout.of(second)
    assert [g["spec_hash"] for g in layout.read_generations()] == [spec_hash(first),
                                                                   spec_hash(second)]
    assert len(claim_run(second)) == 2  # resuming the grown run adds no generation
    with pytest.raises(SpecError, match=r"has grown past this spec \(it is generation 1 of 2\)"):
        claim_run(first)
    changed = grown(base(tmp_path))
    changed["schedules"]["sft"][0]["steps"] = 3
    with pytest.raises(SpecError) as error:
        claim_run(load_spec(changed))
    text = str(error.value)
    assert "was started with a different spec" in text and "run.name" in text
    assert "schedules.sft[0].steps: 2 -> 3" in text


def test_earlier_trials_seed_the_new_generations_searchers():
    rows = [
        {"model": "m", "language": "sw", "method": "clo", "budget": 8, "status": "completed",
         "params": '{"lr": 0.001}', "objective": 0.5, "repeat": 0},
        {"model": "m", "language": "sw", "method": "clo", "budget": 8, "status": "failed",
         "params": '{"lr": 0.01}', "objective": None, "repeat": 0},
        {"model": "m", "language": "sw", "method": "clo", "budget": 8, "status": "completed",
         "params": '{"lr": 0.001}', "objective": 0.6, "repeat": 1},  # a repeat: not a search
        {"model": "m", "language": "sw", "method": "base", "budget": 0, "status": "completed",
         "params": "{}", "objective": None, "repeat": 0},
    ]
    done = finished_by_cell(rows, ["objective"])
    assert list(done) == ["m/sw/clo/8"]
    assert done["m/sw/clo/8"] == [{"params": {"lr": 0.001}, "values": [0.5], "index": 1},
                                  {"params": {"lr": 0.01}, "values": None, "index": 2}]


def test_a_job_resubmitted_from_a_new_working_dir_is_the_same_run(tmp_path, monkeypatch):
    """A RayJob retry unpacks the same working_dir under a new session folder: the spec's
    relative corpus path resolves elsewhere, yet it is the same run (and its grown
    generations load with today's paths). A plain driver in another folder is not."""
    import clo_ray.sweep.growth as growth

    corpus = Path(__file__).resolve().parents[1] / "clo_ray" / "assets" / "parallel_sample.jsonl"
    data = base(tmp_path)
    data["corpus"]["path"] = "clo_ray/assets/parallel_sample.jsonl"
    sessions = []
    for session in ("session_1", "session_2", "session_3"):
        here = tmp_path / session / "working_dir_files" / "_ray_pkg_x"
        (here / "clo_ray" / "assets").mkdir(parents=True)
        (here / "clo_ray" / "assets" / "parallel_sample.jsonl").write_bytes(corpus.read_bytes())
        sessions.append(here)
    monkeypatch.setattr(growth, "submitted_job_config",
                        lambda: {"runtime_env": {"working_dir": "gcs://_ray_pkg_x.zip"}})
    monkeypatch.chdir(sessions[0])
    first = load_spec(data)
    assert claim_run(first) == [first]
    recorded = RunLayout.of(first).read_spec_record()[1]
    assert recorded["corpus"]["path"] == growth.JOB_DIR + "/clo_ray/assets/parallel_sample.jsonl"
    monkeypatch.chdir(sessions[1])  # the retry
    again = load_spec(data)
    assert again.corpus.path != first.corpus.path and claim_run(again) == [again]
    monkeypatch.chdir(sessions[2])  # grown, from a third session: generation 1 loads here
    older, newer = claim_run(load_spec(grown(data)))
    assert older.corpus.path == str(sessions[2] / "clo_ray/assets/parallel_sample.jsonl")
    monkeypatch.setattr(growth, "submitted_job_config", lambda: None)  # not a job
    with pytest.raises(SpecError, match="corpus.path"):
        claim_run(load_spec(grown(data)))
