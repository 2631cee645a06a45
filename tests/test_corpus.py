"""Corpus loading: every format and file type, oasst1 selection, content ids, and errors that
name file, line/row and field. Fixtures are written per test under tmp_path."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clo_ray.assets import PARALLEL_SAMPLE_REF, parallel_sample_path
from clo_ray.data.corpus import content_id, corpus_fingerprint, load_corpus, to_ray_dataset
from clo_ray.errors import CorpusError

PAIRS = [
    ("Name a primary colour.", "Red is a primary colour."),
    ("How many legs does a spider have?", "A spider has eight legs."),
]


def write(path: Path, rows: list[Any], *, wrap: str | None = None) -> Path:
    """Write rows in the file type the suffix names (.jsonl, .json, .parquet, + .gz)."""
    name = path.name.removesuffix(".gz")
    if name.endswith(".parquet"):
        pq.write_table(pa.Table.from_pylist(rows), path)
        return path
    if name.endswith(".jsonl"):
        text = "".join(json.dumps(r) + "\n" for r in rows)
    else:
        text = json.dumps({wrap: rows} if wrap else rows, indent=1)
    data = text.encode()
    path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)
    return path


def pairs(corpus) -> list[tuple[str, str]]:
    return list(zip(corpus.table["prompt"].to_pylist(), corpus.table["response"].to_pylist(),
                    strict=True))


# ---------------------------------------------------------------- good paths

ROWS = {
    "alpaca": [{"instruction": p, "input": "", "output": r} for p, r in PAIRS],
    "sharegpt": [{"conversations": [{"from": "system", "value": "Be brief."},
                                    {"from": "human", "value": p}, {"from": "gpt", "value": r},
                                    {"from": "human", "value": "More?"}]} for p, r in PAIRS],
    "messages": [{"messages": [{"role": "user", "content": p},
                               {"role": "assistant", "content": r}]} for p, r in PAIRS],
    "prompt_response": [{"prompt": p, "response": r} for p, r in PAIRS],
    "parallel": [{"id": f"x{i}", "text": {"en": {"prompt": p, "response": r},
                                          "id": {"prompt": "Halo", "response": "Dunia"}}}
                 for i, (p, r) in enumerate(PAIRS)],
}


@pytest.mark.parametrize("fmt", sorted(ROWS))
@pytest.mark.parametrize("given", ["auto", "explicit"])
def test_each_format_reads_the_same_pairs(tmp_path, fmt, given):
    path = write(tmp_path / "c.jsonl", ROWS[fmt])
    corpus = load_corpus(str(path), fmt if given == "explicit" else "auto")
    assert corpus.format == fmt
    assert pairs(corpus) == PAIRS
    assert corpus.table.column_names == ["id", "prompt", "response", "source"]
    assert corpus.table["source"].to_pylist() == ["c.jsonl:1", "c.jsonl:2"]


@pytest.mark.parametrize("name", ["c.jsonl", "c.jsonl.gz", "c.json", "c.json.gz", "c.parquet"])
def test_file_types_give_identical_ids(tmp_path, name):
    reference = load_corpus(str(write(tmp_path / "ref.jsonl", ROWS["prompt_response"])))
    corpus = load_corpus(str(write(tmp_path / name, ROWS["prompt_response"])))
    assert corpus.table["id"] == reference.table["id"]
    assert corpus.fingerprint == reference.fingerprint
    first = f"{name}:1" if ".jsonl" in name else f"{name}:0"  # 1-based lines, 0-based rows
    assert corpus.table["source"][0].as_py() == first


def test_json_object_wrapping_a_list_and_alpaca_input(tmp_path):
    rows = [{"instruction": "Translate to German.", "input": " Good morning\r\n",
             "output": "Guten Morgen"}]
    path = write(tmp_path / "a.json", rows, wrap="data")
    assert pairs(load_corpus(str(path))) == [("Translate to German.\n\nGood morning",
                                              "Guten Morgen")]


def test_builtin_parallel_sample_is_english_side():
    corpus = load_corpus(PARALLEL_SAMPLE_REF)
    with open(parallel_sample_path(), encoding="utf-8") as fh:
        english = [json.loads(line)["text"]["en"] for line in fh if line.strip()]
    assert len(corpus) >= 1 and corpus.format == "parallel"
    assert corpus.table["prompt"][0].as_py() == english[0]["prompt"].strip()
    assert corpus.table["response"][0].as_py() == english[0]["response"].strip()


# ---------------------------------------------------------------- oasst1


def oasst1_messages() -> list[dict]:
    """Three English roots and one German; the expected picks are the 'BEST' replies."""
    def msg(mid, parent, role, text, lang="en", rank=None, **extra):
        return {"message_id": mid, "parent_id": parent, "role": role, "lang": lang,
                "text": text, "rank": rank, "deleted": False, "review_result": True, **extra}

    return [
        msg("r1", None, "prompter", "What is the capital of France?"),
        msg("a11", "r1", "assistant", "Lyon, I think.", rank=1),
        msg("a12", "r1", "assistant", "BEST Paris.", rank=2, deleted=True),
        msg("a13", "r1", "assistant", "BEST: Paris is the capital.", rank=0),
        msg("f1", "a13", "prompter", "And of Spain?"),  # a follow-up: not selected
        msg("r2", None, "prompter", "Wie spät ist es?", lang="de"),
        msg("a21", "r2", "assistant", "Keine Ahnung.", lang="de", rank=0),
        msg("r3", None, "prompter", "Tell me a joke."),
        msg("a31", "r3", "assistant", "Unranked joke.", rank=None),
        msg("r4", None, "prompter", "Is water wet?"),
        msg("a41", "r4", "assistant", "Rejected reply.", rank=0, review_result=False),
        msg("a42", "r4", "assistant", "BEST: It makes things wet.", rank=1),
    ]


def oasst1_trees(messages: list[dict]) -> list[dict]:
    """The same messages as the trees export: one row per root, replies nested."""
    def node(m):
        kids = [node(c) for c in messages if c["parent_id"] == m["message_id"]]
        return {k: v for k, v in m.items() if k != "parent_id"} | {"replies": kids}

    return [{"message_tree_id": m["message_id"], "prompt": node(m)}
            for m in messages if m["parent_id"] is None]


@pytest.mark.parametrize("export", ["flat", "trees", "flat-parquet"])
def test_oasst1_picks_top_ranked_reply_of_english_roots(tmp_path, export):
    messages = oasst1_messages()
    rows = oasst1_trees(messages) if export == "trees" else messages
    path = write(tmp_path / ("o.parquet" if "parquet" in export else "o.jsonl"), rows)
    corpus = load_corpus(str(path))
    assert corpus.format == "oasst1"
    assert pairs(corpus) == [("What is the capital of France?", "BEST: Paris is the capital."),
                             ("Is water wet?", "BEST: It makes things wet.")]
    assert corpus.stats.oasst1_other_language == 1
    assert corpus.stats.oasst1_no_ranked_reply == 1
    flat = load_corpus(str(write(tmp_path / "flat.jsonl", messages)))
    assert corpus.table["id"] == flat.table["id"]


# ---------------------------------------------------------------- ids, dedup, max_rows


def test_ids_are_stable_content_hashes(tmp_path):
    path = str(write(tmp_path / "c.jsonl", ROWS["prompt_response"]))
    first, second = load_corpus(path), load_corpus(path)
    assert first.table["id"] == second.table["id"]
    assert first.table["id"][0].as_py() == content_id(*PAIRS[0])
    assert first.table["id"][0].as_py().startswith("c-") and len(first.table["id"][0].as_py()) == 18
    assert corpus_fingerprint(first.table) == first.fingerprint
    assert corpus_fingerprint(first.table.slice(0, 1)) != first.fingerprint
    # the alpaca file with the same content shares ids: ids never depend on the format
    alpaca = load_corpus(str(write(tmp_path / "a.jsonl", ROWS["alpaca"])))
    assert alpaca.fingerprint == first.fingerprint


def test_duplicates_after_normalisation_are_dropped_first_kept(tmp_path):
    p, r = PAIRS[0]
    rows = [{"prompt": p, "response": r}, {"prompt": PAIRS[1][0], "response": PAIRS[1][1]},
            {"prompt": f"  {p}\r\n", "response": r + "\n"},
            {"prompt": p, "response": r}]
    corpus = load_corpus(str(write(tmp_path / "d.jsonl", rows)))
    assert pairs(corpus) == PAIRS
    assert corpus.stats.duplicates_removed == 2 and corpus.stats.rows_read == 4
    assert corpus.table["source"].to_pylist() == ["d.jsonl:1", "d.jsonl:2"]


def test_max_rows_applies_after_dedup(tmp_path):
    rows = [{"prompt": f"Question {i // 2}?", "response": "Answer."} for i in range(8)]
    corpus = load_corpus(str(write(tmp_path / "m.jsonl", rows)), max_rows=3)
    assert corpus.table["prompt"].to_pylist() == ["Question 0?", "Question 1?", "Question 2?"]
    assert corpus.stats.duplicates_removed == 4 and corpus.stats.dropped_by_max_rows == 1


def test_to_ray_dataset(tmp_path):
    import ray

    corpus = load_corpus(str(write(tmp_path / "c.jsonl", ROWS["prompt_response"])))
    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        ds = to_ray_dataset(corpus)
        assert ds.count() == 2
        assert sorted(r["id"] for r in ds.take_all()) == sorted(corpus.table["id"].to_pylist())
    finally:
        ray.shutdown()


# ---------------------------------------------------------------- malformed rows

GOOD = {"prompt": "Hi?", "response": "Hello."}
SHARE = {"from": "human", "value": "Hi?"}
OASST = oasst1_messages()[:2]

# (case id, file name, rows (raw str = a literal jsonl line), format, location, field, text)
MALFORMED = [
    ("missing", "b.jsonl", [ROWS["alpaca"][0], {"instruction": "x"}], "alpaca", "line 2",
     "'output'", "missing"),
    ("int", "b.jsonl", [GOOD, {"prompt": "x", "response": 5}], "auto", "line 2", "'response'",
     "expected a non-empty string, got int 5"),
    ("null", "b.jsonl", [{"prompt": None, "response": "y"}], "auto", "line 1", "'prompt'",
     "got null"),
    ("list", "b.jsonl", [GOOD, GOOD, {"prompt": ["a"], "response": "y"}], "auto", "line 3",
     "'prompt'", "got list"),
    ("empty", "b.jsonl", [{"prompt": "x", "response": ""}], "auto", "line 1", "'response'",
     "got empty string"),
    ("blank", "b.jsonl", [{"prompt": " \n\t", "response": "y"}], "auto", "line 1", "'prompt'",
     "whitespace-only"),
    ("alpaca-input", "b.jsonl", [{"instruction": "x", "input": 3, "output": "y"}], "auto",
     "line 1", "'input'", "expected a string or null"),
    ("broken-json", "b.jsonl", [GOOD, GOOD, '{"prompt": "x",'], "auto", "line 3", "broken JSON",
     "column"),
    ("not-object", "b.jsonl", [GOOD, "[1, 2]"], "auto", "line 2", "JSON object", "got list"),
    ("role-order", "b.jsonl", [{"conversations": [{"from": "gpt", "value": "a"}, SHARE]}],
     "auto", "line 1", "'conversations[0].from'", "wrong role order"),
    ("no-reply", "b.jsonl", [{"conversations": [{"from": "system", "value": "s"}, SHARE]}],
     "sharegpt", "line 1", "'conversations'", "end of conversation"),
    ("unknown-role", "b.jsonl", [{"messages": [{"role": "user", "content": "a"},
                                               {"role": "bot", "content": "b"}]}],
     "auto", "line 1", "'messages[1].role'", "expected one of"),
    ("empty-conv", "b.jsonl", [{"messages": []}], "auto", "line 1", "'messages'", "empty list"),
    ("turn-type", "b.jsonl", [{"messages": ["hi", "there"]}], "auto", "line 1", "'messages[0]'",
     "got string"),
    ("parallel-side", "b.jsonl", [{"id": "1", "text": {"de": {"prompt": "a", "response": "b"}}}],
     "parallel", "line 1", "'text.en'", "missing"),
    ("json-row", "b.json", [GOOD, "oops"], "auto", "row 1", "JSON object", "got string"),
    ("json-field", "b.json", [GOOD, GOOD, {"prompt": "x", "response": {"a": 1}}], "auto",
     "row 2", "'response'", "got object"),
    ("parquet-null", "b.parquet", [GOOD, {"prompt": "x", "response": None}], "auto", "row 1",
     "'response'", "got null"),
    ("oasst-root-role", "b.jsonl", [dict(OASST[0], role="assistant")] + OASST[1:], "oasst1",
     "line 1", "'role'", "wrong role order"),
    ("oasst-rank", "b.jsonl", [OASST[0], dict(OASST[1], rank="first")], "auto", "line 2",
     "'rank'", "expected an integer or null"),
    ("oasst-tree-reply", "b.jsonl",
     [{"prompt": dict(oasst1_trees(OASST)[0]["prompt"],
                      replies=[dict(OASST[1], role="prompter")])}],
     "auto", "line 1", "'prompt.replies[0].role'", "wrong role order"),
]


def write_raw(path: Path, rows: list[Any]) -> Path:
    """Like write(), but a str row in a jsonl file is written as the literal line."""
    if path.suffix == ".jsonl":
        path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
        return path
    return write(path, rows)


@pytest.mark.parametrize("case,name,rows,fmt,where,field,text", MALFORMED,
                         ids=[c[0] for c in MALFORMED])
def test_malformed_row_error_names_file_location_and_field(tmp_path, case, name, rows, fmt,
                                                            where, field, text):
    path = write_raw(tmp_path / name, rows)
    with pytest.raises(CorpusError) as info:
        load_corpus(str(path), fmt)
    message = str(info.value)
    assert message.startswith(f"{path} {where}: "), message
    assert field in message and text in message, message


def test_error_counts_the_other_bad_rows(tmp_path):
    rows = [GOOD] + [{"prompt": "x", "response": i} for i in range(8)]
    with pytest.raises(CorpusError, match=r"line 2: .*and 7 more malformed rows "
                                          r"\(lines 3, 4, 5, 6, 7, \.\.\.\)"):
        load_corpus(str(write(tmp_path / "b.jsonl", rows)))


# ---------------------------------------------------------------- file-level errors


def _file(tmp_path: Path, name: str, content: bytes | list | None) -> str:
    path = tmp_path / name
    if isinstance(content, list):
        write_raw(path, content)
    elif content is not None:
        path.write_bytes(content)
    return str(path)


FILE_ERRORS = [
    ("not-found", "none.jsonl", None, "auto", "file not found"),
    ("suffix", "c.csv", b"a,b\n", "auto", "unsupported file type"),
    ("gzip", "c.jsonl.gz", b"not gzip at all", "auto", "corrupt gzip"),
    ("gzip-truncated", "c.json.gz", gzip.compress(b'[{"prompt": "a", "response": "b"}]' * 50)[:-30],
     "auto", "corrupt gzip"),
    ("not-utf8", "c.jsonl", b'{"prompt": "\xff", "response": "b"}\n', "auto",
     "line 1: not UTF-8 text"),
    ("empty", "c.jsonl", b"\n\n", "auto", "has no rows"),
    ("format-name", "c.jsonl", [GOOD], "csv", "unknown corpus format 'csv'"),
    ("detect", "c.jsonl", [{"question": "q", "answer": "a"}], "auto",
     "cannot detect the corpus format from line 1's keys (question, answer)"),
    ("json-broken", "c.json", b'[{"prompt": "x",\n  "response" 1}]', "auto",
     "line 2 column 14: broken JSON"),
    ("json-is-jsonl", "c.json", b'{"prompt": "a", "response": "b"}\n{"prompt": "c"}\n', "auto",
     "belongs in a .jsonl file"),
    ("json-top", "c.json", b'{"a": [1], "b": [2]}', "auto", "top-level JSON must be a list"),
    ("parquet-column", "c.parquet", [{"instruction": "x"}], "alpaca",
     "no column 'output', needed by format 'alpaca'"),
    ("parquet-corrupt", "c.parquet", b"PAR1 nope", "auto", "not a readable parquet file"),
    ("oasst-no-english", "c.jsonl", oasst1_messages()[5:7], "auto",
     "no root prompt has lang 'en'"),
    ("oasst-no-ranked", "c.jsonl", oasst1_messages()[7:9], "auto",
     "none has a ranked assistant reply"),
]


@pytest.mark.parametrize("case,name,content,fmt,text", FILE_ERRORS, ids=[c[0] for c in FILE_ERRORS])
def test_file_level_errors(tmp_path, case, name, content, fmt, text):
    path = _file(tmp_path, name, content)
    with pytest.raises(CorpusError) as info:
        load_corpus(path, fmt)
    assert str(info.value).startswith(path) and text in str(info.value), str(info.value)


def test_detect_error_lists_the_formats(tmp_path):
    with pytest.raises(CorpusError, match=r"pass format= one of: alpaca \(instruction.*parallel"):
        load_corpus(_file(tmp_path, "c.jsonl", [{"question": "q"}]))


def test_unknown_builtin():
    with pytest.raises(CorpusError, match="unknown built-in corpus 'builtin:nope'; known: builtin"):
        load_corpus("builtin:nope")


@pytest.mark.parametrize("path", ["ftp://host/c.jsonl", "hdfs://nn/c.parquet"])
def test_unsupported_storage_scheme(path):
    with pytest.raises(CorpusError, match=r"unsupported storage URI scheme .* s3://"):
        load_corpus(path)
