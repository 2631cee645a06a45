"""Held-out metrics from log-probs alone: NLL and CLO preference accuracy on unseen pairs.

No generation, so they are cheap, deterministic and exactly comparable across trials. Each
held-out pair is encoded as training encodes a CLO pair
(:func:`clo_ray.train.batches.encode_examples`, loss "clo": the 4 sequences EN_CHOSEN,
EN_REJECTED, TGT_CHOSEN, TGT_REJECTED) and scored in one forward pass per micro-batch, by the
same helper as the reference log-probs (:func:`clo_ray.train.logprobs.batched_response_logps`).

- ``target_nll`` / ``english_nll``: token-averaged NLL of y_l | x_l and y_en | x_en (the
  training loss's default reduction; per token, so pairs of any length weigh by length).
- Implicit reward of a sequence: ``beta * (log pi(y|x) - log pi_ref(y|x))``. Per direction
  (English prompts prefer y_en over y_l; target prompts y_l over y_en), the margin is
  chosen - rejected. ``preference_accuracy`` is the share of pairs where BOTH directions'
  margins are > 0 (the model prefers the prompt's language whichever language it is asked
  in), the same definition and function training reports
  (:func:`clo_ray.train.losses.preference_accuracy`); ``en_reward_accuracy`` /
  ``target_reward_accuracy`` per direction. ``reward_margin`` is the mean margin over both
  directions.

``reference_logps`` are the base model's summed log-probs [N, 4] of the same encoding (from
:func:`clo_ray.train.reference.compute_reference_logps`, or :func:`heldout_logps` of the base
model), computed once per cell by the caller. Without them the model is its own reference:
that is the base-model evaluation, where every reward is exactly 0 and the strict ``> 0``
makes the accuracy 0 (no preference has been learnt yet), the margin 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import torch

from clo_ray.errors import CloRayError
from clo_ray.train.batches import encode_examples
from clo_ray.train.logprobs import batched_response_logps
from clo_ray.train.losses import EN_CHOSEN, TGT_CHOSEN, preference_accuracy, reward_margins


class HeldoutError(CloRayError, ValueError):
    """Reference log-probs that do not line up with the held-out rows."""


@dataclass(frozen=True)
class HeldoutScoring:
    """How held-out pairs are encoded and scored: one value for every model of a trial, so a
    trained model's log-probs line up with its base model's (the reference) and its reward
    margin is on the trial's scale.

    ``template`` / ``max_length``: the prompt encoding training used. ``beta``: the implicit
    reward's scale (the trial's effective beta). ``micro_batch``: pairs per forward pass.
    """

    template: str
    max_length: int
    beta: float
    micro_batch: int = 4


def heldout_logps(model: Any, tokenizer: Any, eval_rows: pa.Table, *, template: str,
                  max_length: int, micro_batch: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed response log-probs and response token counts, each [N, 4] float64 on CPU, in
    row order (the sequence order of the module docstring)."""
    if micro_batch <= 0:
        raise HeldoutError(f"micro_batch must be positive, got {micro_batch}")
    examples = encode_examples(eval_rows, tokenizer, loss="clo", template=template,
                               max_length=max_length)
    return batched_response_logps(model, examples, micro_batch=micro_batch,
                                  pad_id=tokenizer.pad_token_id)


def heldout_metrics(model: Any, tokenizer: Any, eval_rows: pa.Table, scoring: HeldoutScoring, *,
                    reference_logps: torch.Tensor | list[list[float]] | None = None
                    ) -> dict[str, Any]:
    """Held-out NLLs, preference accuracy and reward margin (module docstring); also
    ``logps``: the policy's [N, 4] log-probs as nested lists, which serve as the reference of
    later trials when ``model`` is the base model.

    Raises HeldoutError when ``reference_logps`` is not [N, 4] for the N rows given.
    """
    if eval_rows.num_rows == 0:
        raise HeldoutError("no held-out rows to evaluate on")
    policy, counts = heldout_logps(model, tokenizer, eval_rows, template=scoring.template,
                                   max_length=scoring.max_length,
                                   micro_batch=scoring.micro_batch)
    if reference_logps is None:
        reference = policy.clone()
    else:
        reference = torch.as_tensor(reference_logps, dtype=torch.float64).cpu()
        if tuple(reference.shape) != tuple(policy.shape):
            raise HeldoutError(f"reference_logps has shape {tuple(reference.shape)} but the "
                               f"{policy.shape[0]} held-out rows need {tuple(policy.shape)}: "
                               f"compute it on the same rows, in the same order, with loss "
                               f"'clo' (4 sequences per pair)")
    en, tgt = reward_margins(policy.T, reference.T, scoring.beta)
    return {
        "target_nll": _nll(policy[:, TGT_CHOSEN], counts[:, TGT_CHOSEN]),
        "english_nll": _nll(policy[:, EN_CHOSEN], counts[:, EN_CHOSEN]),
        "preference_accuracy": preference_accuracy(en, tgt),
        "en_reward_accuracy": (en > 0).double().mean().item(),
        "target_reward_accuracy": (tgt > 0).double().mean().item(),
        "reward_margin": ((en + tgt) / 2).mean().item(),
        "en_reward_margin": en.mean().item(),
        "target_reward_margin": tgt.mean().item(),
        "logps": policy.tolist(),
    }


def _nll(logps: torch.Tensor, counts: torch.Tensor) -> float:
    """Token-averaged NLL over all pairs (every sequence has >= 1 response token)."""
    return (-logps.sum() / counts.sum().clamp(min=1)).item()
