"""A sweep that grows, end to end: run 2 budgets, add a third budget and a language, run the
same command again. The old trials are not re-run (their results rows are byte-identical,
their files untouched) and only the new cells train. tiny-llama, SFT, CPU."""

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


def write_spec(tmp: Path, name: str, **changes) -> Path:
    data = yaml.safe_load(SPEC.read_text())
    data["run"]["storage"] = str(tmp / "runs")
    data["methods"] = ["sft"]
    data["search"]["trials_per_cell"] = 1
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
