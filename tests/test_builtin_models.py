"""Built-in models (:mod:`clo_ray.models.builtins`): tiny-llama's build, tokenizer and cache,
SmolLM2's conversion, and tiny-llama in vLLM."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from clo_ray.models import builtins as builtin_models
from clo_ray.models.builtins import BUILD_COUNTS, BuiltinModel, materialize
from clo_ray.models.resolve import parameter_count, resolve_model

TINY = "builtin:tiny-llama"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny-llama built once for this module, in a private cache (not the user's)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CLO_RAY_CACHE", str(tmp_path_factory.mktemp("clo-cache")))
        return resolve_model(TINY)


@pytest.fixture(scope="module")
def tiny_model(tiny_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_dir)


@pytest.fixture(scope="module")
def tiny_tokenizer(tiny_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_dir)


# ------------------------------------------------------------------------------ tiny-llama


def test_tiny_llama_config_is_vllm_cpu_friendly(tiny_dir: Path, tiny_model) -> None:
    config = json.loads((tiny_dir / "config.json").read_text())
    assert config["model_type"] == "llama" and config["architectures"] == ["LlamaForCausalLM"]
    assert config["head_dim"] == 32 and tiny_model.config.head_dim == 32
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (4, 2)
    assert config["tie_word_embeddings"] is False and config["dtype"] == "float32"
    assert (tiny_dir / "generation_config.json").is_file()
    assert next(tiny_model.parameters()).dtype == torch.float32


def test_tiny_llama_generates(tiny_model, tiny_tokenizer) -> None:
    inputs = tiny_tokenizer("Hello", return_tensors="pt")
    out = tiny_model.generate(**inputs, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 5
    assert isinstance(tiny_tokenizer.decode(out[0]), str)


def test_tiny_llama_is_identical_across_builds(tiny_dir: Path, tmp_path: Path) -> None:
    torch.manual_seed(123)
    expected_draw = torch.rand(3)
    torch.manual_seed(123)
    again = resolve_model(TINY, cache_dir=tmp_path)
    assert torch.equal(torch.rand(3), expected_draw)  # the build left the caller's RNG alone
    assert again != tiny_dir
    first, second = (
        load_file(tiny_dir / "model.safetensors"),
        load_file(again / "model.safetensors"),
    )
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    # deterministic tokenizer training, not just weights
    assert (tiny_dir / "tokenizer.json").read_bytes() == (again / "tokenizer.json").read_bytes()


@pytest.mark.parametrize(
    "text",
    [
        "新鲜香草应该怎么保存,才能在厨房里放得更久?",
        "Báwo ni mo ṣe lè tọ́jú ewé ìdáná tútù kí wọ́n lè pẹ́ sí i?",
        "Ba\u0301wo ni mo s\u0323e",  # decomposed (NFD) Yoruba must round-trip unchanged too
        "신선한 허브를 보관하려면?  Größe, 🌿 and `code`\n\ttabs",
    ],
)
def test_tokenizer_round_trips_multilingual_text(tiny_tokenizer, text: str) -> None:
    ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tiny_tokenizer.decode(ids) == text


def test_tokenizer_has_special_tokens_and_full_vocab(tiny_tokenizer) -> None:
    assert len(tiny_tokenizer) == builtin_models.TINY_LLAMA_CONFIG["vocab_size"]
    assert (tiny_tokenizer.bos_token, tiny_tokenizer.eos_token) == ("<s>", "<|end|>")
    assert tiny_tokenizer.pad_token == "<pad>"
    # every id the model can emit decodes (reserved tokens pad a small sample's vocab)
    assert isinstance(tiny_tokenizer.decode(list(range(len(tiny_tokenizer)))), str)


def test_tokenizer_chat_template(tiny_tokenizer) -> None:
    messages = [
        {"role": "user", "content": "Habari?"},
        {"role": "assistant", "content": "Nzuri."},
        {"role": "user", "content": "Asante"},
    ]
    text = tiny_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text.startswith("<s><|user|>\nHabari?<|end|>\n<|assistant|>\nNzuri.<|end|>\n")
    assert text.endswith("<|user|>\nAsante<|end|>\n<|assistant|>\n")
    no_prompt = tiny_tokenizer.apply_chat_template(messages, tokenize=False)
    assert not no_prompt.endswith("<|assistant|>\n")
    ids = tiny_tokenizer(text)["input_ids"]
    assert ids.count(tiny_tokenizer.bos_token_id) == 1  # the template's, not a second one
    assert tiny_tokenizer.convert_tokens_to_ids("<|assistant|>") in ids


# ------------------------------------------------------------------------------- caching


def test_second_resolve_reuses_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CLO_RAY_CACHE", str(tmp_path))
    builds = BUILD_COUNTS["tiny-llama"]
    first = resolve_model(TINY)
    assert first.parent == tmp_path / "models"
    assert BUILD_COUNTS["tiny-llama"] == builds + 1
    start = time.perf_counter()
    assert resolve_model(TINY) == first
    assert time.perf_counter() - start < 0.5
    assert BUILD_COUNTS["tiny-llama"] == builds + 1
    assert not list((tmp_path / "models").glob(".*tmp-*"))


def test_cache_key_changes_with_sample_text(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    key = builtin_models._tiny_cache_key()
    assert key == builtin_models._tiny_cache_key()
    sample = tmp_path / "sample.jsonl"
    sample.write_text(json.dumps({"en": {"prompt": "a", "response": "b"}}) + "\n")
    monkeypatch.setattr(builtin_models, "parallel_sample_path", lambda: sample)
    assert builtin_models._tiny_cache_key() != key


def _fake_builtin(monkeypatch: pytest.MonkeyPatch, build) -> None:
    spec = BuiltinModel("fake", "test double", {}, lambda: "fake-v1", build)
    monkeypatch.setitem(builtin_models.BUILTINS, "fake", spec)


def test_concurrent_materialize_builds_once(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    calls: list[Path] = []

    def slow_build(out: Path) -> None:
        calls.append(out)
        time.sleep(0.3)
        (out / "config.json").write_text("{}")

    _fake_builtin(monkeypatch, slow_build)
    results: list[Path] = []
    threads = [
        threading.Thread(target=lambda: results.append(materialize("fake", tmp_path)))
        for _ in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1
    assert results == [tmp_path / "fake-v1"] * 4


def test_failed_build_leaves_nothing_behind(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    def broken_build(out: Path) -> None:
        (out / "config.json").write_text("{}")
        raise RuntimeError("disk full")

    _fake_builtin(monkeypatch, broken_build)
    with pytest.raises(RuntimeError, match="disk full"):
        materialize("fake", tmp_path)
    assert not (tmp_path / "fake-v1").exists()
    assert not list(tmp_path.glob(".fake-v1.tmp-*"))


def test_an_incomplete_cached_build_is_rebuilt(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A folder without config.json (what a rank-1 build once cached) is not a model."""
    calls: list[Path] = []

    def build(out: Path) -> None:
        calls.append(out)
        (out / "config.json").write_text("{}")

    _fake_builtin(monkeypatch, build)
    stale = tmp_path / "fake-v1"
    stale.mkdir()
    (stale / "tokenizer.json").write_text("{}")
    assert materialize("fake", tmp_path) == stale
    assert len(calls) == 1 and (stale / "config.json").is_file()
    assert not (stale / "tokenizer.json").exists()  # the stale folder was replaced whole


