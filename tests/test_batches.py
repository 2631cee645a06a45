"""Encoding pairs into token ids and padded batches: order, masks, truncation, padding."""

from __future__ import annotations

import copy
from pathlib import Path

import pyarrow as pa
import pytest
import torch

from clo_ray.models.resolve import resolve_model
from clo_ray.train.batches import (
    EncodingError,
    Example,
    batches,
    collate,
    encode_examples,
    epoch_order,
    format_prompt,
)
from clo_ray.train.losses import EN_CHOSEN, EN_REJECTED, TGT_CHOSEN, TGT_REJECTED, sequence_logps

TEMPLATE = "### Instruction:\n{prompt}\n\n### Response:\n"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny-llama in a private cache shared by this session's modules (built once)."""
    return resolve_model("builtin:tiny-llama",
                         cache_dir=tmp_path_factory.getbasetemp() / "clo-ray-tiny")


@pytest.fixture(scope="module")
def tokenizer(tiny_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_dir)


@pytest.fixture(scope="module")
def plain_tokenizer(tokenizer):
    """The same tokenizer as a base model's: no chat template."""
    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    return plain


def split(tokenizer, example: Example, s: int) -> tuple[str, str]:
    """(prompt text, response text) of sequence ``s``, decoded."""
    ids, start = example.input_ids[s], example.response_starts[s]
    return tokenizer.decode(ids[:start]), tokenizer.decode(ids[start:])


def row(prompt_en: str, response_en: str, prompt: str, response: str) -> pa.Table:
    return pa.Table.from_pylist([{"id": "c-1", "language": "sw", "prompt_en": prompt_en,
                                  "response_en": response_en, "prompt": prompt,
                                  "response": response}])


def test_format_prompt_prefers_the_chat_template(tokenizer, plain_tokenizer) -> None:
    assert format_prompt(tokenizer, "Hi?", TEMPLATE) == "<s><|user|>\nHi?<|end|>\n<|assistant|>\n"
    assert format_prompt(plain_tokenizer, "Hi?", TEMPLATE) == TEMPLATE.format(prompt="Hi?")


@pytest.mark.parametrize("loss", ["clo", "dpo"])
def test_pair_sequences_in_loss_row_order(translations, tokenizer, loss: str) -> None:
    rows = translations("sw", limit=3)
    examples = encode_examples(rows, tokenizer, loss=loss, template=TEMPLATE, max_length=1024)
    eos = tokenizer.eos_token
    for example, r in zip(examples, rows.to_pylist(), strict=True):
        assert (example.id, example.language) == (r["id"], "sw")
        x_en, x_l = (format_prompt(tokenizer, r[k], TEMPLATE) for k in ("prompt_en", "prompt"))
        y_en, y_l = r["response_en"] + eos, r["response"] + eos
        assert split(tokenizer, example, EN_CHOSEN) == (x_en, y_en)
        assert split(tokenizer, example, EN_REJECTED) == (x_en, y_l)
        assert split(tokenizer, example, TGT_CHOSEN) == (x_l, y_l)
        assert split(tokenizer, example, TGT_REJECTED) == (x_l, y_en)


def preference_rows() -> pa.Table:
    return pa.Table.from_pylist([{
        "id": "u-1", "language": "sw", "prompt_en": "Name a fruit.", "response_en": "A mango.",
        "rejected_en": "A chair.", "prompt": "Taja tunda.", "response": "Embe.",
        "rejected": "Kiti."}])


