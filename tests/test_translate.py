"""The translate stage end to end on the parallel backend (no model): Ray Data, the
translate-once cache, the quality policies, resume after a kill, and the errors that must
come before any work. The model backends are in test_translators.py."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from clo_ray.assets import PREFERENCE_SAMPLE_REF, parallel_sample_path, preference_sample_rows
from clo_ray.data.corpus import load_corpus
from clo_ray.errors import LanguageError, StorageError
from clo_ray.spec.schema import load_spec
from clo_ray.translate import preflight, stage
from clo_ray.translate.backends import TranslationError
from clo_ray.translate.cache import (
    OUTPUT_SCHEMA,
    PREFERENCE_OUTPUT_SCHEMA,
    TranslationCache,
    read_table,
    translation_key,
)
from clo_ray.translate.quality import REASONS
from clo_ray.translate.stage import translate_corpus

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ray_session():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    yield
    ray.shutdown()


def make_spec(storage: Path | str, *, languages: list[str] | None = None,
              **translator: Any) -> Any:
    return load_spec({
        "run": {"name": "t", "storage": str(storage)},
        "corpus": {"path": "builtin:parallel-sample"},
        "translator": {"backend": "parallel", **translator},
        "languages": languages or ["sw"],
        "models": [{"name": "builtin:tiny-llama"}], "methods": ["clo"], "budgets": [16]})


def sample_rows() -> list[dict[str, Any]]:
    return [json.loads(line) for line in parallel_sample_path().read_text("utf-8").splitlines()]


def write_parallel(path: Path, rows: list[dict[str, Any]]) -> str:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")
    return str(path)


def calls(log: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


# ---------------------------------------------------------------- end to end + cache


def test_parallel_backend_end_to_end_then_cache_hit(ray_session, tmp_path, translations,
                                                    monkeypatch):
    spec = make_spec(tmp_path / "store", languages=["sw", "zh"])
    corpus = load_corpus("builtin:parallel-sample", max_rows=30)
    log = tmp_path / "calls.jsonl"
    results = translate_corpus(spec, corpus=corpus, call_log=str(log), part_rows=8)

    assert list(results) == ["sw", "zh"]
    for lang, result in results.items():
        assert (result.rows, result.accepted, result.rejected, result.translated) == (30, 30, 0, 30)
        got = read_table(result.translations)
        assert got.schema.equals(OUTPUT_SCHEMA)
        assert got.to_pylist() == translations(lang, 30).to_pylist()  # the file's own text
        report = read_table(result.report).to_pylist()
        assert report == [{"language": lang, "total": 30, "passed": 30,
                           **dict.fromkeys(REASONS, 0)}]
        folder = Path(result.uri)
        assert folder.parent == tmp_path / "store" / "cache" / "translations"
        outputs = {"translations.parquet", "rejects.parquet", "report.parquet", "manifest.json"}
        assert {p.name for p in folder.iterdir()} == {
            "key.json", "parts", *outputs, *(f".{name}.check.json" for name in outputs)}
        assert len(list((folder / "parts").glob("part-first-*.parquet"))) == 4  # 8+8+8+6
        assert json.loads((folder / "manifest.json").read_text())["rows"] == 30
    assert {c["backend"] for c in calls(log)} == {"parallel"}
    assert sum(c["segments"] for c in calls(log)) == 2 * 30 * 2  # prompt + response, 2 langs

    # identical second run: manifest found, no pipeline built, no translator called
    monkeypatch.setattr(stage, "translator_stage", lambda *a, **k: pytest.fail("ran again"))
    log.unlink()
    again = translate_corpus(make_spec(tmp_path / "store", languages=["zh", "sw"], actors=2,
                                       batch_size=4), corpus=corpus, call_log=str(log))
    assert not log.exists() and list(again) == ["zh", "sw"]
    for lang in results:
        assert again[lang].cached and again[lang].key == results[lang].key
        assert again[lang].accepted == 30


def test_preferences_translate_prompt_chosen_and_rejected(ray_session, tmp_path, monkeypatch):
    """A preference corpus goes through the same stage and cache, with its rejected answer."""
    monkeypatch.setenv("CLO_RAY_CACHE", str(tmp_path / "cache"))
    spec = load_spec({
        "run": {"name": "t", "storage": str(tmp_path / "store")},
        "corpus": {"path": PREFERENCE_SAMPLE_REF},
        "translator": {"backend": "parallel", "path": PREFERENCE_SAMPLE_REF},
        "languages": ["sw"], "models": [{"name": "builtin:tiny-llama"}], "methods": ["crpo"],
        "schedules": {"crpo": [{"loss": "crpo", "modules": "attention", "steps": 1}]},
        "budgets": [4]})
    corpus = load_corpus(PREFERENCE_SAMPLE_REF, max_rows=12)
    log = tmp_path / "calls.jsonl"
    [result] = translate_corpus(spec, corpus=corpus, call_log=str(log)).values()
    got = read_table(result.translations)
    assert got.schema.equals(PREFERENCE_OUTPUT_SCHEMA) and result.accepted == 12
    expected = {row["text"]["en"]["prompt"]: row["text"] for row in preference_sample_rows()}
    for row in got.to_pylist():
        en, sw = expected[row["prompt_en"]]["en"], expected[row["prompt_en"]]["sw"]
        assert (row["response_en"], row["rejected_en"]) == (en["chosen"], en["rejected"])
        assert (row["prompt"], row["response"], row["rejected"]) == (
            sw["prompt"], sw["chosen"], sw["rejected"])
    assert sum(c["segments"] for c in calls(log)) == 12 * 3  # prompt, chosen, rejected
    log.unlink()
    again = translate_corpus(spec, corpus=corpus, call_log=str(log))
    assert again["sw"].cached and not log.exists()


def test_cache_key_changes_only_with_what_shapes_the_output(tmp_path):
    corpus = load_corpus("builtin:parallel-sample", max_rows=5)

    def key(lang: str = "sw", **translator: Any) -> str:
        spec = load_spec({
            "run": {"name": "t", "storage": str(tmp_path)},
            "corpus": {"path": "builtin:parallel-sample"},
            "translator": {"backend": "causal", "model": "builtin:tiny-llama", **translator},
            "languages": ["sw", "zh"], "models": [{"name": "builtin:tiny-llama"}],
            "methods": ["clo"], "budgets": [16]})
        return translation_key(preflight.key_inputs(spec, corpus, lang, "tiny@v1"))

    base = key()
    assert key(batch_size=3) == key(actors=4) == key(gpus_per_actor=1) == base
    changed = [key("zh"), key(max_new_tokens=7), key(num_beams=2), key(temperature=0.5),
               key(top_p=0.5), key(segment_max_chars=50),
               key(prompt_template="To {target_name}: {text}"),
               key(quality={"policy": "keep_flagged"}), key(quality={"langid_threshold": 0.9})]
    assert base not in changed and len(set(changed)) == len(changed)


# ---------------------------------------------------------------- policies


def _doctored(tmp_path: Path) -> tuple[str, dict[str, str]]:
    """The first 20 sample rows with four bad Swahili translations; id -> expected reason."""
    from clo_ray.data.corpus import content_id

    rows = sample_rows()[:20]
    bad = {0: "wrong_language", 2: "repetition", 3: "length_ratio", 1: "protected_lost"}
    rows[0]["text"]["sw"] = rows[0]["text"]["en"]  # left in English
    rows[2]["text"]["sw"]["response"] = " ".join(["ndiyo ndiyo sawa"] * 30)
    rows[3]["text"]["sw"]["response"] = rows[3]["text"]["sw"]["response"][:12]
    sw = rows[1]["text"]["sw"]  # p1-002: a python code block the translation must keep
    sw["response"] = sw["response"].replace("```python", "").replace("```", "")
    expected = {content_id(r["text"]["en"]["prompt"], r["text"]["en"]["response"]): bad[i]
                for i, r in enumerate(rows) if i in bad}
    return write_parallel(tmp_path / "doctored.jsonl", rows), expected


@pytest.mark.parametrize("policy", ["drop", "keep_flagged", "retry"])
def test_policies_put_failing_rows_in_rejects(ray_session, tmp_path, policy):
    path, expected = _doctored(tmp_path)
    corpus = load_corpus(path, max_rows=20)
    spec = make_spec(tmp_path / "store", path=path, quality={"policy": policy})
    (result,) = translate_corpus(spec, corpus=corpus).values()

    rejects = read_table(result.rejects).to_pylist()
    assert {r["id"]: r["reasons"] for r in rejects} == {i: [r] for i, r in expected.items()}
    kept = read_table(result.translations).to_pylist()
    if policy == "keep_flagged":  # kept, flagged, and also listed in rejects
        assert len(kept) == 20 and sum(bool(r["reasons"]) for r in kept) == 4
    else:  # drop, and retry (nothing to re-decode in a parallel file: it drops)
        assert len(kept) == 16 and not any(r["reasons"] for r in kept)
        assert not {r["id"] for r in kept} & set(expected)
    assert (result.accepted, result.rejected, result.retried) == (len(kept), 4, 0)
    report = read_table(result.report).to_pylist()[0]
    assert (report["total"], report["passed"]) == (20, 16)
    assert {r: report[r] for r in REASONS} == {r: list(expected.values()).count(r)
                                              for r in REASONS}
    assert result.reasons == {r: report[r] for r in REASONS}


# ---------------------------------------------------------------- errors before any work


def test_missing_parallel_row_or_language_names_the_row_and_file(tmp_path):
    rows = sample_rows()[:10]
    corpus = load_corpus("builtin:parallel-sample", max_rows=10)
    ids = corpus.table.column("id").to_pylist()
    without_row = write_parallel(tmp_path / "short.jsonl", rows[:4] + rows[5:])
    del rows[7]["text"]["sw"]
    without_sw = write_parallel(tmp_path / "nosw.jsonl", rows)
    store = tmp_path / "store"

    with pytest.raises(TranslationError) as err:
        translate_corpus(make_spec(store, path=without_row), corpus=corpus)
    assert ids[4] in str(err.value) and "short.jsonl" in str(err.value)
    assert "parallel_sample.jsonl:5" in str(err.value)  # where the corpus row came from
    with pytest.raises(TranslationError, match=f"{ids[7]}.*no 'sw' translation"):
        translate_corpus(make_spec(store, path=without_sw), corpus=corpus)
    with pytest.raises(TranslationError, match="cannot read the parallel file"):
        translate_corpus(make_spec(store, path=str(tmp_path / "absent.jsonl")), corpus=corpus)
    assert not store.exists()  # raised before anything was written


def test_unknown_language_and_unreadable_or_unwritable_storage(tmp_path):
    corpus = load_corpus("builtin:parallel-sample", max_rows=3)
    with pytest.raises(LanguageError, match="unknown language code 'xx'"):
        translate_corpus(make_spec(tmp_path), corpus=corpus, languages=["xx"])
    with pytest.raises(LanguageError, match="source language"):
        translate_corpus(make_spec(tmp_path), corpus=corpus, languages=["en"])
    spec = make_spec(tmp_path / "store")
    identity = preflight.translator_identity(spec)
    key = translation_key(preflight.key_inputs(spec, corpus, "sw", identity))
    manifest = tmp_path / "store" / "cache" / "translations" / key / "manifest.json"
    manifest.parent.mkdir(parents=True)
    manifest.mkdir()  # unreadable as a file: a storage problem, not a damaged entry
    with pytest.raises(StorageError, match=f"cannot read the translation cache's {manifest}"):
        translate_corpus(spec, corpus=corpus)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(StorageError, match=f"cannot write to the translation cache {blocker}"):
        translate_corpus(make_spec(blocker / "store"), corpus=corpus)


# ---------------------------------------------------------------- CLI, resume


def test_cli_runs_the_smoke_spec(ray_session, tmp_path, monkeypatch, capsys):
    from clo_ray.translate.__main__ import main

    monkeypatch.chdir(tmp_path)  # smoke.yaml's storage "runs" is relative
    assert main([str(ROOT / "sweeps" / "smoke.yaml"), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "runs/cache/translations/" in out and "pass%" in out
    assert [line.split()[:4] for line in out.splitlines() if line.startswith("sw ")][0] == \
        ["sw", "250", "250", "0"]
    assert main([str(ROOT / "sweeps" / "smoke.yaml"), "--languages", "xx"]) == 2
    assert "unknown language code 'xx'" in capsys.readouterr().err


@pytest.mark.slow
def test_resume_after_a_killed_run_translates_only_what_is_missing(tmp_path):
    spec = {"run": {"name": "resume", "storage": str(tmp_path / "store")},
            "corpus": {"path": "builtin:parallel-sample", "max_rows": 120},
            "translator": {"backend": "seq2seq", "model": "builtin:tiny-m2m100",
                           "max_new_tokens": 24,
                           "quality": {"policy": "keep_flagged"}},
            "languages": ["sw"], "models": [{"name": "builtin:tiny-llama"}],
            "methods": ["clo"], "budgets": [16]}
    parts = tmp_path / "store" / "cache" / "translations"

    def cli(log: str, batch_size: int) -> subprocess.Popen:
        spec["translator"]["batch_size"] = batch_size  # not part of the cache key
        spec_file = tmp_path / f"spec-{batch_size}.yaml"
        spec_file.write_text(json.dumps(spec))
        env = {**os.environ, stage.CALL_LOG_ENV: str(tmp_path / log)}
        return subprocess.Popen([sys.executable, "-m", "clo_ray.translate", str(spec_file),
                                 "--part-rows", "4", "--quiet"], env=env, cwd=tmp_path,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                start_new_session=True)

    first = cli("run1.jsonl", batch_size=2)  # small batches: slow enough to kill mid-way
    deadline = time.monotonic() + 240
    while not list(parts.glob("*/parts/part-*.parquet")) and first.poll() is None:
        assert time.monotonic() < deadline, "no part file appeared"
        time.sleep(0.2)
    os.killpg(first.pid, signal.SIGKILL)  # the CLI and the Ray it started
    first.wait()
    (folder,) = parts.iterdir()
    assert not (folder / "manifest.json").exists()
    cache = TranslationCache(str(parts), folder.name, "sw")
    kept = set(cache.read_parts().column("id").to_pylist())
    assert 0 < len(kept) < 120

    second = cli("run2.jsonl", batch_size=16)
    out = second.communicate(timeout=400)[0].decode()
    assert second.returncode == 0, out
    corpus_ids = load_corpus("builtin:parallel-sample", max_rows=120).table.column("id")
    translated_now = {i for c in calls(tmp_path / "run2.jsonl") for i in c["ids"]}
    assert translated_now == set(corpus_ids.to_pylist()) - kept
    final = pq.read_table(folder / "translations.parquet").column("id").to_pylist()
    assert final == corpus_ids.to_pylist()  # every row once, in corpus order


# ---------------------------------------------------------------- damaged cache files


def test_damaged_translation_files_are_set_aside_and_rebuilt(ray_session, tmp_path):
    """Truncate a part, an output and the manifest: the re-run names and moves each aside,
    translates only the rows of the damaged part again, and writes the same outputs."""
    spec = make_spec(tmp_path / "store")
    corpus = load_corpus("builtin:parallel-sample", max_rows=24)
    [result] = translate_corpus(spec, corpus=corpus, part_rows=8).values()
    folder, before = Path(result.uri), read_table(result.translations).to_pylist()
    parts = sorted((folder / "parts").glob("part-*.parquet"))
    assert len(parts) == 3
    for path in (parts[1], folder / "translations.parquet"):
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])

    log = tmp_path / "calls.jsonl"
    [again] = translate_corpus(spec, corpus=corpus, part_rows=8, call_log=str(log)).values()
    translated = {i for c in calls(log) for i in c["ids"]}
    assert len(translated) == 8  # the damaged part's rows, nothing else
    assert read_table(again.translations).to_pylist() == before
    aside = sorted(p.name.split(".corrupt-")[0] for p in folder.rglob("*.corrupt-*"))
    assert aside == ["manifest.json", parts[1].name, "translations.parquet"]

    (folder / "manifest.json").write_text("{not json")  # a damaged manifest alone
    log.unlink()
    [third] = translate_corpus(spec, corpus=corpus, part_rows=8, call_log=str(log)).values()
    assert not log.exists() or not calls(log)  # rebuilt from the parts: nothing translated
    assert read_table(third.translations).to_pylist() == before
    assert json.loads((folder / "manifest.json").read_text())["rows"] == 24


def test_a_damaged_output_read_directly_names_the_fix(ray_session, tmp_path):
    from clo_ray.checked import CorruptFileError

    spec = make_spec(tmp_path / "store")
    corpus = load_corpus("builtin:parallel-sample", max_rows=8)
    [result] = translate_corpus(spec, corpus=corpus).values()
    path = Path(result.translations)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte: same size, other checksum
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptFileError, match="checksum differs") as info:
        read_table(result.translations)
    assert str(path) in str(info.value) and "python -m clo_ray.translate" in str(info.value)


# ---------------------------------------------------------------- prompt sets


def test_an_english_prompt_set_is_translated_by_the_translate_stage(ray_session, tmp_path):
    """A prompt set given only in English goes through the same stage and cache as the
    training data (the paper translated AlpacaEval): here the spec's parallel translator
    holds instructions only. A second preparation reads the cache and translates nothing."""
    from clo_ray.eval.prompt_sets import load_prompt_set, prepare_prompt_sets, read_prompts
    from clo_ray.spec.evaluation import PromptSetSpec

    rows = [{"text": {"en": {"prompt": en}, "sw": {"prompt": sw}}} for en, sw in [
        ("Explain why the sky looks blue on a clear day.",
         "Eleza kwa nini anga huonekana kuwa la buluu siku isiyo na mawingu."),
        ("Give me three tips for saving money every month.",
         "Nipe vidokezo vitatu vya kuweka akiba ya pesa kila mwezi.")]]
    translator = write_parallel(tmp_path / "instructions.jsonl", rows)
    english = tmp_path / "alpaca.json"
    english.write_text(json.dumps([{"instruction": r["text"]["en"]["prompt"],
                                    "dataset": "mine"} for r in rows]))
    spec = make_spec(tmp_path / "store", path=translator)
    prompt_set = load_prompt_set(PromptSetSpec(name="alpaca", path=str(english)))
    assert prompt_set.languages == ()
    log = tmp_path / "calls.jsonl"
    os.environ[stage.CALL_LOG_ENV] = str(log)
    try:
        prepared = prepare_prompt_sets(spec, [prompt_set])
        sw = read_prompts(prepared["alpaca"]["sw"]).to_pylist()
        assert [r["instruction"] for r in sw] == [r["text"]["sw"]["prompt"] for r in rows]
        assert [r["instruction_en"] for r in sw] == [r["text"]["en"]["prompt"] for r in rows]
        assert {r["dataset"] for r in sw} == {"mine"}
        en = read_prompts(prepared["alpaca"]["en"]).to_pylist()
        assert [r["instruction"] for r in en] == [r["instruction_en"] for r in sw]
        translated = len(calls(log))
        assert translated >= 1
        assert prepare_prompt_sets(spec, [prompt_set]) == prepared
        assert len(calls(log)) == translated  # the second time: all from the caches
    finally:
        os.environ.pop(stage.CALL_LOG_ENV, None)
