"""Summed response log-probs in one forward, without the ``[B, T, V]`` logits.

The losses need, per sequence, the summed log-prob of its response tokens only. A plain
``model(...).logits`` projects *every* position (prompt and padding too) through the LM head
and then log-softmaxes all of it: with a 49k-128k vocabulary that projection and its
``[B, T, V]`` float32 copies dominate a small model's step. Here the decoder runs once over the
padded batch, and only the positions that predict a response token go through the head
(``x_i - logsumexp(x)`` on those rows, in float32). The numbers equal
:func:`clo_ray.train.losses.sequence_logps` on the full logits (tested), gradients too.

:class:`ResponseLogps` is the module DeepSpeed wraps, so ``engine(...)`` runs this forward
with every ZeRO-3 hook of the model's submodules in place. Architectures that transform the
logits after the head (soft-capping, scaling) take the plain full-logits path.

:func:`batched_response_logps` scores a whole list of encoded examples with a frozen model in
micro-batches: the one place the reference log-probs (:mod:`clo_ray.train.reference`) and the
held-out metrics (:mod:`clo_ray.eval.heldout`) get their numbers, so both see exactly what the
training forward computes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from clo_ray.train.batches import Example, collate
from clo_ray.train.losses import sequence_logps

# Decoders whose logits are exactly lm_head(final hidden state).
HEAD_ONLY_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3"})


class ResponseLogps(torch.nn.Module):
    """``forward(input_ids, attention_mask, response_mask) -> (logps [B], n_tokens [B])``.

    Holds the (possibly peft-wrapped) causal LM as ``self.model``; parameters are the model's.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                response_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return response_logps(self.model, input_ids, attention_mask, response_mask)


def causal_lm(model: Any) -> Any:
    """The transformers causal LM inside a peft wrapper (the model itself otherwise)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def response_logps(model: torch.nn.Module, input_ids: torch.Tensor,
                   attention_mask: torch.Tensor, response_mask: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs of the response tokens of each sequence [B] and their count [B].

    Inputs are ``collate``'s [B, T] tensors; position t predicts token t + 1.
    """
    causal = causal_lm(model)
    if getattr(causal.config, "model_type", None) not in HEAD_ONLY_TYPES:
        logits = model(input_ids=input_ids, attention_mask=attention_mask,
                       use_cache=False).logits
        return sequence_logps(logits, input_ids, response_mask)
    backbone = getattr(causal, causal.base_model_prefix)
    hidden = backbone(input_ids=input_ids, attention_mask=attention_mask,
                      use_cache=False).last_hidden_state
    predicts = response_mask[:, 1:].bool()
    rows, cols = predicts.nonzero(as_tuple=True)
    logits = causal.get_output_embeddings()(hidden[:, :-1][rows, cols])  # [N, V]
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    targets = input_ids[:, 1:][rows, cols]
    token_logps = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)
    sums = torch.zeros(input_ids.shape[0], dtype=token_logps.dtype, device=token_logps.device)
    return sums.index_add(0, rows, token_logps), predicts.sum(-1).to(token_logps.dtype)


@torch.no_grad()
def batched_response_logps(model: torch.nn.Module, examples: Sequence[Example], *,
                           micro_batch: int, pad_id: int | None
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed response log-probs and response token counts of ``examples``, each ``[N, S]``
    float64 on CPU in example order (S sequences per example, ``collate``'s sequence order).

    ``micro_batch`` examples per forward (> 0; callers check it and raise their own error),
    formed from examples sorted by length: less padding, and right padding does not change
    the numbers. Dropout is off while scoring; the model's train/eval mode is restored.
    """
    if not examples:
        empty = torch.zeros((0, 0), dtype=torch.float64)
        return empty, empty.clone()
    count = len(examples[0].input_ids)
    device = next(model.parameters()).device
    order = sorted(range(len(examples)), key=lambda i: max(map(len, examples[i].input_ids)))
    logps = torch.zeros((len(examples), count), dtype=torch.float64)
    n_tokens = torch.zeros((len(examples), count), dtype=torch.float64)
    was_training = model.training
    model.eval()
    try:
        for begin in range(0, len(order), micro_batch):
            chunk = order[begin:begin + micro_batch]
            batch = {k: v.to(device) for k, v in
                     collate([examples[i] for i in chunk], pad_id).items()}
            summed, counts = response_logps(model, batch["input_ids"], batch["attention_mask"],
                                            batch["response_mask"])
            logps[chunk] = summed.view(count, len(chunk)).T.double().cpu()
            n_tokens[chunk] = counts.view(count, len(chunk)).T.double().cpu()
    finally:
        model.train(was_training)
    return logps, n_tokens