@pytest.mark.parametrize("loss, dpo_pairs, expected", [
    # CRPO: four answers to the target prompt, hierarchy order y_w^t, y_w^e, y_l^t, y_l^e
    ("crpo", "cross_lingual", [("Taja tunda.", "Embe."), ("Taja tunda.", "A mango."),
                               ("Taja tunda.", "Kiti."), ("Taja tunda.", "A chair.")]),
    # CRPO's SFT+DPO: each language's chosen over its own rejected, in the dpo row order
    ("dpo", "monolingual", [("Name a fruit.", "A mango."), ("Name a fruit.", "A chair."),
                            ("Taja tunda.", "Embe."), ("Taja tunda.", "Kiti.")]),
    # CRPO's CLO baseline: the chosen answers, CLO's usual cross-lingual rows
    ("clo", "cross_lingual", [("Name a fruit.", "A mango."), ("Name a fruit.", "Embe."),
                              ("Taja tunda.", "Embe."), ("Taja tunda.", "A mango.")]),
])
def test_preference_layouts(tokenizer, loss: str, dpo_pairs: str,
                            expected: list[tuple[str, str]]) -> None:
    [example] = encode_examples(preference_rows(), tokenizer, loss=loss, template=TEMPLATE,
                                max_length=1024, dpo_pairs=dpo_pairs)
    eos = tokenizer.eos_token
    assert [split(tokenizer, example, s) for s in range(4)] == [
        (format_prompt(tokenizer, x, TEMPLATE), y + eos) for x, y in expected]


@pytest.mark.parametrize("loss, dpo_pairs", [("crpo", "cross_lingual"), ("dpo", "monolingual")])
def test_preference_layouts_on_sft_pairs_say_what_is_missing(translations, tokenizer, loss,
                                                             dpo_pairs) -> None:
    with pytest.raises(EncodingError, match=r"\['rejected', 'rejected_en'\].*preference corpus"):
        encode_examples(translations("sw", limit=2), tokenizer, loss=loss, template=TEMPLATE,
                        max_length=64, dpo_pairs=dpo_pairs)


@pytest.mark.parametrize("sft_data, expected", [
    ("target", [("prompt", "response")]),
    ("english", [("prompt_en", "response_en")]),
    ("both", [("prompt", "response"), ("prompt_en", "response_en")]),
])
def test_sft_sequences(translations, tokenizer, sft_data: str,
                       expected: list[tuple[str, str]]) -> None:
    r = translations("sw", limit=1).to_pylist()[0]
    [example] = encode_examples(translations("sw", limit=1), tokenizer, loss="sft",
                                template=TEMPLATE, max_length=1024, sft_data=sft_data)
    assert len(example.input_ids) == len(expected)
    for s, (prompt, response) in enumerate(expected):
        assert split(tokenizer, example, s) == (format_prompt(tokenizer, r[prompt], TEMPLATE),
                                                r[response] + tokenizer.eos_token)


def test_plain_template_without_chat_template(translations, plain_tokenizer) -> None:
    r = translations("sw", limit=1).to_pylist()[0]
    [example] = encode_examples(translations("sw", limit=1), plain_tokenizer, loss="sft",
                                template=TEMPLATE, max_length=1024)
    assert split(plain_tokenizer, example, 0) == (TEMPLATE.format(prompt=r["prompt"]),
                                                  r["response"] + plain_tokenizer.eos_token)


@pytest.mark.parametrize("max_length", [2, 9, 40])
def test_truncation_keeps_prompt_end_and_response_start(translations, tokenizer,
                                                        max_length: int) -> None:
    rows = translations("sw", limit=2)
    full = encode_examples(rows, tokenizer, loss="clo", template=TEMPLATE, max_length=4096)
    cut = encode_examples(rows, tokenizer, loss="clo", template=TEMPLATE, max_length=max_length)
    for whole, short in zip(full, cut, strict=True):
        for s in range(4):
            ids, start = short.input_ids[s], short.response_starts[s]
            full_ids, full_start = whole.input_ids[s], whole.response_starts[s]
            assert len(ids) == max_length and 1 <= start < len(ids)
            assert ids[:start] == full_ids[full_start - start:full_start]  # prompt's end
            assert ids[start:] == full_ids[full_start:full_start + len(ids) - start]


def test_truncation_keeps_a_short_response_whole(tokenizer) -> None:
    rows = row("word " * 300, "Yes.", "neno " * 300, "Ndiyo.")
    [example] = encode_examples(rows, tokenizer, loss="clo", template=TEMPLATE, max_length=32)
    assert split(tokenizer, example, EN_CHOSEN)[1] == "Yes." + tokenizer.eos_token
    assert split(tokenizer, example, TGT_CHOSEN)[1] == "Ndiyo." + tokenizer.eos_token
    assert all(len(ids) <= 32 for ids in example.input_ids)


