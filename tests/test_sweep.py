"""The sweep end to end on tiny-llama (2 cells x 2 trials): real Ray Tune, Train, DeepSpeed.

One module-scoped run does the expensive part: the sweep is started as users start it
(``python -m clo_ray.sweep SPEC``), its driver is killed after the first trial finishes, and
the same command is run again; the tests then read what landed in storage.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "tests" / "specs" / "tiny_sweep.yaml"
pytestmark = pytest.mark.slow


# The paper's evaluation in miniature: a prompt set answered with sampling (3 built-in
# instructions), judged by tiny-llama against the cell's SFT trial and the base model.
PAPER_EVAL = {
    "evaluation.prompt_sets": [{"name": "builtin", "path": "builtin:eval-prompts",
                                "max_prompts": 3,
                                "generation": {"temperature": 0.8, "top_p": 0.95, "seed": 1}}],
    "evaluation.judge": {"enabled": True, "model": "builtin:tiny-llama",
                         "backend": "transformers", "max_new_tokens": 4,
                         "opponents": ["sft", "base"], "bootstrap": 10},
    # each cell's best configuration trained once more with another seed (error bars)
    "search.repeats": 2}


def write_spec(tmp: Path, name: str = "spec.yaml", **changes) -> Path:
    data = yaml.safe_load(SPEC.read_text())
    data["run"]["storage"] = str(tmp / "runs")
    for key, value in changes.items():
        section, field = key.split(".")
        data[section][field] = value
    path = tmp / name
    path.write_text(yaml.safe_dump(data))
    return path


def sweep_command(spec: Path) -> list[str]:
    return [sys.executable, "-m", "clo_ray.sweep", str(spec)]


def finished_trials(tune_dir: Path) -> int:
    states = sorted(tune_dir.glob("experiment_state-*.json"))
    if not states:
        return 0
    text = states[-1].read_text()
    return text.count('"TERMINATED"') + text.count('\\"TERMINATED\\"')


def history(run_dir: Path) -> dict[str, list[dict]]:
    out = {}
    for path in sorted((run_dir / "trials").glob("*/history.jsonl")):
        out[path.parent.name] = [json.loads(line) for line in path.read_text().splitlines()]
    return out


# Counts corpus loads in every process of a run (the driver, and Ray's workers, which inherit
# its environment): a sitecustomize on PYTHONPATH wraps load_corpus when the module loads.
COUNT_LOADS = """
import functools, importlib.abc, os, sys

