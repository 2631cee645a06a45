"""A sweep that grows, end to end: run 2 budgets, add a third budget and a language, run the
same command again. The old trials are not re-run (their results rows are byte-identical,
their files untouched) and only the new cells train. Then add a prompt set and a benchmark:
no trial trains, every finished trial and base row gains the new metrics, and a re-run
measures nothing again. tiny-llama, SFT, CPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "tests" / "specs" / "tiny_sweep.yaml"
pytestmark = pytest.mark.slow


BELEBELE = {"sw": "belebele_swh_Latn", "zh": "belebele_zho_Hans", "en": "belebele_eng_Latn"}


def benchmark_tasks(tmp: Path) -> Path:
    """Local tasks under BELEBELE's names (the real ones download their data), read by the
    real lm-eval: 2-choice questions, 1-shot as CRPO runs BELEBELE."""
    folder = tmp / "tasks"
    folder.mkdir(exist_ok=True)
    for language, name in BELEBELE.items():
        data = tmp / f"{name}.jsonl"
        data.write_text("".join(json.dumps({"question": f"{language} {i} + {i}?",
                                            "choices": [str(2 * i), str(2 * i + 1)],
                                            "answer": 0}) + "\n" for i in range(4)))
        (folder / f"{name}.yaml").write_text(yaml.safe_dump({
            "task": name, "dataset_path": "json", "test_split": "test",
            "fewshot_split": "test", "dataset_kwargs": {
                "data_files": {"test": str(data)}, "cache_dir": str(tmp / "hf")},
            "output_type": "multiple_choice", "doc_to_text": "Question: {{question}}\nAnswer:",
            "doc_to_choice": "{{choices}}", "doc_to_target": "{{answer}}",
            "metric_list": [{"metric": "acc", "aggregation": "mean",
                             "higher_is_better": True}]}))
    return folder


def write_spec(tmp: Path, name: str, **changes) -> Path:
    data = yaml.safe_load(SPEC.read_text())
    data["run"]["storage"] = str(tmp / "runs")
    data["methods"] = ["sft"]
    data["search"]["trials_per_cell"] = 1
    # lm-eval's settings from the start: changing them would change what was measured
    data["evaluation"]["lm_eval"] = {"include_path": str(benchmark_tasks(tmp)), "limit": 2,
                                     "batch_size": 2}
    data.update(changes)
    path = tmp / name
    path.write_text(yaml.safe_dump(data))
    return path


def sweep(tmp: Path, spec: Path) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([sys.executable, "-m", "clo_ray.sweep", str(spec)], cwd=tmp,
                          capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def rows(run_dir: Path) -> dict[str, dict]:
    table = pq.read_table(run_dir / "results.parquet")
    return {row["trial_id"]: row for row in table.to_pylist()}


def files(folder: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def grown(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("grow")
    run_dir = tmp / "runs" / "tiny"
    sweep(tmp, write_spec(tmp, "first.yaml", budgets=[4, 8]))
    before = rows(run_dir)
    trial_files = {p: t for p, t in files(run_dir / "trials").items()}
    cache = files(tmp / "runs" / "cache")
    spec = write_spec(tmp, "grown.yaml", budgets=[4, 8, 12], languages=["sw", "zh"])
    second = sweep(tmp, spec)
    return {"run_dir": run_dir, "before": before, "after": rows(run_dir),
            "trial_files": trial_files, "cache": cache, "cache_now": files(tmp / "runs" / "cache"),
            "second": second, "tmp": tmp}


def test_old_trials_are_kept_byte_for_byte(grown):
    before, after = grown["before"], grown["after"]
    old = {tid: row for tid, row in before.items() if row["method"] != "base"}
    assert len(old) == 2
    for trial_id, row in before.items():
        assert json.dumps(after[trial_id], sort_keys=True, default=str) == \
            json.dumps(row, sort_keys=True, default=str)
    now = {p: t for p, t in files(grown["run_dir"] / "trials").items()
           if p in grown["trial_files"]}
    assert now == grown["trial_files"]  # no file of a finished trial was written again


def test_only_the_new_cells_train(grown):
    before, after = grown["before"], grown["after"]
    new = [row for tid, row in after.items() if tid not in before and row["method"] != "base"]
    cells = sorted((row["language"], row["budget"]) for row in new)
    assert cells == [("sw", 12), ("zh", 4), ("zh", 8), ("zh", 12)]
    assert all(row["status"] == "completed" for row in new)
    bases = sorted(row["language"] for row in after.values() if row["method"] == "base")
    assert bases == ["sw", "zh"]
    # the Swahili translations and pairs of the first run were read, not made again
    changed = [p for p, t in grown["cache"].items() if grown["cache_now"].get(p) != t]
    assert changed == []


def test_the_run_records_both_generations_and_reports_the_union(grown):
    run_dir = grown["run_dir"]
    record = yaml.safe_load((run_dir / "spec.yaml").read_text())
    assert len(record["generations"]) == 2
    assert record["spec"]["budgets"] == [4, 8, 12]
    assert (run_dir / "tune").is_dir() and (run_dir / "tune-grow-1").is_dir()
    report = (run_dir / "report.md").read_text()
    assert "trials: 6 in 6 cells (1 models x 2 languages x 1 methods x 3 budgets)" in report


def test_a_meaning_change_is_refused_naming_the_keys(grown):
    tmp = grown["tmp"]
    spec = write_spec(tmp, "changed.yaml", budgets=[4, 8, 12], languages=["sw", "zh"])
    data = yaml.safe_load(spec.read_text())
    data["schedules"]["sft"][0]["lr"] = 5e-3
    data["run"]["seed"] = 3
    spec.write_text(yaml.safe_dump(data))
    done = subprocess.run([sys.executable, "-m", "clo_ray.sweep", str(spec)], cwd=tmp,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert "schedules.sft[0].lr: 0.001 -> 0.005" in done.stderr
    assert "run.seed: 0 -> 3" in done.stderr


@pytest.fixture(scope="module")
def evaluated(grown):
    """The grown run again with a prompt set and a benchmark added (generation 3)."""
    tmp, run_dir = grown["tmp"], grown["run_dir"]
    spec = write_spec(tmp, "evaluated.yaml", budgets=[4, 8, 12], languages=["sw", "zh"])
    data = yaml.safe_load(spec.read_text())
    data["evaluation"]["prompt_sets"] = [{"name": "extra", "path": "builtin:eval-prompts",
                                          "max_prompts": 2, "english": False}]
    data["evaluation"]["benchmarks"] = ["belebele"]
    spec.write_text(yaml.safe_dump(data))
    trial_files = files(run_dir / "trials")
    sweep(tmp, spec)
    after = rows(run_dir)
    records = files(run_dir / "eval")
    sweep(tmp, spec)  # the same spec again: nothing to measure
    return {"before": grown["after"], "after": after, "again": rows(run_dir),
            "trial_files": trial_files, "trial_files_now": files(run_dir / "trials"),
            "records": records, "records_now": files(run_dir / "eval"), "run_dir": run_dir}


def test_added_evaluations_measure_finished_trials_without_training(evaluated):
    before, after = evaluated["before"], evaluated["after"]
    assert set(after) == set(before)  # no new trial
    assert evaluated["trial_files_now"] == evaluated["trial_files"]  # nothing trained
    new = ("prompts.extra.target_fidelity", "prompts.extra.n_target", "benchmark.belebele",
           "benchmark.belebele.en")
    for trial_id, row in after.items():
        old = before[trial_id]
        assert {k: v for k, v in row.items() if k in old} == old  # what was measured stays
        if row["method"] == "base":
            assert row["prompts.extra.target_fidelity"] is not None
            assert row["benchmark.belebele"] is not None
            continue
        assert all(row[name] is not None for name in new if name in row), row
        assert row["prompts.extra.n_target"] == 2.0
        task = BELEBELE[row["language"]]
        assert row["benchmark.belebele"] == row[f"lm_eval.{task}"]
        assert 0.0 <= row["benchmark.belebele"] <= 1.0
    record = yaml.safe_load((evaluated["run_dir"] / "spec.yaml").read_text())
    assert len(record["generations"]) == 3
    added = [p for p in evaluated["records"] if p.name == "added.json"]
    assert len(added) == 6  # one per finished trial


def test_a_rerun_measures_nothing_again(evaluated):
    assert evaluated["again"] == evaluated["after"]
    assert evaluated["records_now"] == evaluated["records"]  # no evaluation file rewritten
