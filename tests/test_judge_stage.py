"""The judge stage on real evaluations: tiny-llama trials judged by tiny-llama.

Three "trials" (two SFT, one CLO, each a real clo-ray checkpoint of tiny-llama with other
perturbed attention weights) are evaluated by the sweep's own ``evaluate_trial``, which keeps
their answers in storage; a results.parquet names them as a sweep would. tiny-llama is a
random model, so as a judge its verdicts are mostly unparseable: the tests check the pairing
(best SFT trial by the search metric), that every count adds up, what lands in
results.parquet, and that a re-run judges nothing twice.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from clo_ray import storage
from clo_ray.eval.judge import parse_verdict
from clo_ray.eval.judge_stage import run_judge_stage
from clo_ray.layout import RunLayout
from clo_ray.models.resolve import resolve_model
from clo_ray.report.schema import RESULTS_SCHEMA, load_results
from clo_ray.spec.schema import SweepSpec, load_spec

ROOT = Path(__file__).resolve().parents[1]
MAX_PROMPTS = 3
pytestmark = pytest.mark.slow


def _spec(storage_dir: Path, **judge) -> SweepSpec:
    data = yaml.safe_load((ROOT / "tests" / "specs" / "tiny_sweep.yaml").read_text())
    data["run"]["storage"] = str(storage_dir)
    data["evaluation"].update(
        max_prompts=MAX_PROMPTS, max_new_tokens=6,
        judge={"enabled": True, "model": "builtin:tiny-llama", "max_new_tokens": 8,
               "backend": "transformers", **judge})
    return load_spec(data)


def _checkpoint(base: torch.nn.Module, path: Path, seed: int):
    """A real clo-ray checkpoint: tiny-llama with its attention weights perturbed."""
    from ray.train import Checkpoint

    from clo_ray.train.checkpoint import save_trained, write_manifest

    generator = torch.Generator().manual_seed(seed)
    save_trained(path, 0, {name: p.detach() + 0.2 * torch.randn(p.shape, generator=generator)
                           for name, p in base.named_parameters() if "self_attn" in name})
    write_manifest(path, {"base_model": "builtin:tiny-llama", "stages": [{}]})
    return Checkpoint.from_directory(str(path))


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> dict:
    """Evaluated trials and the results.parquet of a small sweep over one cell (+ one SFT-less
    cell and a failed trial)."""
    from conftest import sample_translations
    from transformers import AutoModelForCausalLM

    from clo_ray.eval.evaluate import load_answers
    from clo_ray.eval.trial_eval import evaluate_trial

    tmp = tmp_path_factory.mktemp("judge")
    spec = _spec(tmp / "runs")
    eval_uri = str(tmp / "heldout.eval.parquet")
    pq.write_table(sample_translations("sw", limit=4), eval_uri)
    base = AutoModelForCausalLM.from_pretrained(resolve_model("builtin:tiny-llama"))
    trials = {}
    for seed, trial_id in enumerate(("sft-a", "sft-b", "clo-c"), start=1):
        checkpoint = _checkpoint(base, tmp / "runs" / "tiny" / "trials" / trial_id /
                                 "checkpoint_000001", seed)
        metrics = evaluate_trial(spec, "builtin:tiny-llama", "sw", checkpoint, eval_uri,
                                 beta=0.1)
        answers = load_answers(RunLayout.of(spec).trial_eval(checkpoint.path))
        trials[trial_id] = {"checkpoint": checkpoint.path, "metrics": metrics,
                            "answers": answers}

    def row(trial_id: str, method: str, objective: float | None, *, budget: int = 8,
            status: str = "completed", checkpoint: str | None = None) -> dict:
        metrics = trials.get(trial_id, trials["clo-c"])["metrics"]
        return {"run": "tiny", "trial_id": trial_id, "model": "tiny", "language": "sw",
                "method": method, "budget": budget, "status": status, "params": "{}",
                "checkpoint": checkpoint or trials.get(trial_id, trials["clo-c"])["checkpoint"],
                "target_fidelity": metrics["target_fidelity"], "objective": objective}

    rows = [row("sft-a", "sft", 0.2), row("sft-b", "sft", 0.9),  # the best SFT is second
            row("clo-c", "clo", 0.5),
            row("clo-lonely", "clo", 0.4, budget=16),  # its cell has no SFT trial
            row("clo-failed", "clo", None, status="failed"),
            {"run": "tiny", "trial_id": "base-tiny-sw", "model": "tiny", "language": "sw",
             "method": "base", "budget": 0, "status": "completed", "params": "{}"}]
    results_uri = str(tmp / "runs" / "tiny" / "results.parquet")
    storage.write_parquet_atomic(results_uri, pa.Table.from_pylist(rows, schema=RESULTS_SCHEMA))
    return {"tmp": tmp, "spec": spec, "trials": trials, "results": results_uri}


def _cache_files(spec: SweepSpec) -> list[Path]:
    return sorted(p for p in Path(spec.run.storage, "cache", "judge").glob("*.json")
                  if not p.name.startswith("."))  # not the checksum sidecars


def _by_trial(uri: str) -> dict[str, dict]:
    return {r["trial_id"]: r for r in load_results(uri).to_pylist()}


@pytest.mark.timeout(600)
def test_judges_against_best_sft_and_rerun_hits_cache(sweep: dict) -> None:
    spec, results = sweep["spec"], sweep["results"]
    answers = {t: v["answers"] for t, v in sweep["trials"].items()}
    assert all(a is not None and a.num_rows == MAX_PROMPTS for a in answers.values())
    assert answers["clo-c"].column("answer_target") != answers["sft-b"].column("answer_target")

    summary = run_judge_stage(spec)  # the real judge: tiny-llama, loaded by the stage
    assert summary is not None
    assert summary.pairs == {"clo-c": "sft-b"}  # best by objective, not the first listed
    assert summary.judged == 2 and summary.cached == 0  # held-out prompts: target, English
    assert "no completed SFT trial" in summary.skipped["clo-lonely"]
    assert "clo-failed" not in summary.skipped  # failed trials are not candidates

    caches = _cache_files(spec)
    records = {r["side"]: r for r in (json.loads(c.read_text()) for c in caches)}
    assert sorted(records) == ["english", "target"]
    rows = _by_trial(results)
    judgements = pq.read_table(summary.judgements).to_pylist()
    for side, prefix in (("target", "judge"), ("english", "english_judge")):
        record = records[side]
        assert (record["trial"], record["opponent"], record["prompt_set"]) == (
            "clo-c", "sft-b", "heldout")
        got = record["result"]
        assert got["n"] == MAX_PROMPTS and got["failed"] == 0
        assert got["wins"] + got["losses"] + got["ties"] + got["unparseable"] == MAX_PROMPTS
        judged = got["wins"] + got["losses"] + got["ties"]
        assert (got["win_rate"] is None) == (judged == 0)
        replies = record["replies"]
        assert len(replies) == 2 * MAX_PROMPTS  # both orders
        # a question counts as unparseable when either order's verdict is
        unparseable = sum(parse_verdict(a) is None or parse_verdict(b) is None
                          for a, b in zip(replies[:MAX_PROMPTS], replies[MAX_PROMPTS:],
                                          strict=True))
        assert got["unparseable"] == unparseable
        row = rows["clo-c"]
        assert row[f"{prefix}_win_rate"] == pytest.approx(got["win_rate"])
        assert (row[f"{prefix}_ties"], row[f"{prefix}_unparseable"], row[f"{prefix}_n"]) == (
            got["ties"], got["unparseable"], MAX_PROMPTS)
        [line] = [j for j in judgements if j["side"] == side]
        assert (line["trial_id"], line["opponent"], line["opponent_trial"]) == (
            "clo-c", "sft", "sft-b")
        assert line["n_items"] == MAX_PROMPTS and line["unparseable"] == unparseable
        assert len(json.loads(line["unparseable_items"])) == unparseable
        for other in ("sft-a", "sft-b", "clo-lonely", "clo-failed", "base-tiny-sw"):
            assert rows[other][f"{prefix}_win_rate"] is None
            assert rows[other][f"{prefix}_n"] is None

    def no_judge(prompts: list[str]) -> list[str]:
        raise AssertionError("a re-run must take every verdict from the cache")

    again = run_judge_stage(spec, judge=no_judge)
    assert again is not None and again.judged == 0 and again.cached == 2
    assert _by_trial(results) == rows
    assert _cache_files(spec) == caches


@pytest.mark.timeout(300)
def test_base_opponent_and_objective_completed(sweep: dict) -> None:
    spec = _spec(sweep["tmp"] / "runs", opponent="base", max_new_tokens=5)
    weights = {"target_fidelity": 1.0, "judge_win_rate": 1.0}
    spec = spec.model_copy(update={"evaluation": spec.evaluation.model_copy(
        update={"objective": spec.evaluation.objective.model_copy(update={"weights": weights})})})
    results = str(sweep["tmp"] / "base_results.parquet")
    storage.write_parquet_atomic(results, pq.read_table(sweep["results"]))
    asked: list[str] = []

    def prefers_a(prompts: list[str]) -> list[str]:
        asked.extend(prompts)
        return ["Verdict: A"] * len(prompts)  # pure position bias: a tie once both orders count

    summary = run_judge_stage(spec, results_uri=results, judge=prefers_a)
    assert summary is not None
    # every completed trial, SFT ones too, against the base model linked to it
    assert summary.pairs == dict.fromkeys(["sft-a", "sft-b", "clo-c", "clo-lonely"], "base")
    assert summary.judged == 6 and summary.cached == 2  # clo-lonely shares clo-c's answers
    assert len(asked) == 3 * 2 * 2 * MAX_PROMPTS  # 3 pairs, 2 prompt sets, both orders
    rows = _by_trial(results)
    for trial_id in summary.pairs:
        row = rows[trial_id]
        assert row["judge_win_rate"] == row["english_judge_win_rate"] == 0.5
        assert row["judge_ties"] == MAX_PROMPTS and row["judge_unparseable"] == 0
        assert row["objective"] == pytest.approx(row["target_fidelity"] + 0.5)
    assert rows["clo-failed"]["objective"] is None


def test_judge_off_leaves_results_alone(sweep: dict) -> None:
    from clo_ray.sweep.runner import STAGES

    assert STAGES.index("tune") < STAGES.index("judge") < STAGES.index("report")
    spec = _spec(sweep["tmp"] / "runs", enabled=False, model=None)
    before = Path(sweep["results"]).read_bytes()
    assert run_judge_stage(spec) is None
    assert Path(sweep["results"]).read_bytes() == before


@pytest.mark.timeout(300)
def test_opponents_statistics_and_alpaca_eval_export(sweep: dict) -> None:
    """SFT of the cell and SFT at the largest budget as opponents; judgements.parquet holds
    alpaca_eval's statistics; the exported files read back with alpaca_eval's own loader
    and its own metric code gives the same win rate from our annotations."""
    alpaca_utils = pytest.importorskip("alpaca_eval.utils")
    from alpaca_eval.metrics.winrate import get_winrate

    spec = _spec(sweep["tmp"] / "runs", opponents=["sft", "sft_largest"], bootstrap=20,
                 max_new_tokens=7)  # another judge setting: nothing cached by the tests above
    spec = spec.model_copy(update={"budgets": [8, 16]})
    table = pq.read_table(sweep["results"]).to_pylist()
    big = dict(next(r for r in table if r["trial_id"] == "sft-a"), trial_id="sft-big",
               budget=16)
    results = str(sweep["tmp"] / "runs" / "tiny" / "opponents_results.parquet")
    storage.write_parquet_atomic(results, pa.Table.from_pylist(table + [big],
                                                               schema=RESULTS_SCHEMA))

    def prefers_model(prompts: list[str]) -> list[str]:  # the model's answer is always first
        half = len(prompts) // 2
        return ["Verdict: A"] * half + ["Verdict: B"] * half

    summary = run_judge_stage(spec, results_uri=results, judge=prefers_model)
    assert summary is not None
    lines = pq.read_table(summary.judgements).to_pylist()
    pairs = {(j["trial_id"], j["opponent"], j["opponent_trial"]) for j in lines}
    assert pairs == {("clo-c", "sft", "sft-b"), ("clo-c", "sft_largest", "sft-big"),
                     ("sft-a", "sft_largest", "sft-big"), ("sft-b", "sft_largest", "sft-big"),
                     ("clo-lonely", "sft", "sft-big"), ("clo-lonely", "sft_largest", "sft-big")}
    for line in lines:  # every judged item a win: 100 +- 0
        assert (line["win_rate"], line["standard_error"]) == (100.0, 0.0)
        assert line["n_wins"] == line["n_total"] == MAX_PROMPTS and line["failed"] == 0
    rows = _by_trial(results)
    assert rows["clo-c"]["judge_win_rate"] == 1.0 and rows["clo-c"]["judge_win_rate_se"] == 0.0
    assert rows["sft-a"]["judge_win_rate"] is None  # headline opponent is sft: none for SFT

    folder = Path(RunLayout.of(spec).uri, "alpaca_eval", "heldout", "target", "clo-c")
    model = alpaca_utils.load_or_convert_to_dataframe(folder / "model_outputs.json")
    reference = alpaca_utils.load_or_convert_to_dataframe(
        folder / "vs-sft" / "reference_outputs.json")
    answers = sweep["trials"]["clo-c"]["answers"]
    assert list(model.columns) == ["instruction", "output", "generator", "dataset"]
    assert model["output"].tolist() == answers.column("answer_target").to_pylist()
    assert model["instruction"].tolist() == answers.column("prompt").to_pylist()
    assert reference["output"].tolist() == \
        sweep["trials"]["sft-b"]["answers"].column("answer_target").to_pylist()
    assert set(reference["generator"]) == {"sft-b"} and set(model["generator"]) == {"clo-c"}
    annotations = json.loads((folder / "vs-sft" / "annotations.json").read_text())
    assert get_winrate(annotations)["win_rate"] == 100.0
