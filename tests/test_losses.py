"""Losses and their metrics against hand computations written differently (plain Python
loops, float64)."""

import math

import pytest
import torch

from clo_ray.spec.training import StageSpec
from clo_ray.train.losses import (
    EN_CHOSEN,
    EN_REJECTED,
    TGT_CHOSEN,
    TGT_REJECTED,
    clo_loss,
    crpo_loss,
    dpo_loss,
    sequence_logps,
    sft_loss,
)
from clo_ray.train.objectives import OBJECTIVES, language_metrics


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def test_sequence_logps_counts_only_response_tokens():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7, dtype=torch.float64)
    ids = torch.randint(0, 7, (2, 5))
    mask = torch.tensor([[0, 0, 1, 1, 0], [0, 1, 1, 1, 1]])  # prompt, response, pad
    got, counts = sequence_logps(logits, ids, mask)
    for b in range(2):
        want, n = 0.0, 0
        for t in range(1, 5):
            if mask[b, t]:
                row = logits[b, t - 1].tolist()
                log_z = math.log(sum(math.exp(v) for v in row))
                want += row[ids[b, t]] - log_z
                n += 1
        assert got[b].item() == pytest.approx(want, abs=1e-9)
        assert counts[b].item() == n


def test_sequence_logps_ignores_masked_logits():
    logits = torch.randn(1, 4, 5)
    ids = torch.tensor([[1, 2, 3, 4]])
    mask = torch.tensor([[0, 0, 1, 0]])
    base, _ = sequence_logps(logits, ids, mask)
    logits[0, 2:] += 100.0  # positions predicting masked tokens (t=3, and beyond)
    logits[0, 0] += 50.0  # predicts a prompt token
    moved, _ = sequence_logps(logits, ids, mask)
    assert moved.item() == pytest.approx(base.item(), abs=1e-5)


def test_dpo_is_ln2_when_policy_equals_reference():
    x = torch.randn(6)
    out = dpo_loss(x, x - 1.0, x, x - 1.0, beta=0.1)
    assert out.loss.item() == pytest.approx(math.log(2), abs=1e-6)
    assert out.metrics["reward_margin"] == pytest.approx(0.0, abs=1e-6)


def test_dpo_sigmoid_and_ipo_match_a_loop():
    g = torch.Generator().manual_seed(1)
    pc, pr, rc, rr = (torch.randn(5, generator=g, dtype=torch.float64) * 3 for _ in range(4))
    beta = 0.2
    sig, ipo = [], []
    for i in range(5):
        logit = (pc[i].item() - rc[i].item()) - (pr[i].item() - rr[i].item())
        sig.append(-log_sigmoid(beta * logit))
        ipo.append((logit - 1 / (2 * beta)) ** 2)
    assert dpo_loss(pc, pr, rc, rr, beta=beta).loss.item() == pytest.approx(sum(sig) / 5)
    assert dpo_loss(pc, pr, rc, rr, beta=beta, variant="ipo").loss.item() == pytest.approx(
        sum(ipo) / 5)
    acc = sum((pc[i] - rc[i]) > (pr[i] - rr[i]) for i in range(5)) / 5
    assert dpo_loss(pc, pr, rc, rr, beta=beta).metrics["reward_accuracy"] == pytest.approx(acc)


def hand_clo(policy, reference, tokens, lam, beta, directions, nll):
    """The paper's formula, one pair at a time."""
    P = policy.shape[1]
    cl_terms, nll_seq, nll_tok_sum, tok_sum, nll_sum = [], [], 0.0, 0.0, []
    for p in range(P):
        def r(row, p=p):
            return beta * (policy[row, p].item() - reference[row, p].item())
        en = -log_sigmoid(r(EN_CHOSEN) - r(EN_REJECTED))
        tgt = -log_sigmoid(r(TGT_CHOSEN) - r(TGT_REJECTED))
        cl_terms.append(en + tgt if directions == "sum" else (en + tgt) / 2)
        lp, n = policy[TGT_CHOSEN, p].item(), tokens[TGT_CHOSEN, p].item()
        nll_seq.append(-lp / n)
        nll_sum.append(-lp)
        nll_tok_sum += -lp
        tok_sum += n
    nll_value = {"token": nll_tok_sum / tok_sum, "sequence": sum(nll_seq) / P,
                 "sum": sum(nll_sum) / P}[nll]
    return lam * nll_value + (1 - lam) * sum(cl_terms) / P