class _CountCorpusLoads(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "clo_ray.data.corpus":
            return None
        sys.meta_path.remove(self)
        import importlib.util
        spec = importlib.util.find_spec(name)
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            load = module.load_corpus

            @functools.wraps(load)
            def counted(*args, **kwargs):
                with open(os.environ["CLO_RAY_TEST_LOAD_LOG"], "a") as fh:
                    fh.write(f"{os.getpid()}\\n")
                return load(*args, **kwargs)
            module.load_corpus = counted
        spec.loader.exec_module = exec_module
        return spec

sys.meta_path.insert(0, _CountCorpusLoads())
"""


def counting_env(tmp: Path) -> dict[str, str]:
    hook = tmp / "count_loads"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(COUNT_LOADS)
    path = os.pathsep.join(p for p in (str(hook), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, "CLO_RAY_TEST_LOAD_LOG": str(tmp / "loads.log")}


@pytest.fixture(scope="module")
def interrupted_and_resumed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sweep")
    spec = write_spec(tmp, **PAPER_EVAL)
    run_dir = tmp / "runs" / "tiny"
    env = counting_env(tmp)
    log = open(tmp / "first.log", "w")
    first = subprocess.Popen(sweep_command(spec), cwd=tmp, stdout=log, stderr=subprocess.STDOUT,
                             start_new_session=True, env=env)  # own process group: its Ray too
    deadline = time.time() + 600
    while finished_trials(run_dir / "tune") < 1:
        assert first.poll() is None, (tmp / "first.log").read_text()[-3000:]
        assert time.time() < deadline, "no trial finished in 10 minutes"
        time.sleep(2)
    os.killpg(first.pid, signal.SIGKILL)  # the driver and the Ray processes it started
    first.wait()
    before = history(run_dir)
    cache = tmp / "runs" / "cache"
    cached = {p: p.stat().st_mtime_ns for p in cache.rglob("*") if p.is_file()}
    done = subprocess.run(sweep_command(spec), cwd=tmp, capture_output=True, text=True,
                          timeout=1200, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return {"tmp": tmp, "spec": spec, "run_dir": run_dir, "before": before,
            "stdout": done.stdout, "stderr": done.stderr,
            "loads": (tmp / "loads.log").read_text().split(), "first_pid": first.pid,
            "after": history(run_dir), "cached": cached,
            "cache_now": {p: p.stat().st_mtime_ns for p in cache.rglob("*") if p.is_file()}}


def test_every_trial_lands_in_results_and_cells_learn_only_their_own(interrupted_and_resumed):
    run_dir = interrupted_and_resumed["run_dir"]
    results = pq.read_table(run_dir / "results.parquet").to_pylist()
    trials = [r for r in results if r["method"] != "base" and not r["repeat"]]
    assert len(trials) == 4 and all(r["status"] == "completed" for r in trials)
    assert sorted(r["method"] for r in trials) == ["clo", "clo", "sft", "sft"]
    assert all(0.0 <= r["target_fidelity"] <= 1.0 for r in trials)
    assert all(r["target_nll"] > 0 for r in trials)
    assert [r["budget"] for r in results if r["method"] == "base"] == [0]
    state = json.loads(sorted((run_dir / "tune").glob("searcher-state-*.pkl"))[-1].read_text())
    for cell, seen in state["finished"].items():
        method = cell.split("/")[2]
        lrs = {json.loads(r["params"])["lr"] for r in trials if r["method"] == method}
        assert {t["params"]["lr"] for t in seen} == lrs  # only its own cell's trials


def test_the_console_shows_progress_not_library_chatter(interrupted_and_resumed):
    """The resumed run's terminal: no worker or library output (it is in the log files), a
    line per training step, a progress line per finished trial counting the restored one
    (the log lines, on stderr), the best-per-cell table, then the paths (stdout)."""
    out = interrupted_and_resumed["stdout"].splitlines()
    err = interrupted_and_resumed["stderr"].splitlines()
    console = "\n".join(out + err)
    for chatter in ("TrainingReport(", "Trial status:", "Loading weights", "(RayTrainWorker",
                    "(TrainController", "Running Dataset", "it/s]"):
        assert chatter not in console, chatter
    progress = [line for line in err if " sweep: " in line]
    # 3 search trials left after the interruption, then 2 repeats; the restored one counts
    assert [p.split(" sweep: ")[1].split(" ")[0] for p in progress] == \
        ["2/6", "3/6", "4/6", "5/6", "6/6"], progress
    assert progress[-1].endswith("all done")
    finished = [line for line in err if " trial tiny-llama/sw/" in line]
    assert len(finished) == 5 and all("fidelity" in line for line in finished), finished
    steps = [line for line in err if "  step " in line and " tok/s | ETA " in line]
    assert len(steps) >= 5 * 2  # two steps per trial at report_every 1
    table = out.index(next(line for line in out if line.startswith("best trial per cell")))
    assert out[table + 1].split()[:4] == ["model", "language", "method", "budget"]
    assert {line.split()[2] for line in out[table + 3:table + 6]} == {"base", "CLO", "SFT"}
    run_dir = interrupted_and_resumed["run_dir"]
    assert f"report: {run_dir / 'report.md'}" in out and out[-1].startswith("results: ")
    assert len(out) + len(err) < 120, console
    log = (run_dir / "logs" / "sweep.log").read_text()
    assert "Started a local Ray instance" in log  # Ray's own lines: in the file, not here


def test_each_cells_best_configuration_is_repeated_with_another_seed(interrupted_and_resumed):
    """search.repeats 2: one more training per cell, of the cell's best trial's params, on
    its own subsample (another Ray Train run, another data set), judged against SFT's
    repeat; the report shows the mean over the two with its interval."""
    run_dir = interrupted_and_resumed["run_dir"]
    results = pq.read_table(run_dir / "results.parquet").to_pylist()
    repeats = [r for r in results if r["repeat"]]
    assert sorted(r["method"] for r in repeats) == ["clo", "sft"]
    for row in repeats:
        assert row["repeat"] == 1 and row["status"] == "completed"
        search = [r for r in results if r["method"] == row["method"] and not r["repeat"]]
        best = max(search, key=lambda r: r["objective"])
        assert row["params"] == best["params"]
        assert row["checkpoint"] not in {r["checkpoint"] for r in search}
    runs = {p.parent.name for p in (run_dir / "trials").glob("*/history.jsonl")}
    assert sum(name.endswith("-r1") for name in runs) == 2
    judgements = pq.read_table(run_dir / "judgements.parquet").to_pylist()
    clo_repeat = next(r for r in repeats if r["method"] == "clo")
    sft_repeat = next(r for r in repeats if r["method"] == "sft")
    [paired] = [j for j in judgements if j["trial_id"] == clo_repeat["trial_id"]
                and j["opponent"] == "sft" and j["side"] == "target"]
    assert paired["opponent_trial"] == sft_repeat["trial_id"]  # paired seeds
    assert " ±" in (run_dir / "report.md").read_text()  # the repeats' interval


def test_prompt_sets_are_answered_and_judged_against_each_opponent(interrupted_and_resumed):
    """Every trial and its base model answered the prompt set (sampled, in storage); the judge
    stage compared each trial with its cell's SFT trial and the base model, on both sides,
    with alpaca_eval's statistics in judgements.parquet and its files under alpaca_eval/."""
    run_dir = interrupted_and_resumed["run_dir"]
    results = pq.read_table(run_dir / "results.parquet").to_pylist()
    trials = {r["trial_id"]: r for r in results if r["method"] != "base"}
    assert all(row["prompts.builtin.target_fidelity"] is not None for row in trials.values())
    answers = list((run_dir / "eval").glob("*/*/sets/builtin/answers.parquet"))
    assert len(answers) == 6 and all(pq.read_table(a).num_rows == 3 for a in answers)
    base = list((run_dir.parent / "cache" / "eval" / "base").glob("*/sets/builtin/*.parquet"))
    assert len(base) == 1
    judgements = pq.read_table(run_dir / "judgements.parquet").to_pylist()
    expected = {(t, o, side) for t, r in trials.items() for o in ("sft", "base")
                for side in ("target", "english") if not (o == "sft" and r["method"] == "sft")}
    assert {(j["trial_id"], j["opponent"], j["side"]) for j in judgements} == expected
    for line in judgements:
        assert line["prompt_set"] == "builtin" and line["n_items"] == 3 and line["failed"] == 0
        judged = line["n_total"] or 0
        assert judged + line["unparseable"] == 3
    for trial_id, row in trials.items():
        if row["method"] == "clo":
            assert row["judge_n"] == 3  # the headline: against SFT, on the first prompt set
            folder = run_dir / "alpaca_eval" / "builtin" / "target" / trial_id
            outputs = json.loads((folder / "model_outputs.json").read_text())
            assert len(outputs) == 3 and {"instruction", "output", "generator"} <= set(
                outputs[0])
            assert (folder / "vs-sft" / "reference_outputs.json").is_file()
            assert (folder / "vs-base" / "reference_outputs.json").is_file()
        else:
            assert row["judge_n"] is None


def test_the_resumed_search_is_the_uninterrupted_one(interrupted_and_resumed):
    """Killed between trials and resumed: each cell's (trial index, params) are exactly what
    an uninterrupted run draws (the random sampler: draws do not depend on results)."""
    from clo_ray.spec.schema import load_spec
    from clo_ray.tune.searcher import CellSearcher

    spec = load_spec(interrupted_and_resumed["spec"])
    fresh = CellSearcher(spec, metrics=["objective"], modes=["max"], study_prefix="x")
    expected = set()
    for i in range(4):
        config = fresh.suggest(f"t{i}")
        expected.add((config["cell"]["method"], config["cell_trial"],
                      round(config["params"]["lr"], 12)))
    got = set()
    for params in (interrupted_and_resumed["run_dir"] / "tune").glob("*/params.json"):
        config = json.loads(params.read_text())
        got.add((config["cell"]["method"], config["cell_trial"],
                 round(config["params"]["lr"], 12)))
    assert got == expected


def test_report_files_exist_and_the_png_opens(interrupted_and_resumed):
    import matplotlib.image

    run_dir = interrupted_and_resumed["run_dir"]
    report = (run_dir / "report.md").read_text()
    assert "| tiny-llama |" in report and "CLO / SFT" in report
    image = matplotlib.image.imread(run_dir / "budget_curves_target_fidelity.png")
    assert image.shape[0] > 100 and image.shape[1] > 100


def test_resume_reruns_no_finished_trial_and_hits_the_caches(interrupted_and_resumed):
    before, after = interrupted_and_resumed["before"], interrupted_and_resumed["after"]
    finished = [name for name, rows in before.items()
                if rows and rows[-1].get("stage_step") == rows[-1].get("stage_steps")]
    assert finished, before
    for name in finished:  # a finished trial's training was not run again
        assert after[name] == before[name]
    # reference log-probs: computed once for the clo cell's data (8 pairs), then only read
    computed = {row["reference_computed"] for name, rows in after.items() if "-clo-" in name
                for row in rows}
    assert computed == {0, 8}, after
    # translations and reference log-probs written by the first run are untouched, none added
    cached, now = interrupted_and_resumed["cached"], interrupted_and_resumed["cache_now"]
    for kind in ("translations", "reference"):
        old = {p: t for p, t in cached.items() if f"/{kind}/" in str(p)}
        new = {p: t for p, t in now.items() if f"/{kind}/" in str(p)}
        assert old and {p: new.get(p) for p in old} == old, kind
        if kind == "translations":
            assert new == old  # (the clo repeat's own subsample adds a reference entry)


def test_a_changed_spec_under_the_same_run_name_is_refused(interrupted_and_resumed):
    tmp = interrupted_and_resumed["tmp"]
    changed = write_spec(tmp, "changed.yaml", **PAPER_EVAL, **{"evaluation.max_prompts": 3})
    done = subprocess.run(sweep_command(changed), cwd=tmp, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 2
    assert "was started with a different spec" in done.stderr and "run.name" in done.stderr


def test_readme_api_example(interrupted_and_resumed):
    """The README's Python example, on the finished tiny run (restored: nothing re-runs)."""
    readme = (ROOT / "README.md").read_text()
    code = re.search(r"```python\n(from clo_ray import.*?)```", readme, re.S).group(1)
    code = code.replace("sweeps/smoke.yaml", str(interrupted_and_resumed["spec"]))
    done = subprocess.run([sys.executable, "-c", code], cwd=interrupted_and_resumed["tmp"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "'method': " in done.stdout


def test_only_report_rebuilds_the_report_from_storage(interrupted_and_resumed):
    """``--only report`` redoes nothing but the report: results.parquet is read, not rewritten."""
    run_dir = interrupted_and_resumed["run_dir"]
    results = run_dir / "results.parquet"
    stamp = results.stat().st_mtime_ns
    (run_dir / "report.md").unlink()
    done = subprocess.run(sweep_command(interrupted_and_resumed["spec"]) + ["--only", "report"],
                          cwd=interrupted_and_resumed["tmp"], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| tiny-llama |" in (run_dir / "report.md").read_text()
    assert results.stat().st_mtime_ns == stamp
    assert "Started a local Ray instance" not in done.stderr  # the report needs no cluster


def test_the_corpus_is_loaded_once_per_driver_run(interrupted_and_resumed):
    """The pairs stage hands trials their data: no trial, train worker or evaluation task
    loads the corpus (it was 28 loads for the 12 trials of the smoke sweep before)."""
    loads = interrupted_and_resumed["loads"]
    assert len(loads) == 2, loads  # the killed driver run and the resumed one
    assert loads[0] == str(interrupted_and_resumed["first_pid"])  # the driver process itself


def test_report_cli_rebuilds_the_report_of_a_run_folder(interrupted_and_resumed):
    """``python -m clo_ray.report RUN_DIR`` on the folder the sweep wrote: it reads the spec
    record (``{spec_hash, spec}``) the sweep left there, as the README says."""
    run_dir = interrupted_and_resumed["run_dir"]
    (run_dir / "report.md").unlink()
    done = subprocess.run([sys.executable, "-m", "clo_ray.report", str(run_dir)],
                          cwd=interrupted_and_resumed["tmp"], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert str(run_dir / "report.md") in done.stdout.splitlines()
    report = (run_dir / "report.md").read_text()
    assert report.startswith("# tiny\n")  # the recorded spec's run.name (default: no title)
    assert "| tiny-llama |" in report


def test_report_cli_names_a_broken_spec_record(interrupted_and_resumed, tmp_path):
    import shutil

    run_dir = tmp_path / "runs" / "copy"
    run_dir.mkdir(parents=True)
    shutil.copy(interrupted_and_resumed["run_dir"] / "results.parquet", run_dir)
    (run_dir / "spec.yaml").write_text("[not, a, spec]\n")
    done = subprocess.run([sys.executable, "-m", "clo_ray.report", str(run_dir)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-3000:]
    assert str(run_dir / "spec.yaml") in done.stderr and "Traceback" not in done.stderr
