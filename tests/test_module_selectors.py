"""Trainable-module selectors (:mod:`clo_ray.models.selectors`): module sets, layer ranges,
regexes, selection by name only, known and fallback architectures."""

from __future__ import annotations

import pytest
import torch

from clo_ray.errors import ModuleSelectionError
from clo_ray.models.builtins import TINY_LLAMA_CONFIG
from clo_ray.models.resolve import llama_style_parameter_count
from clo_ray.models.selectors import MODULE_SETS, select_parameters


@pytest.fixture(scope="module")
def tiny_model():
    """tiny-llama's architecture with random weights: selection reads parameter names only."""
    from transformers import AutoConfig, AutoModelForCausalLM

    return AutoModelForCausalLM.from_config(AutoConfig.for_model(**TINY_LLAMA_CONFIG))


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

    config = Qwen2Config(vocab_size=128, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    model = AutoModelForCausalLM.from_config(config)
    attention = select_parameters(model, ["attention"])
    biases = [n for n in attention if n.endswith(".bias")]
    assert len(biases) == 6 and len(attention) == 14
    assert {n.split(".")[-2] for n in biases} == {"q_proj", "k_proj", "v_proj"}
    assert llama_style_parameter_count(config.to_dict()) == model.num_parameters()


def test_unknown_architecture_uses_regex_fallback() -> None:
    from transformers import AutoModelForCausalLM, GPT2Config

    config = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=128, n_positions=64,
                        bos_token_id=0, eos_token_id=0)
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
