"""lm-evaluation-harness adapter on tiny-llama with a local task whose data this test writes.

Real lm-eval (TaskManager + simple_evaluate, the ``hf`` model) offline: the task reads a jsonl
file through the ``json`` dataset builder. tiny-llama has random weights, so accuracies are
arbitrary; what is checked is that they are real measurements of *these* data (a task and its
answer-flipped twin sum to 1), that counts and names follow the contract, that the cache is
used, that a trial's evaluation reports them and that they reach results.parquet and the report.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
import yaml
from pydantic import ValidationError

from clo_ray import storage
from clo_ray.eval.lm_eval import LmEvalError, flatten_results, run_lm_eval
from clo_ray.layout import RunLayout
from clo_ray.models.resolve import resolve_model
from clo_ray.spec.evaluation import EvaluationSection, LmEvalSection
from clo_ray.spec.schema import load_spec

ROOT = Path(__file__).resolve().parents[1]
TASK, FLIPPED = "clo_test_mc", "clo_test_mc_flipped"
N_DOCS, LIMIT = 6, 4


def _task_yaml(name: str, data: Path, cache: Path) -> dict:
    return {"task": name, "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": str(data)}, "cache_dir": str(cache)},
            "test_split": "test", "output_type": "multiple_choice",
            "doc_to_text": "Question: {{question}}\nAnswer:", "doc_to_choice": "{{choices}}",
            "doc_to_target": "{{answer}}",
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                            {"metric": "acc_norm", "aggregation": "mean",
                             "higher_is_better": True}]}


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory) -> Path:
    """Two 2-choice tasks on the same questions: the gold answer is choice 0 in one and
    choice 1 in the other, so whatever the model prefers, their accuracies sum to 1."""
    root = tmp_path_factory.mktemp("lm_eval")
    folder, cache = root / "tasks", root / "hf_datasets"
    folder.mkdir()
    for name, gold in ((TASK, 0), (FLIPPED, 1)):
        data = root / f"{name}.jsonl"
        rows = [{"question": f"How many legs does an animal number {i} have?",
                 "choices": [f"{2 * i} legs", f"{2 * i + 3} wings"], "answer": gold}
                for i in range(N_DOCS)]
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        (folder / f"{name}.yaml").write_text(yaml.safe_dump(_task_yaml(name, data, cache)))
    return folder


@pytest.fixture(scope="module")
def tiny_dir() -> Path:
    return resolve_model("builtin:tiny-llama")


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(key, "1")


@pytest.mark.timeout(300)
def test_local_tasks_on_tiny_llama_and_cache(tiny_dir: Path, tasks_dir: Path,
                                             tmp_path: Path) -> None:
    section = LmEvalSection(tasks=[TASK, FLIPPED], include_path=str(tasks_dir), limit=LIMIT,
                            batch_size=4)
    got = run_lm_eval(tiny_dir, section, cache_uri=str(tmp_path / "cache"), model_key="tiny")
    for task in (TASK, FLIPPED):
        assert {k for k in got.metrics if k.split(".")[1] == task} == {
            f"lm_eval.{task}", f"lm_eval.{task}.acc", f"lm_eval.{task}.acc_norm"}
        assert got.metrics[f"lm_eval.{task}"] == got.metrics[f"lm_eval.{task}.acc"]
        for value in (got.metrics[f"lm_eval.{task}.acc"],
                      got.metrics[f"lm_eval.{task}.acc_norm"]):
            assert 0.0 <= value <= 1.0 and value * LIMIT == pytest.approx(round(value * LIMIT))
    assert got.samples == {TASK: LIMIT, FLIPPED: LIMIT}
    # the same docs with the gold choice flipped: every doc is right in exactly one task
    assert got.metrics[f"lm_eval.{TASK}.acc"] + got.metrics[f"lm_eval.{FLIPPED}.acc"] == \
        pytest.approx(1.0)
    assert got.metrics[f"lm_eval.{TASK}.acc_norm"] + \
        got.metrics[f"lm_eval.{FLIPPED}.acc_norm"] == pytest.approx(1.0)
    assert (tmp_path / "cache" / "lm_eval.json").is_file()
    # a cache hit loads no model: a folder that does not exist would fail to load
    again = run_lm_eval(tmp_path / "no-model-here", section, cache_uri=str(tmp_path / "cache"),
                        model_key="tiny")
    assert again == got


@pytest.mark.timeout(120)
def test_errors_come_before_any_model_loads(tasks_dir: Path, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    missing_model = tmp_path / "no-model-here"
    typo = LmEvalSection(tasks=["clo_test_mx"], include_path=str(tasks_dir))
    with pytest.raises(LmEvalError, match=r"unknown lm-eval task.*did you mean clo_test_mc"):
        run_lm_eval(missing_model, typo)
    with pytest.raises(LmEvalError, match="include_path"):
        run_lm_eval(missing_model, LmEvalSection(tasks=[TASK]))
    with pytest.raises(LmEvalError, match="not a folder"):
        run_lm_eval(missing_model, LmEvalSection(tasks=[TASK],
                                                 include_path=str(tmp_path / "nowhere")))
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if not installed
    with pytest.raises(LmEvalError, match=r"pip install 'clo-ray\[lmeval\]'"):
        run_lm_eval(missing_model, LmEvalSection(tasks=[TASK], include_path=str(tasks_dir)))


@pytest.mark.timeout(120)
def test_unreadable_task_data_is_named(tiny_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "tasks"
    folder.mkdir()
    spec = _task_yaml("clo_test_gone", tmp_path / "gone.jsonl", tmp_path / "hf_datasets")
    (folder / "clo_test_gone.yaml").write_text(yaml.safe_dump(spec))
    with pytest.raises(LmEvalError, match=r"could not read the data of task\(s\) "
                                          r"\['clo_test_gone'\]"):
        run_lm_eval(tiny_dir, LmEvalSection(tasks=["clo_test_gone"], include_path=str(folder)))


def test_flatten_results_names_filters_and_groups() -> None:
    raw = {"results": {
        "gsm": {"alias": "gsm", "exact_match,strict-match": 0.25,
                "exact_match_stderr,strict-match": "N/A", "exact_match,flexible-extract": 0.5},
        "grp": {"acc,none": 0.4, "acc_stderr,none": 0.01, "acc_norm,none": 0.45},
        "grp_sub": {"acc,none": 0.3}},
        "configs": {"gsm": {"metric_list": [{"metric": "exact_match"}]}},
        "n-samples": {"gsm": {"original": 10, "effective": 5}, "grp_sub": {"effective": 7}}}
    got = flatten_results(raw, ["gsm", "grp"])
    assert got.metrics == {
        "lm_eval.gsm": 0.25, "lm_eval.gsm.exact_match.strict-match": 0.25,
        "lm_eval.gsm.exact_match.flexible-extract": 0.5,
        "lm_eval.grp": 0.4, "lm_eval.grp.acc": 0.4, "lm_eval.grp.acc_norm": 0.45}
    assert got.samples == {"gsm": 5, "grp_sub": 7}
    with pytest.raises(LmEvalError, match="no metric for task 'other'"):
        flatten_results(raw, ["other"])


def test_spec_section() -> None:
    assert not EvaluationSection().lm_eval.enabled  # off by default
    section = EvaluationSection(lm_eval={"tasks": ["belebele_swh_Latn"], "limit": 5},
                                objective={"weights": {"target_fidelity": 1.0,
                                                       "lm_eval.belebele_swh_Latn": 0.5}})
    assert section.lm_eval.enabled and "lm_eval.belebele_swh_Latn" in section.metric_names()
    for bad, message in (({"tasks": ["a.b"]}, "no '.'"), ({"tasks": ["x", "x"]}, "twice"),
                         ({"tasks": ["x"], "include_path": "s3://b/tasks"}, "local folder"),
                         ({"tasks": ["x"], "num_fewshot": -1}, "greater than or equal")):
        with pytest.raises(ValidationError, match=message):
            LmEvalSection(**bad)


# ------------------------------------------------------------------------------ in a trial


def _checkpoint(tiny_dir: Path, path: Path):
    """A real clo-ray checkpoint of tiny-llama with perturbed attention weights (what a
    trial's training leaves), as the ray.train.Checkpoint evaluate_trial receives."""
    from ray.train import Checkpoint
    from transformers import AutoModelForCausalLM

    from clo_ray.train.checkpoint import save_trained, write_manifest

    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    generator = torch.Generator().manual_seed(1)
    tensors = {name: p.detach() + 0.1 * torch.randn(p.shape, generator=generator)
               for name, p in model.named_parameters() if "self_attn" in name}
    save_trained(path, 0, tensors)
    write_manifest(path, {"base_model": "builtin:tiny-llama", "stages": [{}]})
    return Checkpoint.from_directory(str(path))


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_trial_reports_lm_eval_and_results_carry_it(tiny_dir: Path, tasks_dir: Path,
                                                    tmp_path: Path) -> None:
    from conftest import sample_translations
    from ray.tune import Result

    from clo_ray.eval.trial_eval import evaluate_trial
    from clo_ray.report.build import ReportOptions, build_report
    from clo_ray.report.schema import load_results, results_table

    data = yaml.safe_load((ROOT / "tests" / "specs" / "tiny_sweep.yaml").read_text())
    data["run"]["storage"] = str(tmp_path / "runs")
    data["evaluation"].update(max_prompts=2, max_new_tokens=4, lm_eval={
        "tasks": [TASK], "include_path": str(tasks_dir), "limit": LIMIT},
        objective={"weights": {"target_fidelity": 1.0, f"lm_eval.{TASK}": 1.0}})
    spec = load_spec(data)
    eval_uri = str(tmp_path / "heldout.eval.parquet")
    pq.write_table(sample_translations("sw", limit=3), eval_uri)
    checkpoint = _checkpoint(tiny_dir, tmp_path / "runs" / "tiny" / "trials" / "t0" / "ckpt_0")

    metrics = evaluate_trial(spec, "builtin:tiny-llama", "sw", checkpoint, eval_uri, beta=0.1)
    score = metrics[f"lm_eval.{TASK}"]
    assert 0.0 <= score <= 1.0 and f"lm_eval.{TASK}.acc_norm" in metrics
    assert metrics["objective"] == pytest.approx(metrics["target_fidelity"] + score)
    trial_uri = RunLayout.of(spec).trial_eval(checkpoint.path)
    for name in ("answers.parquet", "metrics.json", "lm_eval.json", "base.json"):
        assert storage.exists(storage.join(trial_uri, name)), name

    config = {"cell": {"model": "tiny", "language": "sw",
                       "method": "clo", "budget": 8}, "params": {"lr": 1e-3}}
    result = Result(metrics={**metrics, "config": config, "trial_done": True,
                             "trial_id": "t0", "checkpoint": checkpoint.path},
                    checkpoint=None, error=None, path=str(tmp_path / "t0"))
    results_uri = str(tmp_path / "results.parquet")
    storage.write_parquet_atomic(results_uri, results_table([result], spec))
    table = load_results(results_uri)
    assert table.column(f"lm_eval.{TASK}").to_pylist()[0] == pytest.approx(score)
    files = build_report(table, str(tmp_path / "report"),
                         ReportOptions(metrics=[f"lm_eval.{TASK}"], plots=False))
    assert f"lm_eval.{TASK}" in Path(files.markdown).read_text()


@pytest.mark.timeout(300)
def test_benchmarks_by_name_run_the_languages_tasks(tiny_dir: Path, tmp_path: Path) -> None:
    """``evaluation.benchmarks: [belebele]`` for Swahili runs belebele_swh_Latn and the
    English belebele_eng_Latn, 1-shot as in CRPO: here local tasks under those names (the
    real ones download their data) stand in, read by the real lm-eval."""
    from clo_ray.eval.lm_eval import run_benchmarks

    folder = tmp_path / "tasks"
    folder.mkdir()
    for name, gold in (("belebele_swh_Latn", 0), ("belebele_eng_Latn", 1)):
        data = tmp_path / f"{name}.jsonl"
        data.write_text("".join(json.dumps({"question": f"Swali {i}?", "choices": ["a", "b"],
                                            "answer": gold}) + "\n" for i in range(N_DOCS)))
        task = {**_task_yaml(name, data, tmp_path / "hf"), "fewshot_split": "test"}
        (folder / f"{name}.yaml").write_text(yaml.safe_dump(task))
    evaluation = EvaluationSection(benchmarks=["belebele"], lm_eval={
        "include_path": str(folder), "limit": LIMIT, "batch_size": 4})
    got = run_benchmarks(tiny_dir, evaluation, "sw", cache_uri=str(tmp_path / "out"),
                         model_key="tiny")
    assert got["benchmark.belebele"] == got["lm_eval.belebele_swh_Latn"]
    assert got["benchmark.belebele.en"] == got["lm_eval.belebele_eng_Latn"]
    record = json.loads((tmp_path / "out" / "benchmarks-1shot" / "lm_eval.json").read_text())
    assert set(record["result"]["samples"]) == {"belebele_swh_Latn", "belebele_eng_Latn"}
