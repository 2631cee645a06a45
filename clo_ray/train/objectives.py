"""Stage losses as the loop calls them: ``OBJECTIVES[stage.loss](stage, policy, reference, n)``.

Each objective takes the summed response log-probs of one micro-batch shaped ``[S, P]`` (S
sequences per pair in :mod:`clo_ray.train.batches` order, P pairs), calls the pure function
of :mod:`clo_ray.train.losses` with the stage's settings, and names its metrics the way Ray
Tune and the spec see them (``clo_ray.spec.schema.TRAINING_METRICS``): ``train_loss``,
``target_nll``, ``english_nll``, ``preference_accuracy`` (the share of pairs right in both
directions, as evaluation defines it: :func:`~clo_ray.train.losses.preference_accuracy`),
``reward_margin``, plus the per-direction ones (``en_reward_margin``,
``target_reward_accuracy``, ...).

The loop picks the objective by the stage's loss name through the dict; no function here
branches on a method name.

- clo: :func:`~clo_ray.train.losses.clo_loss`; rows EN_CHOSEN, EN_REJECTED, TGT_CHOSEN,
  TGT_REJECTED.
- dpo: the SFT+DPO baseline's DPO stage on the *same* cross-lingual pairs, both directions
  (the paper's baseline), combined by ``pair_reduction`` (sum, like CLO): CLO with lambda 0
  (:func:`~clo_ray.train.losses.cl_loss`, sigmoid or IPO).
- sft: NLL of every sequence of the micro-batch (target, English or both responses, as
  ``sft_data`` encoded them).
- crpo: :func:`~clo_ray.train.losses.crpo_loss`; rows CRPO_TGT_CHOSEN, CRPO_EN_CHOSEN,
  CRPO_TGT_REJECTED, CRPO_EN_REJECTED, all answering the target prompt. Its ``english_nll``
  is that of y_w^e *given the target prompt* (the only English answer it scores).

The batch layout each loss reads is data too (:data:`clo_ray.train.batches.LAYOUTS`); a dpo
stage's ``dpo_pairs`` picks the CLO paper's cross-lingual pairs or CRPO's monolingual ones,
and the same DPO objective trains both.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

import torch

from clo_ray.spec.training import StageSpec
from clo_ray.train.losses import (
    CRPO_EN_CHOSEN,
    EN_CHOSEN,
    TGT_CHOSEN,
    LossOutput,
    cl_loss,
    clo_loss,
    crpo_loss,
    sft_loss,
)

# The metric of each sequence row of an SFT example (clo_ray.train.batches' order).
SFT_ROWS = {"target": ("target_nll",), "english": ("english_nll",),
            "both": ("target_nll", "english_nll")}
T = TypeVar("T")
Objective = Callable[[StageSpec, torch.Tensor, "torch.Tensor | None", torch.Tensor], LossOutput]


def _token_nll(logps: torch.Tensor, n_tokens: torch.Tensor) -> float:
    """Per-token NLL over a set of sequences (a metric, detached)."""
    return float(-logps.detach().sum() / n_tokens.sum().clamp(min=1))


def clo_objective(stage: StageSpec, policy: torch.Tensor, reference: torch.Tensor | None,
                  n_tokens: torch.Tensor) -> LossOutput:
    """L_CLO with the stage's lambda, beta, direction and NLL reductions."""
    assert reference is not None, "clo needs reference log-probs"
    out = clo_loss(policy, reference, n_tokens, lambda_=_filled(stage.lambda_),
                   beta=_filled(stage.beta), directions=_filled(stage.pair_reduction),
                   nll_reduction=_filled(stage.nll_reduction))
    return _named(out, policy[EN_CHOSEN], n_tokens[EN_CHOSEN])


