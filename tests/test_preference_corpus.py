"""Preference corpora: UltraFeedback binarized, plain JSONL and the built-in sample, with the
same per-row errors as the SFT formats (file, line or row, field) before any work starts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clo_ray.assets import (
    PREFERENCE_SAMPLE_REF,
    parallel_sample_path,
    preference_sample_path,
    preference_sample_rows,
)
from clo_ray.data.corpus import content_id, load_corpus
from clo_ray.errors import CorpusError

PREFS = [("Name a fruit.", "A mango is a sweet tropical fruit.", "A chair."),
         ("What is 2 + 2?", "2 + 2 = 4.", "It is 5.")]


def ultrafeedback_row(prompt: str, chosen: str, rejected: str) -> dict[str, Any]:
    """A row as HuggingFaceH4/ultrafeedback_binarized lays it out."""
    def chat(answer: str) -> list[dict[str, str]]:
        return [{"content": prompt, "role": "user"}, {"content": answer, "role": "assistant"}]
    return {"prompt": prompt, "prompt_id": "x" * 8, "chosen": chat(chosen),
            "rejected": chat(rejected), "messages": chat(chosen), "score_chosen": 8.0,
            "score_rejected": 3.0}


def plain_row(prompt: str, chosen: str, rejected: str) -> dict[str, Any]:
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def write_jsonl(path: Path, rows: list[Any]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), "utf-8")
    return str(path)


@pytest.mark.parametrize("layout, name", [(ultrafeedback_row, "uf.jsonl"),
                                          (plain_row, "plain.jsonl"),
                                          (ultrafeedback_row, "uf.parquet")])
def test_each_layout_gives_prompt_chosen_rejected(tmp_path, layout, name):
    rows = [layout(*p) for p in PREFS]
    path = tmp_path / name
    if name.endswith(".parquet"):
        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        write_jsonl(path, rows)
    corpus = load_corpus(str(path))
    assert corpus.format == ("ultrafeedback" if layout is ultrafeedback_row else "preference")
    assert corpus.preferences and corpus.table.column_names == [
        "id", "prompt", "response", "rejected", "source"]
    assert [(r["prompt"], r["response"], r["rejected"]) for r in corpus.table.to_pylist()] == PREFS
    # ids hash all three texts: another rejected answer is another row
    assert corpus.table.column("id").to_pylist()[0] == content_id(*PREFS[0])
    assert content_id(*PREFS[0]) != content_id(*PREFS[0][:2])


def test_same_answers_are_skipped_and_counted(tmp_path):
    rows = [plain_row(*PREFS[0]), plain_row("Say hi.", "Hi!", " Hi! "), plain_row(*PREFS[1])]
    corpus = load_corpus(write_jsonl(tmp_path / "p.jsonl", rows))
    assert len(corpus) == 2 and corpus.stats.same_answers == 1
    with pytest.raises(CorpusError, match="all 1 preference row.* same chosen and rejected"):
        load_corpus(write_jsonl(tmp_path / "q.jsonl", [rows[1]]))


def _uf(**change: Any) -> dict[str, Any]:
    row = ultrafeedback_row(*PREFS[1])
    for path, value in change.items():
        key, _, index = path.partition("__")
        if index:
            turn, field = index.split("_")
            row[key][int(turn)][field] = value
        else:
            row[key] = value
    return row


@pytest.mark.parametrize("bad, fmt, text", [
    (_uf(chosen__1_role="user"), "auto", "line 2: field 'chosen[1].role': wrong role order"),
    (_uf(rejected__0_content="Another question?"), "auto",
     "line 2: field 'rejected[0].content': the user turn is not the row's prompt"),
    (_uf(rejected=[]), "ultrafeedback", "line 2: field 'rejected': expected a non-empty list"),
    (_uf(prompt=None), "ultrafeedback", "line 2: field 'prompt': expected a non-empty string"),
    (plain_row("Hi?", "Hello.", ""), "auto",
     "line 2: field 'rejected': expected a non-empty string, got empty string"),
    ({"prompt": "Hi?", "chosen": "Hello."}, "preference", "line 2: field 'rejected': missing"),
    ({"prompt": "Hi?", "response": "Hello."}, "preference", "line 2: field 'chosen': missing"),
])
def test_bad_rows_name_file_line_and_field(tmp_path, bad, fmt, text):
    plain = fmt == "preference" or isinstance(bad.get("chosen"), str)
    first = plain_row(*PREFS[0]) if plain else ultrafeedback_row(*PREFS[0])
    path = write_jsonl(tmp_path / "bad.jsonl", [first, bad])
    with pytest.raises(CorpusError) as error:
        load_corpus(path, fmt)
    assert str(error.value).startswith(f"{path} {text}"), str(error.value)


def test_a_file_mixing_sft_and_preference_rows_is_refused(tmp_path):
    rows = [{"text": {"en": {"prompt": "Hi?", "chosen": "Hello.", "rejected": "No."}}},
            {"text": {"en": {"prompt": "Bye?", "response": "Goodbye."}}}]
    path = write_jsonl(tmp_path / "mixed.jsonl", rows)
    with pytest.raises(CorpusError, match=r"line 2: an SFT pair .* separate corpora"):
        load_corpus(path)


def test_builtin_preference_sample(tmp_path, monkeypatch):
    sample = [json.loads(line) for line in parallel_sample_path().read_text("utf-8").splitlines()]
    rows = preference_sample_rows()
    assert len(rows) == len(sample) == 250
    for row, source in zip(rows, sample, strict=True):
        partner = next(s for s in sample if s["id"] == row["rejected_from"])
        assert partner["topic"] != source["topic"]  # an off-topic reply
        for lang, side in row["text"].items():
            assert side == {"prompt": source["text"][lang]["prompt"],
                            "chosen": source["text"][lang]["response"],
                            "rejected": partner["text"][lang]["response"]}
    monkeypatch.setenv("CLO_RAY_CACHE", str(tmp_path))
    path = preference_sample_path()
    assert path.parent == tmp_path / "assets" and preference_sample_path() == path
    corpus = load_corpus(PREFERENCE_SAMPLE_REF, max_rows=5)
    assert corpus.format == "parallel" and corpus.preferences
    first = corpus.table.to_pylist()[0]
    en = rows[0]["text"]["en"]
    assert (first["prompt"], first["response"], first["rejected"]) == (
        en["prompt"], en["chosen"], en["rejected"])