@pytest.mark.parametrize("directions", ["sum", "mean"])
@pytest.mark.parametrize("nll", ["token", "sequence", "sum"])
@pytest.mark.parametrize("lam", [0.0, 0.5, 1.0])
def test_clo_matches_the_papers_formula(directions, nll, lam):
    g = torch.Generator().manual_seed(2)
    policy = -torch.rand(4, 3, generator=g, dtype=torch.float64) * 40
    reference = policy + torch.randn(4, 3, generator=g, dtype=torch.float64)
    tokens = torch.randint(3, 20, (4, 3), generator=g).double()
    out = clo_loss(policy, reference, tokens, lambda_=lam, beta=0.1, directions=directions,
                   nll_reduction=nll)
    want = hand_clo(policy, reference, tokens, lam, 0.1, directions, nll)
    assert out.loss.item() == pytest.approx(want, rel=1e-12)


def test_clo_at_init_is_nll_plus_two_ln2():
    policy = -torch.rand(4, 2) * 10
    tokens = torch.full((4, 2), 5.0)
    out = clo_loss(policy, policy.clone(), tokens, lambda_=0.5)
    nll = -policy[TGT_CHOSEN].sum() / 10
    assert out.loss.item() == pytest.approx(0.5 * nll.item() + 0.5 * 2 * math.log(2), rel=1e-5)
    assert out.metrics["en_reward_accuracy"] == out.metrics["preference_accuracy"] == 0.0
    assert out.metrics["loss_cl"] == pytest.approx(2 * math.log(2), rel=1e-5)


def hand_preferences(policy, reference, beta):
    """Per pair: does each direction's implicit reward prefer the prompt's language?"""
    rows = []
    for p in range(policy.shape[1]):
        def r(row, p=p):
            return beta * (policy[row, p].item() - reference[row, p].item())
        rows.append((r(EN_CHOSEN) - r(EN_REJECTED), r(TGT_CHOSEN) - r(TGT_REJECTED)))
    return rows


@pytest.mark.parametrize("loss", ["clo", "dpo"])
def test_preference_accuracy_counts_pairs_right_in_both_directions(loss):
    """5 pairs: 2 right both ways, 1 English-only, 1 target-only, 1 wrong both ways. Both
    directions: 2/5; the mean of the per-direction accuracies (3/5 each) would say 3/5."""
    g = torch.Generator().manual_seed(4)
    reference = -torch.rand(4, 5, generator=g, dtype=torch.float64) * 30
    policy = reference.clone()
    for p, (en, tgt) in enumerate([(1, 2), (3, 1), (2, -1), (-2, 1), (-1, -3)]):
        policy[EN_CHOSEN, p] += en  # chosen log-ratio up (or down) by en, rejected unchanged
        policy[TGT_REJECTED, p] -= tgt
    n_tokens = torch.full((4, 5), 7.0, dtype=torch.float64)
    stage = StageSpec.model_validate({"loss": loss, "modules": ["attention"], "steps": 1,
                                      "beta": 0.2})
    metrics = OBJECTIVES[loss](stage, policy, reference, n_tokens).metrics

    margins = hand_preferences(policy, reference, 0.2)
    both = sum(en > 0 and tgt > 0 for en, tgt in margins) / 5
    en_acc, tgt_acc = (sum(m[i] > 0 for m in margins) / 5 for i in (0, 1))
    assert (both, en_acc, tgt_acc) == (0.4, 0.6, 0.6)
    assert metrics["preference_accuracy"] == pytest.approx(both)
    assert metrics["preference_accuracy"] != pytest.approx((en_acc + tgt_acc) / 2)
    assert metrics["en_reward_accuracy"] == pytest.approx(en_acc)
    assert metrics["target_reward_accuracy"] == pytest.approx(tgt_acc)
    assert metrics["reward_margin"] == pytest.approx(sum(en + tgt for en, tgt in margins) / 10)
    assert metrics["en_reward_margin"] == pytest.approx(sum(m[0] for m in margins) / 5)
    # per language (multi-target trials): the same definition on each language's pairs
    per_language = language_metrics(OBJECTIVES[loss], stage, policy, reference, n_tokens,
                                    ["sw", "sw", "zh", "zh", "zh"])
    assert per_language["sw"][0]["preference_accuracy"] == 1.0 and per_language["sw"][1] == 2
    assert per_language["zh"][0]["preference_accuracy"] == 0.0
    assert per_language["zh"][0]["en_reward_accuracy"] == pytest.approx(1 / 3)


