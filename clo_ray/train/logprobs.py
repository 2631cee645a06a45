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
"""

from __future__ import annotations

import torch

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


def causal_lm(model: torch.nn.Module) -> torch.nn.Module:
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