def dpo_objective(stage: StageSpec, policy: torch.Tensor, reference: torch.Tensor | None,
                  n_tokens: torch.Tensor) -> LossOutput:
    """DPO (sigmoid or IPO) on both cross-lingual directions of each pair."""
    assert reference is not None, "dpo needs reference log-probs"
    out = cl_loss(policy, reference, beta=_filled(stage.beta),
                  directions=_filled(stage.pair_reduction), variant=_filled(stage.dpo_variant))
    metrics = dict(out.metrics)
    metrics.update(train_loss=float(out.loss.detach()),
                   target_nll=_token_nll(policy[TGT_CHOSEN], n_tokens[TGT_CHOSEN]),
                   english_nll=_token_nll(policy[EN_CHOSEN], n_tokens[EN_CHOSEN]))
    return LossOutput(out.loss, metrics)


def sft_objective(stage: StageSpec, policy: torch.Tensor, reference: torch.Tensor | None,
                  n_tokens: torch.Tensor) -> LossOutput:
    """NLL over every response of the micro-batch, reduced as the stage says."""
    loss = sft_loss(policy.reshape(-1), n_tokens.reshape(-1), _filled(stage.nll_reduction))
    metrics = {"train_loss": float(loss.detach())}
    for row, name in enumerate(SFT_ROWS[stage.sft_data or "target"]):
        metrics[name] = _token_nll(policy[row], n_tokens[row])
    return LossOutput(loss, metrics)


def crpo_objective(stage: StageSpec, policy: torch.Tensor, reference: torch.Tensor | None,
                   n_tokens: torch.Tensor) -> LossOutput:
    """L_CRPO with the stage's alpha, beta, weighting, mu, relevance and NLL reduction."""
    assert reference is not None, "crpo needs reference log-probs"
    out = crpo_loss(policy, reference, n_tokens, alpha=_filled(stage.alpha),
                    beta=_filled(stage.beta), weighting=_filled(stage.lambda_weighting),
                    mu=_filled(stage.lambda_mu), relevance=_filled(stage.relevance),
                    nll_reduction=_filled(stage.nll_reduction))
    return _named(out, policy[CRPO_EN_CHOSEN], n_tokens[CRPO_EN_CHOSEN])


OBJECTIVES: dict[str, Objective] = {
    "clo": clo_objective,
    "dpo": dpo_objective,
    "sft": sft_objective,
    "crpo": crpo_objective,
}


def language_metrics(objective: Objective, stage: StageSpec, policy: torch.Tensor,
                     reference: torch.Tensor | None, n_tokens: torch.Tensor,
                     languages: Sequence[str]) -> dict[str, tuple[dict[str, float], int]]:
    """Metrics of each language's pairs within a micro-batch: ``{lang: (metrics, n_pairs)}``.

    Multi-target trials report every metric per language as well (``sw/target_nll``), so a
    sweep sees whether one language trains at the expense of another.
    """
    out: dict[str, tuple[dict[str, float], int]] = {}
    with torch.no_grad():
        for language in dict.fromkeys(languages):
            cols = torch.tensor([lang == language for lang in languages], device=policy.device)
            ref = reference[:, cols] if reference is not None else None
            result = objective(stage, policy[:, cols].detach(), ref, n_tokens[:, cols])
            out[language] = (result.metrics, int(cols.sum()))
    return out


def _named(out: LossOutput, english: torch.Tensor, english_tokens: torch.Tensor) -> LossOutput:
    """A loss with an NLL term, its metrics under the names Tune sees (``loss`` ->
    ``train_loss``, ``nll_target`` -> ``target_nll``) plus ``english_nll`` of the row the
    loss scores English answers in."""
    metrics = {k: v for k, v in out.metrics.items() if k not in ("loss", "nll_target")}
    metrics.update(train_loss=out.metrics["loss"], target_nll=out.metrics["nll_target"],
                   english_nll=_token_nll(english, english_tokens))
    return LossOutput(out.loss, metrics)


def _filled(value: T | None) -> T:
    """A loss setting of the stage: StageSpec fills every one that applies to its loss with
    the default (spec.training.LOSS_FIELDS), so None here is a bug, not a user error."""
    assert value is not None, "StageSpec left a setting of its own loss unset"
    return value