def test_sft_loss_reductions_and_errors():
    logps, n = torch.tensor([-6.0, -2.0]), torch.tensor([3.0, 1.0])
    assert sft_loss(logps, n, "token").item() == pytest.approx(2.0)
    assert sft_loss(logps, n, "sequence").item() == pytest.approx(2.0)
    assert sft_loss(logps, n, "sum").item() == pytest.approx(4.0)
    with pytest.raises(ValueError, match="token, sequence or sum"):
        sft_loss(logps, n, "mean")


def test_a_gradient_step_lowers_the_clo_loss_and_prefers_the_right_language():
    """Toy policy: one free logit vector per sequence; a step must help both directions."""
    torch.manual_seed(3)
    vocab, steps, P = 11, 6, 2
    ids = torch.randint(0, vocab, (4 * P, steps))
    mask = torch.ones_like(ids)
    mask[:, :2] = 0  # prompt tokens
    logits = torch.zeros(4 * P, steps, vocab, requires_grad=True)
    with torch.no_grad():
        ref, _ = sequence_logps(logits, ids, mask)
    ref = ref.view(4, P)

    def loss_now():
        logps, counts = sequence_logps(logits, ids, mask)
        return clo_loss(logps.view(4, P), ref, counts.view(4, P), lambda_=0.5, beta=0.5)

    before = loss_now()
    before.loss.backward()
    with torch.no_grad():
        logits -= 0.5 * logits.grad
    after = loss_now()
    assert after.loss.item() < before.loss.item()
    assert after.metrics["en_reward_margin"] > 0 and after.metrics["target_reward_margin"] > 0


def test_crpo_objective_passes_the_stage_settings_and_names_metrics():
    """The objective is crpo_loss with the stage's alpha, beta, weighting and relevance."""
    g = torch.Generator().manual_seed(3)
    reference = -torch.rand(4, 3, generator=g, dtype=torch.float64) * 30
    policy = reference + torch.randn(4, 3, generator=g, dtype=torch.float64)
    n_tokens = torch.full((4, 3), 5.0, dtype=torch.float64)
    stage = StageSpec.model_validate({"loss": "crpo", "modules": ["attention"], "steps": 1,
                                      "alpha": 0.4, "beta": 0.3, "lambda_weighting": "ndcg2pp",
                                      "lambda_mu": 4.0, "relevance": [4, 2, 1, 0]})
    out = OBJECTIVES["crpo"](stage, policy, reference, n_tokens)
    direct = crpo_loss(policy, reference, n_tokens, alpha=0.4, beta=0.3, weighting="ndcg2pp",
                       mu=4.0, relevance=(4, 2, 1, 0))
    assert out.loss.item() == pytest.approx(direct.loss.item(), abs=1e-12)
    assert out.metrics["train_loss"] == pytest.approx(direct.metrics["loss"])
    assert out.metrics["target_nll"] == pytest.approx(-policy[0].sum().item() / 15)
    assert out.metrics["english_nll"] == pytest.approx(-policy[1].sum().item() / 15)
    assert {"loss_lambda", "ranking_accuracy", "ranking_exact"} <= set(out.metrics)
    defaults = StageSpec.model_validate({"loss": "crpo", "modules": ["attention"], "steps": 1})
    assert (defaults.alpha, defaults.beta, defaults.lambda_weighting, defaults.lambda_mu,
            defaults.relevance) == (0.2, 0.1, "ndcg2", 10.0, (3.0, 2.0, 1.0, 0.0))


@pytest.mark.parametrize("fields, message", [
    ({"loss": "crpo", "relevance": [3, 1, 2, 0]}, "strictly decreasing"),
    ({"loss": "clo", "alpha": 0.2}, "does not apply to a 'clo' stage"),
    ({"loss": "crpo", "dpo_pairs": "monolingual"}, "does not apply to a 'crpo' stage"),
])
def test_crpo_stage_settings_are_checked(fields, message):
    with pytest.raises(ValueError, match=message):
        StageSpec.model_validate({"modules": ["attention"], "steps": 1, **fields})
