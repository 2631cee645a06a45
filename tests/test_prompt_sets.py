"""Prompt sets: alpaca_eval, parallel and parquet files read as instructions; bad files named
with their row and field before anything runs; the built-in set in seven languages."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clo_ray.eval.prompt_sets import PromptSetError, load_prompt_set
from clo_ray.spec.evaluation import PromptSetSpec
from clo_ray.spec.schema import load_spec

ROOT = Path(__file__).resolve().parents[1]
ALPACA = [{"instruction": "Name three fruits.", "dataset": "helpful_base", "output": "x",
           "generator": "gpt4"},
          {"instruction": "Write a haiku about rain.", "dataset": "vicuna"}]


def _set(path: Path, **kw) -> PromptSetSpec:
    return PromptSetSpec(name="s", path=str(path), **kw)


def test_alpaca_eval_json_jsonl_and_parquet_read_alike(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_text(json.dumps(ALPACA))
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in ALPACA) + "\n")
    pq.write_table(pa.Table.from_pylist([{"instruction": r["instruction"],
                                          "dataset": r["dataset"]} for r in ALPACA]),
                   tmp_path / "a.parquet")
    tables = [load_prompt_set(_set(tmp_path / f"a.{ext}")).table
              for ext in ("json", "jsonl", "parquet")]
    assert tables[0].equals(tables[1]) and tables[0].equals(tables[2])
    first = tables[0].to_pylist()[0]
    assert first["instruction_en"] == "Name three fruits." and first["dataset"] == "helpful_base"
    assert first["id"].startswith("i-")  # a content id when the file has none
    assert load_prompt_set(_set(tmp_path / "a.json", max_prompts=1)).table.num_rows == 1


def test_parallel_prompt_set_keeps_its_languages(tmp_path: Path) -> None:
    rows = [{"id": "p1", "text": {"en": {"prompt": "Hello?"}, "sw": {"prompt": "Habari?"}}},
            {"id": "p2", "text": {"en": {"prompt": "Why?"}, "sw": {"prompt": "Kwa nini?"}}}]
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    found = load_prompt_set(_set(tmp_path / "p.jsonl"))
    assert found.languages == ("sw",)
    assert found.table.column("instruction_sw").to_pylist() == ["Habari?", "Kwa nini?"]
    assert found.table.column("id").to_pylist() == ["p1", "p2"]


@pytest.mark.parametrize("content, message", [
    ('[{"instruction": "ok"}, {"dataset": "x"}]', "row 2: field 'instruction' is missing"),
    ('[{"instruction": "ok"}, {"instruction": "  "}]', "row 2: field 'instruction' is empty"),
    ('[{"instruction": 3}]', "row 1: field 'instruction' is a int"),
    ('[{"instruction": "a", "id": 1}, {"instruction": "b", "id": 1}]', "id '1' is used twice"),
    ('[["instruction"]]', "row 1 is a list"),
    ('[{"instruction": "a"', "not valid JSON"),
    ('{"instruction": "a"}\n{"instruction": ', "line 2 is not valid JSON"),
    ('{"text": {"en": {"prompt": "a"}, "sw": {"prompt": "b"}}}\n'
     '{"text": {"en": {"prompt": "c"}}}', "row 2 has languages [], the first row ['sw']"),
    ('{"text": {"en": {"prompt": "a"}, "sw": {"response": "b"}}}',
     "row 1: field 'text.sw.prompt' is missing"),
    ("[]", "no instructions"),
])
def test_bad_prompt_sets_name_file_row_and_field(tmp_path: Path, content: str,
                                                 message: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(PromptSetError) as err:
        load_prompt_set(_set(path))
    assert message in str(err.value) and str(path) in str(err.value)


def test_missing_and_non_utf8_files(tmp_path: Path) -> None:
    with pytest.raises(PromptSetError, match="cannot read the file"):
        load_prompt_set(_set(tmp_path / "nope.json"))
    (tmp_path / "latin.json").write_bytes('[{"instruction": "caf\xe9"}]'.encode("latin-1"))
    with pytest.raises(PromptSetError, match="not UTF-8"):
        load_prompt_set(_set(tmp_path / "latin.json"))


def test_builtin_prompt_set_has_the_paper_languages() -> None:
    found = load_prompt_set(PromptSetSpec(name="builtin", path="builtin:eval-prompts"))
    assert found.table.num_rows >= 100
    assert set(found.languages) >= {"zh", "de", "ko", "id", "sw", "yo"}


def test_spec_checks_prompt_sets_judge_and_benchmarks() -> None:
    import yaml

    from clo_ray.errors import SpecError

    data = yaml.safe_load((ROOT / "tests" / "specs" / "tiny_sweep.yaml").read_text())
    data["evaluation"].update(
        prompt_sets=[{"name": "a", "path": "x.json"}, {"name": "a", "path": "y.json"},
                     {"name": "heldout", "path": "z.json"}],
        judge={"enabled": True, "backend": "endpoint", "opponents": ["sft", "sft"],
               "prompt_sets": ["nope"],
               "endpoint": {"base_url": "http://x/v1", "base_url_env": "URL", "model": "m",
                            "api_key_env": "sk-123"}},
        benchmarks=["mmmlu", "mmlu_pro"], benchmark_shots={"belebele": 1})
    with pytest.raises(SpecError) as err:
        load_spec(data)
    text = str(err.value)
    for line in ["evaluation.prompt_sets[2].name: reserved for the held-out pairs",
                 "evaluation.judge.opponents: one or more opponents, each once",
                 "evaluation.judge.endpoint.base_url: set exactly one of base_url and "
                 "base_url_env",
                 "evaluation.judge.endpoint.api_key_env: the NAME of an environment variable",
                 "evaluation.benchmarks[1]: unknown benchmark"]:
        assert line in text, text


def test_benchmarks_map_every_language_to_its_task() -> None:
    from clo_ray.benchmarks import benchmark_tasks

    expected = {"zh": ("mmmlu_zh_cn", "belebele_zho_Hans", "global_mmlu_zh"),
                "de": ("mmmlu_de_de", "belebele_deu_Latn", "global_mmlu_de"),
                "ko": ("mmmlu_ko_kr", "belebele_kor_Hang", "global_mmlu_ko"),
                "id": ("mmmlu_id_id", "belebele_ind_Latn", "global_mmlu_id"),
                "sw": ("mmmlu_sw_ke", "belebele_swh_Latn", "global_mmlu_sw"),
                "yo": ("mmmlu_yo_ng", "belebele_yor_Latn", "global_mmlu_yo")}
    names = ["mmmlu", "belebele", "global_mmlu"]
    for language, tasks in expected.items():
        found = benchmark_tasks(names, language)
        assert [t.task for t in found if t.language == language] == list(tasks)
        assert [t.task for t in found if t.language == "en"] == [
            "mmlu", "belebele_eng_Latn", "global_mmlu_en"]
        assert [t.shots for t in found if t.language == language] == [0, 1, 0]  # CRPO's
    assert [t.shots for t in benchmark_tasks(["belebele"], "sw", {"belebele": 5})] == [5, 5]
