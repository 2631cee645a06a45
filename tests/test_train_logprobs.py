"""The response-only LM head gives the same summed log-probs and gradients as the full logits;
the micro-batched scorer (reference log-probs, held-out metrics) gives them in example order."""

import pytest
import torch

from clo_ray.models.resolve import resolve_model
from clo_ray.spec.training import StageSpec
from clo_ray.train.batches import collate, encode_examples
from clo_ray.train.logprobs import ResponseLogps, batched_response_logps, response_logps
from clo_ray.train.losses import sequence_logps
from clo_ray.train.schedule import prepare_stage_model, trainable_parameters


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_model("builtin:tiny-llama"))


@pytest.fixture(scope="module")
def batch(tokenizer, translations):
    examples = encode_examples(translations("sw", limit=3), tokenizer, loss="clo",
                               template="{prompt}\n", max_length=64)
    return collate(examples, tokenizer.pad_token_id)  # 12 sequences, padded


@pytest.fixture(scope="module")
def translations():
    from conftest import sample_translations

    return sample_translations


def _model(lora: bool):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(resolve_model("builtin:tiny-llama"),
                                                 dtype=torch.float32)
    stage = {"loss": "clo", "modules": ["attention"], "steps": 1}
    if lora:
        stage["lora"] = {"r": 2, "dropout": 0.0}
    model = prepare_stage_model(model, StageSpec.model_validate(stage))
    if lora:  # B starts at zero; make the adapters matter
        for name, param in trainable_parameters(model):
            if "lora_B" in name:
                torch.nn.init.normal_(param, std=0.02)
    return model


@pytest.mark.parametrize("lora", [False, True])
def test_same_logps_and_gradients_as_full_logits(batch, lora):
    model = _model(lora)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    full, full_n = sequence_logps(logits, batch["input_ids"], batch["response_mask"])
    full.sum().backward()
    expected = {n: p.grad.clone() for n, p in trainable_parameters(model)}
    model.zero_grad()

    fast, fast_n = ResponseLogps(model)(batch["input_ids"], batch["attention_mask"],
                                        batch["response_mask"])
    fast.sum().backward()
    torch.testing.assert_close(fast, full, rtol=1e-5, atol=1e-4)
    assert torch.equal(fast_n, full_n)
    for name, param in trainable_parameters(model):
        torch.testing.assert_close(param.grad, expected[name], rtol=1e-3, atol=1e-5)


def test_no_response_tokens_gives_zero(batch):
    mask = torch.zeros_like(batch["response_mask"])
    logps, n = response_logps(_model(False), batch["input_ids"], batch["attention_mask"], mask)
    assert torch.equal(logps, torch.zeros_like(logps)) and n.sum() == 0


def test_batched_scoring_matches_one_batch_in_example_order(tokenizer, translations):
    """Micro-batches of 2 over length-sorted examples come back as one padded batch would
    give them: [N, S] in the caller's example order, with the response token counts."""
    examples = encode_examples(translations("sw", limit=3), tokenizer, loss="clo",
                               template="{prompt}\n", max_length=512)
    longest_first = sorted(examples, key=lambda e: -max(map(len, e.input_ids)))
    assert len({max(map(len, e.input_ids)) for e in examples}) == 3  # so sorting reorders
    pad_id = tokenizer.pad_token_id
    model = _model(False)
    model.train()
    logps, counts = batched_response_logps(model, longest_first, micro_batch=2, pad_id=pad_id)
    assert model.training  # mode restored
    assert logps.shape == counts.shape == (3, 4) and logps.dtype == torch.float64
    model.eval()
    batch = collate(longest_first, pad_id)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    full, full_n = sequence_logps(logits, batch["input_ids"], batch["response_mask"])
    torch.testing.assert_close(logps, full.view(4, 3).T.double(), rtol=1e-5, atol=1e-4)
    assert torch.equal(counts, full_n.view(4, 3).T.double())
    empty_logps, empty_counts = batched_response_logps(model, [], micro_batch=2, pad_id=pad_id)
    assert empty_logps.shape == empty_counts.shape == (0, 0)
