"""Reference log-probs: sharded computation, storage round trip, lookup, cache keys."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from clo_ray.layout import RunLayout
from clo_ray.models.resolve import resolve_model
from clo_ray.train import reference as ref
from clo_ray.train.batches import Example, collate, encode_examples
from clo_ray.train.losses import sequence_logps

TEMPLATE = "### Instruction:\n{prompt}\n\n### Response:\n"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    """(model, tokenizer) of tiny-llama from a private cache shared by this session."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model("builtin:tiny-llama",
                         cache_dir=tmp_path_factory.getbasetemp() / "clo-ray-tiny")
    return AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)


@pytest.fixture
def examples(tiny, translations) -> list[Example]:
    """5 CLO pairs, cut short so the model runs fast."""
    _, tokenizer = tiny
    return encode_examples(translations("sw", limit=5), tokenizer, loss="clo",
                           template=TEMPLATE, max_length=48)


@pytest.fixture
def all_at_once(tiny, examples) -> torch.Tensor:
    model, tokenizer = tiny
    return ref.compute_reference_logps(model, examples, micro_batch=2,
                                       pad_id=tokenizer.pad_token_id)


def test_compute_matches_one_batch_and_restores_mode(tiny, examples, all_at_once) -> None:
    model, tokenizer = tiny
    assert all_at_once.shape == (5, 4) and all_at_once.dtype == torch.float32
    batch = collate(examples, tokenizer.pad_token_id)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    expected, _ = sequence_logps(logits, batch["input_ids"], batch["response_mask"])
    torch.testing.assert_close(all_at_once, expected.view(4, 5).T, rtol=1e-5, atol=1e-3)
    model.train()
    ref.compute_reference_logps(model, examples[:1], micro_batch=1, pad_id=0)
    assert model.training  # mode restored (eval while computing: no dropout)
    model.eval()


def test_sharded_cache_round_trip(tiny, examples, all_at_once, tmp_path: Path) -> None:
    model, tokenizer = tiny
    uri = ref.reference_uri(RunLayout(str(tmp_path), "run").reference, "k1")
    assert uri == str(tmp_path / "cache" / "reference" / "k1")
    assert not ref.shard_complete(uri, 2)
    for rank in range(2):  # what each of 2 workers does
        shard = examples[rank::2]
        logps = ref.compute_reference_logps(model, shard, micro_batch=2,
                                            pad_id=tokenizer.pad_token_id)
        ref.write_shard(uri, shard, logps, rank=rank, world=2)
        assert ref.shard_complete(uri, 2) == (rank == 1)
    assert ref.shard_complete(uri, 4)  # a 2-worker cache serves a 4-worker trial
    reference = ref.read_reference(uri)
    assert set(reference) == {e.key for e in examples}
    merged = torch.tensor([reference[e.key] for e in examples])
    torch.testing.assert_close(merged, all_at_once, rtol=1e-5, atol=1e-3)
    # lookup: [S, P] in the layout of collate(...).view(S, P)
    picked = [examples[3], examples[0]]
    torch.testing.assert_close(ref.lookup(reference, picked), merged[[3, 0]].T)


def test_missing_shard_and_duplicates_are_errors(examples, all_at_once, tmp_path: Path) -> None:
    uri = str(tmp_path / "ref")
    with pytest.raises(ref.ReferenceCacheError, match="no shards"):
        ref.read_reference(uri)
    ref.write_shard(uri, examples[0::2], all_at_once[0::2], rank=0, world=2)
    with pytest.raises(ref.ReferenceCacheError,
                       match=r"of 2 workers, ranks \[0\] present and \[1\] missing"):
        ref.read_reference(uri)
    ref.write_shard(uri, examples[:2], all_at_once[:2], rank=1, world=2)  # overlaps rank 0
    with pytest.raises(ref.ReferenceCacheError, match="appears twice"):
        ref.read_reference(uri)
    with pytest.raises(ref.ReferenceCacheError, match="examples but"):
        ref.write_shard(uri, examples[:2], all_at_once[:3], rank=0, world=2)


def test_lookup_keys_by_language_and_refuses_unknown(examples, all_at_once,
                                                     tmp_path: Path) -> None:
    """A multi-target trial holds one English-pair id per language: both are kept apart."""
    other = [dataclasses.replace(e, language="zh") for e in examples[:2]]
    uri = str(tmp_path / "ref")
    ref.write_shard(uri, [*examples[:2], *other], torch.cat([all_at_once[:2],
                                                              all_at_once[:2] - 1]),
                    rank=0, world=1)
    reference = ref.read_reference(uri)
    torch.testing.assert_close(ref.lookup(reference, other),
                               ref.lookup(reference, examples[:2]) - 1)
    with pytest.raises(ref.ReferenceCacheError, match="sw:"):
        ref.lookup(reference, examples[2:3])


def test_empty_shard_counts_as_written(tmp_path: Path) -> None:
    """More workers than examples: the idle worker's empty shard completes the set."""
    ref.write_shard(str(tmp_path), [], torch.zeros((0, 0)), rank=0, world=1)
    assert ref.shard_complete(str(tmp_path), 1) and ref.read_reference(str(tmp_path)) == {}


def test_reference_key_changes_with_each_input() -> None:
    base = dict(model_ref="builtin:tiny-llama", data_fingerprint="abc", template=TEMPLATE,
                max_length=512, loss="clo", sft_data=None)
    key = ref.reference_key(**base)
    assert key == ref.reference_key(**base) and len(key) == 20
    changed = [dict(base, model_ref="builtin:smollm2-135m"), dict(base, data_fingerprint="abd"),
               dict(base, template="{prompt}\n"), dict(base, max_length=1024),
               dict(base, loss="sft"), dict(base, loss="sft", sft_data="both"),
               dict(base, loss="crpo"), dict(base, loss="dpo", dpo_pairs="monolingual")]
    keys = {ref.reference_key(**c) for c in changed}
    assert len(keys) == len(changed) and key not in keys
    # clo and dpo encode the same 4 sequences per pair, so they share the cache
    assert ref.reference_key(**dict(base, loss="dpo")) == key
    assert ref.reference_key(**dict(base, sft_data="english")) == key  # sft only
    assert ref.reference_key(**dict(base, dpo_pairs="monolingual")) == key  # dpo only