def test_a_build_on_a_distributed_rank_other_than_0_writes_the_model(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """transformers 5 skips save_pretrained on a torch.distributed rank != 0; inside a Ray
    Train worker group the rank that takes the build lock may be 1, and must still write."""
    from transformers.distributed import mixin

    monkeypatch.setattr(mixin, "_is_torch_distributed_initialized", lambda: True)
    monkeypatch.setattr(mixin, "_get_torch_distributed_rank", lambda: 1)
    path = materialize("tiny-llama", tmp_path)
    assert (path / "config.json").is_file()
    assert list(path.glob("*.safetensors"))


# --------------------------------------------------------------------------- SmolLM2 (slow)


@pytest.fixture(scope="session")
def smollm2_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("smollm2-cache")


@pytest.mark.slow
def test_smollm2_converts_once_and_chats_in_english(smollm2_cache: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    builds = BUILD_COUNTS["smollm2-135m"]
    start = time.perf_counter()
    path = resolve_model("builtin:smollm2-135m", cache_dir=smollm2_cache)
    convert_s = time.perf_counter() - start
    assert BUILD_COUNTS["smollm2-135m"] == builds + 1
    start = time.perf_counter()
    assert resolve_model("builtin:smollm2-135m", cache_dir=smollm2_cache) == path
    assert time.perf_counter() - start < 0.5 and BUILD_COUNTS["smollm2-135m"] == builds + 1
    assert list(path.glob("*.gguf")) == [] and (path / "model.safetensors").is_file()

    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    reload_s = time.perf_counter() - start
    assert model.num_parameters() == parameter_count("builtin:smollm2-135m")
    assert parameter_count(str(path)) == model.num_parameters()  # tied weights counted once
    assert tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    out = model.generate(**inputs, max_new_tokens=20, do_sample=False)
    answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    print(f"smollm2: convert {convert_s:.1f} s, reload {reload_s:.2f} s, answer {answer!r}")
    assert "Paris" in answer
