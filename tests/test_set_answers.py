"""A model's answers to a prompt set: greedy or sampled with a seed (reproducible), both
sides kept in storage with the settings, and a re-run that generates nothing."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest

from clo_ray import checked
from clo_ray.eval import set_answers
from clo_ray.eval.set_answers import answer_prompt_sets, load_set_answers
from clo_ray.models.resolve import resolve_model
from clo_ray.spec.evaluation import EvaluationSection
from clo_ray.spec.training import DEFAULT_PROMPT_TEMPLATE as TEMPLATE

pytestmark = pytest.mark.slow

INSTRUCTIONS = [("Name a fruit.", "Taja tunda moja."),
                ("What is two plus two?", "Mbili jumlisha mbili ni ngapi?"),
                ("Say hello.", "Sema jambo.")]


@pytest.fixture(scope="module")
def tables(tmp_path_factory) -> dict[str, dict[str, str]]:
    tmp = tmp_path_factory.mktemp("sets")
    out = {}
    for lang, column in (("en", 0), ("sw", 1)):
        uri = str(tmp / f"{lang}.parquet")
        checked.write_parquet(uri, pa.table({
            "id": [f"q{i}" for i in range(3)],
            "instruction_en": [q[0] for q in INSTRUCTIONS],
            "instruction": [q[column] for q in INSTRUCTIONS], "dataset": ["t"] * 3}))
        out[lang] = uri
    return {"s": out}


def _evaluation(**generation) -> EvaluationSection:
    return EvaluationSection(max_new_tokens=6, backend="transformers", prompt_sets=[
        {"name": "s", "path": "unused.json", "generation": generation}])


def test_sampled_answers_are_seeded_and_cached(tables, tmp_path: Path, monkeypatch) -> None:
    model = resolve_model("builtin:tiny-llama")
    sampled = _evaluation(temperature=1.5, top_p=0.95, seed=3)

    def run(evaluation: EvaluationSection, folder: str) -> tuple[dict, list[str]]:
        metrics = answer_prompt_sets(model, evaluation, tables, "sw", TEMPLATE,
                                     eval_uri=str(tmp_path / folder), model_key="tiny")
        table = load_set_answers(str(tmp_path / folder), "s")
        assert table is not None and table.num_rows == 3
        return metrics, table.column("answer_target").to_pylist() + \
            table.column("answer_english").to_pylist()

    metrics, first = run(sampled, "a")
    assert set(metrics) == {"prompts.s.target_fidelity", "prompts.s.english_retention",
                            "prompts.s.n_target", "prompts.s.n_english"}
    _, again = run(sampled, "b")
    assert again == first  # same seed, same answers
    _, other_seed = run(_evaluation(temperature=1.5, top_p=0.95, seed=4), "c")
    _, greedy = run(_evaluation(), "d")
    assert other_seed != first and greedy != first
    record = checked.read_json(str(tmp_path / "a" / "sets" / "s" / "metrics.json"))["result"]
    assert record["generation"] == {"temperature": 1.5, "top_p": 0.95, "seed": 3,
                                    "max_new_tokens": None}

    def no_model(*args, **kwargs):
        raise AssertionError("a cached prompt set must not load the model")

    monkeypatch.setattr(set_answers, "load_generator", no_model)
    assert run(sampled, "a") == (metrics, first)
