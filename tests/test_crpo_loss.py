"""CRPO loss against an independent float64 computation in plain Python (math, no torch).

The reference below re-derives everything from the formulas in docs/crpo-method.md: ranks by
sorting, the three weightings, the LambdaLoss value and its gradient by hand
(d/ds_i of Delta * ln(1 + e^-(s_i - s_j)) = -Delta * sigmoid(-(s_i - s_j)), weights constant),
and the NLL term's gradient. ``crpo_loss`` must match it to 1e-6 in loss, ranks, weights and
gradients; each mutation of the loss (hierarchy order, NLL row, weights that carry gradient)
must fail the same check.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from clo_ray.train import losses
from clo_ray.train.losses import crpo_loss, lambda_weights, score_ranks

PSI = (3.0, 2.0, 1.0, 0.0)  # rows: y_w^t, y_w^e, y_l^t, y_l^e
TOL = 1e-6


def reference_ranks(scores: list[float]) -> list[int]:
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))  # ties: listed first
    ranks = [0] * len(scores)
    for position, i in enumerate(order, start=1):
        ranks[i] = position
    return ranks


def reference_delta(i: int, j: int, ranks: list[int], weighting: str, mu: float) -> float:
    gain = [2.0 ** p - 1 for p in PSI]
    d = lambda r: math.log(1 + r)  # noqa: E731
    lambdarank = abs(gain[i] - gain[j]) * abs(1 / d(ranks[i]) - 1 / d(ranks[j]))
    gap = abs(ranks[i] - ranks[j])
    ndcg2 = abs(gain[i] - gain[j]) * abs(1 / d(gap) - 1 / d(gap + 1))
    return {"lambdarank": lambdarank, "ndcg2": ndcg2, "ndcg2pp": mu * ndcg2 + lambdarank}[weighting]


def reference_crpo(policy, ref, n_tokens, *, alpha, beta, weighting, mu=10.0):
    """(loss, ranks [P][4], deltas {(i, j, p)}, dloss/dpolicy [4][P]) in float64 Python."""
    n_prompts = len(policy[0])
    grad = [[0.0] * n_prompts for _ in range(4)]
    ranking, all_ranks, deltas = 0.0, [], {}
    for p in range(n_prompts):
        s = [beta * (policy[i][p] - ref[i][p]) for i in range(4)]
        ranks = reference_ranks(s)
        all_ranks.append(ranks)
        for i, j in itertools.permutations(range(4), 2):
            delta = reference_delta(i, j, ranks, weighting, mu)
            deltas[i, j, p] = delta
            if PSI[i] > PSI[j]:
                margin = s[i] - s[j]
                ranking += delta * math.log1p(math.exp(-margin)) / n_prompts
                pull = delta / (1 + math.exp(margin)) / n_prompts  # delta * sigmoid(-margin)
                grad[i][p] -= alpha * beta * pull
                grad[j][p] += alpha * beta * pull
    total_tokens = sum(n_tokens[0])
    nll = -sum(policy[0]) / total_tokens
    for p in range(n_prompts):
        grad[0][p] -= (1 - alpha) / total_tokens
    return (1 - alpha) * nll + alpha * ranking, all_ranks, deltas, grad


def max_error(weighting: str, policy: torch.Tensor, reference: torch.Tensor,
              n_tokens: torch.Tensor, alpha: float = 0.2, beta: float = 0.1) -> float:
    """Largest absolute difference of crpo_loss from the reference: loss, ranks, weights, grads."""
    expect_loss, expect_ranks, expect_deltas, expect_grad = reference_crpo(
        policy.tolist(), reference.tolist(), n_tokens.tolist(), alpha=alpha, beta=beta,
        weighting=weighting)
    leaf = policy.clone().requires_grad_(True)
    out = crpo_loss(leaf, reference, n_tokens, alpha=alpha, beta=beta, weighting=weighting)
    out.loss.backward()
    scores = beta * (policy - reference)
    ranks = losses.score_ranks(scores)
    weights = lambda_weights(ranks, torch.tensor(PSI, dtype=torch.float64), weighting)
    errors = [abs(out.loss.item() - expect_loss),
              max(abs(ranks[i, p].item() - expect_ranks[p][i])
                  for i in range(4) for p in range(policy.shape[1])),
              max(abs(weights[i, j, p].item() - value)
                  for (i, j, p), value in expect_deltas.items()),
              (leaf.grad - torch.tensor(expect_grad, dtype=torch.float64)).abs().max().item()]
    return max(errors)


@pytest.fixture
def batch():
    generator = torch.Generator().manual_seed(7)
    policy = -40 + 10 * torch.randn(4, 6, generator=generator, dtype=torch.float64)
    reference = policy + 5 * torch.randn(4, 6, generator=generator, dtype=torch.float64)
    n_tokens = torch.randint(5, 30, (4, 6), generator=generator).to(torch.float64)
    return policy, reference, n_tokens


@pytest.mark.parametrize("weighting", ["lambdarank", "ndcg2", "ndcg2pp"])
def test_matches_the_float64_reference(batch, weighting):
    policy, reference, n_tokens = batch
    # the ranks of this batch are not all the hierarchy's order: the weights are exercised
    ranks = score_ranks(0.1 * (policy - reference))
    assert not torch.equal(ranks, torch.arange(1, 5)[:, None].expand_as(ranks))
    assert max_error(weighting, policy, reference, n_tokens) < TOL
    assert max_error(weighting, policy, reference, n_tokens, alpha=0.7, beta=0.5) < TOL


def test_first_step_ties_rank_in_hierarchy_order_and_match_by_hand(batch):
    policy, _, n_tokens = batch
    out = crpo_loss(policy, policy.clone(), n_tokens, weighting="ndcg2")
    # all scores 0 -> ranks 1..4 in row order; every pair's softplus(0) = ln 2. ndcg2 weights
    # by rank gap g: |G_i - G_j| (1/ln(1+g) - 1/ln(2+g)) with gains 7, 3, 1, 0.
    w = {g: 1 / math.log(1 + g) - 1 / math.log(2 + g) for g in (1, 2, 3)}
    by_hand = math.log(2) * (4 * w[1] + 6 * w[2] + 7 * w[3] + 2 * w[1] + 3 * w[2] + 1 * w[1])
    assert out.metrics["loss_lambda"] == pytest.approx(by_hand, abs=TOL)
    assert max_error("ndcg2", policy, policy.clone(), n_tokens) < TOL
    assert out.metrics["ranking_accuracy"] == 0.0  # ties are not wins


def test_metrics_follow_the_scores(batch):
    policy, _, n_tokens = batch
    reference = torch.zeros_like(policy)
    perfect = torch.tensor([[3.0], [2.0], [1.0], [0.0]], dtype=torch.float64).expand(4, 6)
    out = crpo_loss(perfect, reference, n_tokens)
    assert out.metrics["ranking_accuracy"] == 1.0 and out.metrics["ranking_exact"] == 1.0
    assert out.metrics["reward_margin"] == pytest.approx(0.2)
    assert out.metrics["language_margin"] == pytest.approx(0.1)
    swapped = perfect[[1, 0, 2, 3]]  # English chosen above target chosen
    out = crpo_loss(swapped, reference, n_tokens)
    assert out.metrics["ranking_accuracy"] == pytest.approx(5 / 6)
    assert out.metrics["ranking_exact"] == 0.0


def test_relevance_must_have_one_value_per_candidate(batch):
    with pytest.raises(ValueError, match="one value per candidate"):
        crpo_loss(*batch, relevance=(3, 2, 1))


def _soft_ranks(scores: torch.Tensor) -> torch.Tensor:
    """Ranks that carry gradient (1 + sum of sigmoids): a plausible, wrong implementation."""
    return 1 + torch.sigmoid((scores[None, :] - scores[:, None]) / 0.5).sum(1) - 0.5


@pytest.mark.parametrize("mutation", ["hierarchy", "nll_row", "weights_with_gradient"])
def test_a_mutated_loss_fails_the_check(batch, monkeypatch, mutation):
    if mutation == "hierarchy":
        monkeypatch.setattr(losses, "CRPO_RELEVANCE", (2.0, 3.0, 1.0, 0.0))
    elif mutation == "nll_row":
        monkeypatch.setattr(losses, "CRPO_NLL_ROW", losses.CRPO_EN_CHOSEN)
    else:
        monkeypatch.setattr(losses, "score_ranks", _soft_ranks)
    assert max_error("ndcg2", *batch) > 1e-3