def test_bad_settings_are_refused(translations, tokenizer, plain_tokenizer) -> None:
    rows = translations("sw", limit=1)
    with pytest.raises(EncodingError, match="row 'c-1': the prompt encodes to no tokens"):
        encode_examples(row("", "a", "", "b"), plain_tokenizer, loss="sft", template="{prompt}",
                        max_length=64)
    with pytest.raises(EncodingError, match="max_length 1"):
        encode_examples(rows, tokenizer, loss="clo", template=TEMPLATE, max_length=1)
    with pytest.raises(EncodingError, match="unknown loss 'ppo'"):
        encode_examples(rows, tokenizer, loss="ppo", template=TEMPLATE, max_length=64)
    with pytest.raises(EncodingError, match="unknown sft_data"):
        encode_examples(rows, tokenizer, loss="sft", template=TEMPLATE, max_length=64,
                        sft_data="all")


def test_collate_is_sequence_major_right_padded_and_masked() -> None:
    a = Example("a", "sw", ((1, 2, 3), (4, 5, 6, 7, 8)), (1, 2))
    b = Example("b", "sw", ((9, 10, 11, 12), (13, 14)), (3, 1))
    batch = collate([a, b], pad_id=99)
    assert {k: tuple(v.shape) for k, v in batch.items()} == {
        "input_ids": (4, 5), "attention_mask": (4, 5), "response_mask": (4, 5)}
    # row s * P + p = example p's sequence s
    assert batch["input_ids"].tolist() == [[1, 2, 3, 99, 99], [9, 10, 11, 12, 99],
                                           [4, 5, 6, 7, 8], [13, 14, 99, 99, 99]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 0],
                                                [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    assert batch["response_mask"].tolist() == [[0, 1, 1, 0, 0], [0, 0, 0, 1, 0],
                                               [0, 0, 1, 1, 1], [0, 1, 0, 0, 0]]
    assert collate([a], pad_id=None)["input_ids"][0].tolist() == [1, 2, 3, 0, 0]
    with pytest.raises(EncodingError, match="same number of sequences"):
        collate([a, Example("c", "sw", ((1, 2),), (1,))], pad_id=0)


def test_padding_does_not_change_log_probs(translations, tokenizer, tiny_dir: Path) -> None:
    """One padded CLO batch gives each sequence's log-probs as if it ran alone."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    examples = encode_examples(translations("sw", limit=3), tokenizer, loss="clo",
                               template=TEMPLATE, max_length=512)
    assert len({len(ids) for e in examples for ids in e.input_ids}) > 1  # real padding
    batch = collate(examples, tokenizer.pad_token_id)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logps, n_tokens = sequence_logps(logits, batch["input_ids"], batch["response_mask"])
        for s in range(4):
            for p, example in enumerate(examples):
                alone = collate([Example(example.id, "sw", (example.input_ids[s],),
                                         (example.response_starts[s],))], 0)
                expected, count = sequence_logps(model(input_ids=alone["input_ids"]).logits,
                                                 alone["input_ids"], alone["response_mask"])
                torch.testing.assert_close(logps.view(4, 3)[s, p], expected[0],
                                           rtol=1e-5, atol=1e-3)
                assert n_tokens.view(4, 3)[s, p] == count[0] == \
                    len(example.input_ids[s]) - example.response_starts[s]


def test_epoch_order_is_a_stable_permutation() -> None:
    order = epoch_order(50, seed=3, epoch=0)
    assert sorted(order) == list(range(50)) and order != list(range(50))
    assert order == epoch_order(50, seed=3, epoch=0)
    assert order != epoch_order(50, seed=3, epoch=1) != epoch_order(50, seed=4, epoch=0)
    assert epoch_order(0, seed=0, epoch=0) == []


def test_batches_follow_indices_in_micro_batches() -> None:
    examples = [Example(str(i), "sw", ((1, 2),), (1,)) for i in range(5)]
    chunks = list(batches(examples, [4, 0, 3, 1, 2], micro_batch=2))
    assert [[e.id for e in chunk] for chunk in chunks] == [["4", "0"], ["3", "1"], ["2"]]
    with pytest.raises(EncodingError, match="micro_batch"):
        next(batches(examples, [0], micro_batch=0))
