"""CLO, DPO, SFT and CRPO losses: pure torch, no Ray, no model code.

Everything works on *summed response log-probs* per sequence (see ``sequence_logps``): the
model runs once per step on a padded batch and the losses only rearrange these numbers.

Defaults for the points the CLO paper (Lee et al., ACL 2025) leaves open:
- ``beta = 0.1`` (the common DPO default; the authors' follow-up used it too);
- the two cross-lingual directions are **summed** (``directions="sum"``), as the paper's
  formula writes L_CL; ``"mean"`` halves it;
- the NLL term is **token-averaged** over all target-language response tokens of the batch
  (``nll_reduction="token"``, the usual causal-LM loss); ``"sequence"`` averages each
  sequence's mean token NLL, ``"sum"`` uses the summed sequence NLL (the paper's
  -log pi(y_l|x_l) taken literally; its scale dwarfs L_CL unless lambda is tiny).

``preference_accuracy`` (:func:`preference_accuracy`) means one thing in training and in
evaluation (:mod:`clo_ray.eval.heldout`): the share of CLO pairs whose implicit reward prefers
the prompt's language in both directions. Each direction's own share is ``*_reward_accuracy``.

CRPO (Lee et al., arXiv 2608.23149) ranks four answers to the *target* prompt with LambdaLoss
(:func:`crpo_loss`); its choices where the summary in docs leaves them open are stated there.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

Directions = Literal["sum", "mean"]
NllReduction = Literal["token", "sequence", "sum"]
DpoVariant = Literal["sigmoid", "ipo"]
LambdaWeighting = Literal["lambdarank", "ndcg2", "ndcg2pp"]

# Row order of the [4, P] tensors of a CLO batch: for pair p,
#   x_en: y_en (chosen) > y_l (rejected)   and   x_l: y_l (chosen) > y_en (rejected).
EN_CHOSEN, EN_REJECTED, TGT_CHOSEN, TGT_REJECTED = range(4)

# Row order of the [4, P] tensors of a CRPO batch: all four rows answer the TARGET prompt x_t,
# listed in CRPO's relevance hierarchy psi(y_w^t) > psi(y_w^e) > psi(y_l^t) > psi(y_l^e).
CRPO_TGT_CHOSEN, CRPO_EN_CHOSEN, CRPO_TGT_REJECTED, CRPO_EN_REJECTED = range(4)
# psi per row. CRPO's Appendix A gives its own gain values; they were not available to us, so
# the default is the plainest one that keeps the hierarchy (graded relevance 3 > 2 > 1 > 0,
# gains 2^psi - 1 = 7, 3, 1, 0). The spec's ``relevance`` overrides it.
CRPO_RELEVANCE: tuple[float, ...] = (3.0, 2.0, 1.0, 0.0)
CRPO_NLL_ROW = CRPO_TGT_CHOSEN  # the NLL term: the target-language chosen answer


@dataclass
class LossOutput:
    loss: torch.Tensor  # scalar, differentiable
    metrics: dict[str, float]  # detached floats for logging


def sequence_logps(logits: torch.Tensor, input_ids: torch.Tensor,
                   response_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-prob of the response tokens of each sequence, and their count.

    logits [B, T, V] (position t predicts token t+1), input_ids [B, T], response_mask [B, T]
    (1 on response tokens of input_ids, 0 on prompt and padding). Returns ([B], [B]).
    """
    targets = input_ids[:, 1:]
    # bf16 log-softmax over a 32k-128k vocab loses the small differences DPO lives on.
    dtype = torch.promote_types(logits.dtype, torch.float32)
    mask = response_mask[:, 1:].to(dtype)
    token_logps = torch.gather(F.log_softmax(logits[:, :-1].to(dtype), dim=-1), 2,
                               targets.unsqueeze(-1)).squeeze(-1)
    return (token_logps * mask).sum(-1), mask.sum(-1)


def sft_loss(logps: torch.Tensor, n_tokens: torch.Tensor,
             reduction: NllReduction = "token") -> torch.Tensor:
    """NLL of responses from summed log-probs ``logps`` [N] over ``n_tokens`` [N] tokens."""
    if reduction == "token":
        return -logps.sum() / n_tokens.sum().clamp(min=1)
    if reduction == "sequence":
        return (-logps / n_tokens.clamp(min=1)).mean()
    if reduction == "sum":
        return -logps.mean()
    raise ValueError(f"unknown nll reduction {reduction!r}; use token, sequence or sum")


def preference_logits(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
                      ref_chosen: torch.Tensor, ref_rejected: torch.Tensor) -> torch.Tensor:
    """(log-ratio chosen) - (log-ratio rejected) per pair, [P]: DPO's logit before beta."""
    return (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
             ref_chosen: torch.Tensor, ref_rejected: torch.Tensor, *, beta: float = 0.1,
             variant: DpoVariant = "sigmoid") -> LossOutput:
    """DPO over P pairs of summed log-probs, each [P].

    sigmoid: -log sigmoid(beta * logits) (Rafailov et al. 2023), ln 2 when policy == reference.
    ipo: (logits - 1 / (2 beta))^2 (Azar et al. 2023).
    """
    logits = preference_logits(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    if variant == "sigmoid":
        per_pair = -F.logsigmoid(beta * logits)
    elif variant == "ipo":
        per_pair = (logits - 1.0 / (2.0 * beta)) ** 2
    else:
        raise ValueError(f"unknown dpo variant {variant!r}; use sigmoid or ipo")
    metrics = _preference_metrics(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta)
    return LossOutput(per_pair.mean(), metrics)


def reward_margins(policy: torch.Tensor, reference: torch.Tensor,
                   beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pair implicit reward margins (chosen - rejected) of the two CLO directions.

    policy, reference: [4, P] in the row order EN_CHOSEN, EN_REJECTED, TGT_CHOSEN,
    TGT_REJECTED. Returns (English direction [P], target direction [P]); a margin > 0 means the
    implicit reward ``beta * (log pi - log pi_ref)`` prefers the answer in the prompt's language.
    """
    en = beta * preference_logits(policy[EN_CHOSEN], policy[EN_REJECTED],
                                  reference[EN_CHOSEN], reference[EN_REJECTED])
    target = beta * preference_logits(policy[TGT_CHOSEN], policy[TGT_REJECTED],
                                      reference[TGT_CHOSEN], reference[TGT_REJECTED])
    return en, target


def preference_accuracy(en_margins: torch.Tensor, target_margins: torch.Tensor) -> float:
    """Share of CLO pairs whose implicit reward prefers the right language in BOTH directions.

    The one meaning of ``preference_accuracy`` in training and evaluation: a pair counts only
    when English prompts prefer y_en (``en_margins`` > 0) *and* target prompts prefer y_l
    (``target_margins`` > 0), each [P] from :func:`reward_margins`. A model that merely
    favours one language everywhere gets 0 here, where the mean of the per-direction
    accuracies (``en_reward_accuracy``, ``target_reward_accuracy``) would give it 0.5.
    Strict ``> 0``: a policy equal to its reference scores 0.
    """
    with torch.no_grad():
        return ((en_margins > 0) & (target_margins > 0)).double().mean().item()


def cl_loss(policy: torch.Tensor, reference: torch.Tensor, *, beta: float = 0.1,
            directions: Directions = "sum", variant: DpoVariant = "sigmoid") -> LossOutput:
    """L_CL: the DPO loss of both cross-lingual directions of P pairs, summed or averaged.

    policy, reference: [4, P] summed response log-probs in the row order EN_CHOSEN,
    EN_REJECTED, TGT_CHOSEN, TGT_REJECTED; English prompts prefer the English answer, target
    prompts the target one. Metrics: each direction's :func:`dpo_loss` metrics (``en_*``,
    ``target_*``), :func:`preference_accuracy` and ``reward_margin`` (both directions' mean).
    """
    if directions not in ("sum", "mean"):
        raise ValueError(f"unknown directions {directions!r}; use sum or mean")
    en = dpo_loss(policy[EN_CHOSEN], policy[EN_REJECTED], reference[EN_CHOSEN],
                  reference[EN_REJECTED], beta=beta, variant=variant)
    tgt = dpo_loss(policy[TGT_CHOSEN], policy[TGT_REJECTED], reference[TGT_CHOSEN],
                   reference[TGT_REJECTED], beta=beta, variant=variant)
    loss = en.loss + tgt.loss if directions == "sum" else (en.loss + tgt.loss) / 2
    metrics = {f"en_{k}": v for k, v in en.metrics.items()}
    metrics.update({f"target_{k}": v for k, v in tgt.metrics.items()})
    with torch.no_grad():
        en_margins, target_margins = reward_margins(policy, reference, beta)
        metrics["preference_accuracy"] = preference_accuracy(en_margins, target_margins)
        metrics["reward_margin"] = ((en_margins + target_margins) / 2).mean().item()
    return LossOutput(loss, metrics)


def clo_loss(policy: torch.Tensor, reference: torch.Tensor, n_tokens: torch.Tensor, *,
             lambda_: float = 0.5, beta: float = 0.1, directions: Directions = "sum",
             nll_reduction: NllReduction = "token") -> LossOutput:
    """L_CLO = lambda * NLL(y_l | x_l) + (1 - lambda) * L_CL over P parallel pairs.

    policy, reference, n_tokens: [4, P] summed response log-probs (and token counts) in the
    row order EN_CHOSEN, EN_REJECTED, TGT_CHOSEN, TGT_REJECTED. L_CL is :func:`cl_loss` with
    the sigmoid DPO loss; its metrics come along, plus ``loss``, ``nll_target``, ``loss_cl``.
    """
    cl = cl_loss(policy, reference, beta=beta, directions=directions)
    nll = sft_loss(policy[TGT_CHOSEN], n_tokens[TGT_CHOSEN], nll_reduction)
    loss = lambda_ * nll + (1.0 - lambda_) * cl.loss
    metrics = {"loss": loss.item(), "nll_target": nll.item(), "loss_cl": cl.loss.item()}
    metrics.update(cl.metrics)
    return LossOutput(loss, metrics)


def score_ranks(scores: torch.Tensor) -> torch.Tensor:
    """Rank of each candidate among its prompt's candidates by score, 1 = highest: [N, P] long.

    Taken from the *current* scores at every step, without gradient. A rank is piecewise
    constant in the scores (zero gradient almost everywhere, none at a tie), and LambdaLoss
    (Wang et al. 2018) and LambdaRank both weight each pair by the ranking the model gives
    now, treating those weights as constants of the step; differentiating through a smoothed
    rank would be another loss. Ties (every score is 0 while policy == reference, i.e. at the
    first step) go to the row listed first, which is the more relevant one.
    """
    with torch.no_grad():
        order = torch.sort(scores, dim=0, descending=True, stable=True).indices
        positions = torch.arange(1, scores.shape[0] + 1, device=scores.device)
        return torch.empty_like(order).scatter_(0, order, positions[:, None].expand_as(order))


def lambda_weights(ranks: torch.Tensor, relevance: torch.Tensor,
                   weighting: LambdaWeighting = "ndcg2", mu: float = 10.0) -> torch.Tensor:
    """Delta_ij of LambdaLoss for every ordered pair of candidates: [N, N, P].

    ranks [N, P] (1 = best, :func:`score_ranks`), relevance psi [N]. Gains G = 2^psi - 1,
    discount D(r) = ln(1 + r) (the natural log: another base only rescales every weight).
    lambdarank: |G_i - G_j| |1/D(r_i) - 1/D(r_j)|; ndcg2 (CRPO's main scheme):
    |G_i - G_j| |1/D(|r_i - r_j|) - 1/D(|r_i - r_j| + 1)|; ndcg2pp: mu * ndcg2 + lambdarank.
    The diagonal (i == j) is 0.
    """
    r = ranks.to(relevance.dtype)
    gains = torch.exp2(relevance) - 1
    gain_gap = (gains[:, None] - gains[None, :]).abs()[:, :, None]  # [N, N, 1]
    inverse = 1 / torch.log1p(r)  # [N, P]
    lambdarank = gain_gap * (inverse[:, None] - inverse[None, :]).abs()
    gap = (r[:, None] - r[None, :]).abs().clamp(min=1)  # ranks differ off the diagonal
    ndcg2 = gain_gap * (1 / torch.log1p(gap) - 1 / torch.log1p(gap + 1))
    ndcg2 = ndcg2 * (1 - torch.eye(len(relevance), dtype=r.dtype, device=r.device))[:, :, None]
    if weighting == "lambdarank":
        return lambdarank
    if weighting == "ndcg2":
        return ndcg2
    if weighting == "ndcg2pp":
        return mu * ndcg2 + lambdarank
    raise ValueError(f"unknown lambda weighting {weighting!r}; use lambdarank, ndcg2 or ndcg2pp")


def lambda_loss(scores: torch.Tensor, relevance: torch.Tensor,
                weighting: LambdaWeighting = "ndcg2", mu: float = 10.0) -> torch.Tensor:
    """LambdaLoss of P candidate lists, scores [N, P], relevance psi [N]: a scalar.

    Per prompt: sum over pairs with psi_i > psi_j of Delta_ij * ln(1 + exp(-(s_i - s_j))),
    Delta from the current ranks (no gradient, :func:`score_ranks`); averaged over prompts.
    """
    weights = lambda_weights(score_ranks(scores), relevance, weighting, mu)
    above = (relevance[:, None] > relevance[None, :]).to(scores.dtype)[:, :, None]
    per_pair = weights * F.softplus(-(scores[:, None] - scores[None, :])) * above
    return per_pair.sum(dim=(0, 1)).mean()


def crpo_loss(policy: torch.Tensor, reference: torch.Tensor, n_tokens: torch.Tensor, *,
              alpha: float = 0.2, beta: float = 0.1, weighting: LambdaWeighting = "ndcg2",
              mu: float = 10.0, relevance: Sequence[float] | None = None,
              nll_reduction: NllReduction = "token") -> LossOutput:
    """L_CRPO = (1 - alpha) * NLL(y_w^t | x_t) + alpha * L_lambda over P target prompts.

    policy, reference, n_tokens: [4, P] summed response log-probs (and token counts) of the
    four answers to x_t in the order CRPO_TGT_CHOSEN, CRPO_EN_CHOSEN, CRPO_TGT_REJECTED,
    CRPO_EN_REJECTED. Scores are DPO implicit rewards s = beta * (log pi - log pi_ref);
    L_lambda is :func:`lambda_loss` with ``relevance`` (default :data:`CRPO_RELEVANCE`).
    Metrics: ``loss``, ``nll_target``, ``loss_lambda``, ``ranking_accuracy`` (share of the
    hierarchy's ordered pairs the scores get right), ``ranking_exact`` (share of prompts
    ranked exactly as the hierarchy), ``reward_margin`` (s(y_w^t) - s(y_l^t)) and
    ``language_margin`` (s(y_w^t) - s(y_w^e)).
    """
    psi = torch.tensor(CRPO_RELEVANCE if relevance is None else tuple(relevance),
                       dtype=torch.promote_types(policy.dtype, torch.float32),
                       device=policy.device)
    if psi.shape != (policy.shape[0],):
        raise ValueError(f"relevance needs one value per candidate ({policy.shape[0]}), "
                         f"got {psi.tolist()}")
    scores = beta * (policy.to(psi.dtype) - reference.to(psi.dtype))
    ranking = lambda_loss(scores, psi, weighting, mu)
    nll = sft_loss(policy[CRPO_NLL_ROW], n_tokens[CRPO_NLL_ROW], nll_reduction)
    loss = (1.0 - alpha) * nll + alpha * ranking
    with torch.no_grad():
        above = psi[:, None] > psi[None, :]
        right = (scores[:, None] > scores[None, :])[above]  # [pairs, P]
        metrics = {
            "loss": loss.item(), "nll_target": nll.item(), "loss_lambda": ranking.item(),
            "ranking_accuracy": right.double().mean().item(),
            "ranking_exact": right.all(dim=0).double().mean().item(),
            "reward_margin": (scores[CRPO_TGT_CHOSEN] - scores[CRPO_TGT_REJECTED]).mean().item(),
            "language_margin": (scores[CRPO_TGT_CHOSEN] - scores[CRPO_EN_CHOSEN]).mean().item(),
        }
    return LossOutput(loss, metrics)


def _preference_metrics(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
                        ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
                        beta: float) -> dict[str, float]:
    """One direction's implicit rewards, their margin and accuracy (the share of pairs with a
    margin > 0), and raw log-probs (TRL's naming)."""
    with torch.no_grad():
        chosen = beta * (policy_chosen - ref_chosen)
        rejected = beta * (policy_rejected - ref_rejected)
        # the margin as reward_margins computes it, so per-direction and both-direction
        # accuracies agree on every pair's sign
        margin = beta * preference_logits(policy_chosen, policy_rejected, ref_chosen,
                                          ref_rejected)
        return {
            "rewards_chosen": chosen.mean().item(),
            "rewards_rejected": rejected.mean().item(),
            "reward_margin": margin.mean().item(),
            "reward_accuracy": (margin > 0).double().mean().item(),
            "logps_chosen": policy_chosen.mean().item(),
            "logps_rejected": policy_rejected.mean().item(),
        }
