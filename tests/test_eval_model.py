"""Evaluation on tiny-llama (random weights, so answers are gibberish: these tests check
plumbing, determinism and arithmetic, not quality)."""

import copy
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from clo_ray.eval import evaluate as evaluate_module
from clo_ray.eval.evaluate import EvalSettings, EvaluationError, evaluate_model, scalar_metrics
from clo_ray.eval.generate import (
    GenerationError,
    TransformersGenerator,
    generate_answers,
    load_model,
    resolve_backend,
)
from clo_ray.eval.heldout import HeldoutError, HeldoutScoring, heldout_metrics
from clo_ray.eval.judge import make_judge
from clo_ray.eval.objective import objective
from clo_ray.models.resolve import resolve_model
from clo_ray.spec.evaluation import EvaluationSection
from clo_ray.spec.training import DEFAULT_PROMPT_TEMPLATE as TEMPLATE
from clo_ray.train.batches import encode_examples
from clo_ray.train.reference import compute_reference_logps

MAX_LENGTH = 128
SCORING = HeldoutScoring(TEMPLATE, MAX_LENGTH, beta=0.1)


@pytest.fixture(scope="module")
def tiny_dir() -> Path:
    return resolve_model("builtin:tiny-llama")


@pytest.fixture(scope="module")
def tiny(tiny_dir: Path):
    return load_model(tiny_dir)


@pytest.fixture(scope="module")
def rows():
    from conftest import sample_translations

    return sample_translations("sw", limit=5)


# ------------------------------------------------------------------------------ generation


def test_generate_answers_one_string_per_prompt_and_deterministic(tiny_dir: Path, rows) -> None:
    prompts = rows.column("prompt").to_pylist()[:3] + ["Hi"]
    kwargs = {"max_new_tokens": 6, "template": TEMPLATE, "backend": "transformers"}
    first = generate_answers(tiny_dir, prompts, batch_size=3, **kwargs)
    assert len(first) == len(prompts) and all(isinstance(a, str) for a in first)
    assert any(first)
    # again, and unbatched: left padding must not change greedy answers
    assert generate_answers(tiny_dir, prompts, batch_size=1, **kwargs) == first
    assert generate_answers(tiny_dir, [], **kwargs) == []


def test_resolve_backend() -> None:
    assert resolve_backend("transformers") == "transformers"
    if not torch.cuda.is_available():  # vLLM-CPU start-up costs more than it saves
        assert resolve_backend("auto") == "transformers"
    with pytest.raises(GenerationError, match="unknown"):
        resolve_backend("tgi")


# ------------------------------------------------------------------------------ held-out


def test_heldout_metrics_against_itself(tiny, rows) -> None:
    model, tokenizer = tiny
    got = heldout_metrics(model, tokenizer, rows, replace(SCORING, micro_batch=2))
    for name in ("target_nll", "english_nll"):
        assert math.isfinite(got[name]) and got[name] > 0
    # a random model over a 2048-token vocabulary: about ln(2048) = 7.6 nats per token
    assert 5 < got["target_nll"] < 10
    assert got["preference_accuracy"] == got["en_reward_accuracy"] == 0.0
    assert got["reward_margin"] == 0.0
    assert torch.tensor(got["logps"]).shape == (rows.num_rows, 4)
    with pytest.raises(HeldoutError, match="shape"):
        heldout_metrics(model, tokenizer, rows, SCORING, reference_logps=[[0.0] * 4])


def test_heldout_metrics_move_with_another_reference(tiny, rows) -> None:
    model, tokenizer = tiny
    other = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in other.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
    examples = encode_examples(rows, tokenizer, loss="clo", template=TEMPLATE,
                               max_length=MAX_LENGTH)
    reference = compute_reference_logps(other, examples, micro_batch=4,
                                        pad_id=tokenizer.pad_token_id)
    own = heldout_metrics(model, tokenizer, rows, SCORING)
    got = heldout_metrics(model, tokenizer, rows, SCORING, reference_logps=reference)
    assert got["target_nll"] == pytest.approx(own["target_nll"])  # NLL ignores the reference
    assert got["reward_margin"] != 0.0
    policy = torch.tensor(own["logps"])
    ref = reference.double()
    en = 0.1 * ((policy[:, 0] - ref[:, 0]) - (policy[:, 1] - ref[:, 1]))
    tgt = 0.1 * ((policy[:, 2] - ref[:, 2]) - (policy[:, 3] - ref[:, 3]))
    assert got["reward_margin"] == pytest.approx(((en + tgt) / 2).mean().item(), abs=1e-4)
    assert got["en_reward_accuracy"] == (en > 0).double().mean().item()
    assert got["preference_accuracy"] == ((en > 0) & (tgt > 0)).double().mean().item()
    # the other model's own log-probs are the same numbers the reference helper computes
    theirs = heldout_metrics(other, tokenizer, rows, SCORING)
    assert torch.tensor(theirs["logps"]) == pytest.approx(ref, abs=1e-3)


# ------------------------------------------------------------------------------ end to end


@pytest.fixture
def generation_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts prompts per transformers generation call made by evaluate_model."""
    calls: list[int] = []
    original = TransformersGenerator.__call__

    def counted(self, prompts):
        calls.append(len(prompts))
        return original(self, prompts)

    monkeypatch.setattr(TransformersGenerator, "__call__", counted)
    return calls


def _section(**judge) -> EvaluationSection:
    weights = {"target_fidelity": 1.0, "english_retention": 0.5, "target_nll": -0.1}
    if judge:
        weights["judge_win_rate"] = 1.0
    return EvaluationSection(max_prompts=3, max_new_tokens=6, backend="transformers",
                             judge=judge or {}, objective={"weights": weights})


def test_evaluate_model_end_to_end_and_cache(tiny_dir: Path, rows, tmp_path: Path,
                                             generation_calls: list[int]) -> None:
    section = _section()
    settings = EvalSettings("sw", section, TEMPLATE, MAX_LENGTH)
    kwargs = {"cache_uri": str(tmp_path / "base")}
    first = evaluate_model(tiny_dir, rows, settings, **kwargs)
    assert generation_calls == [6]  # 3 target + 3 English prompts, one call
    assert set(section.metric_names()) <= set(first)
    for name in ("target_fidelity", "english_retention", "preference_accuracy"):
        assert 0.0 <= first[name] <= 1.0
    assert first["preference_accuracy"] == 0.0  # the model is its own reference
    assert first["objective"] == pytest.approx(objective(first, section.objective.weights))
    assert first["answers"]["ids"] == rows.column("id").to_pylist()[:3]
    assert len(first["answers"]["target"]) == len(first["answers"]["english"]) == 3
    assert torch.tensor(first["heldout_logps"]).shape == (5, 4)  # all held-out rows
    assert sum(first["details"]["target_detected"].values()) == 3
    assert "answers" not in scalar_metrics(first) and "target_nll" in scalar_metrics(first)

    def no_load(model_dir):
        raise AssertionError("a cache hit must not load the model")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(evaluate_module, "load_model", no_load)
        again = evaluate_model(tiny_dir, rows, settings, **kwargs)
    assert generation_calls == [6]
    assert again == first
    assert (tmp_path / "base" / "metrics.json").is_file()

    generation_calls.clear()  # other inputs (beta): the cache misses and is rewritten
    changed = evaluate_model(tiny_dir, rows, replace(settings, beta=0.2), **kwargs)
    assert len(generation_calls) == 1 and changed["answers"] == first["answers"]


def test_evaluate_model_judges_against_opponent(tiny_dir: Path, rows) -> None:
    section = _section(enabled=True, model="builtin:tiny-llama")
    asked: list[str] = []

    def fake_judge(prompts: list[str]) -> list[str]:
        asked.extend(prompts)
        return ["Verdict: tie"] * len(prompts)

    settings = EvalSettings("sw", section, TEMPLATE, MAX_LENGTH, judge=fake_judge)
    base = evaluate_model(tiny_dir, rows, settings)  # no opponent: judge metrics unmeasured
    assert base["judge_win_rate"] is None and base["objective"] is None and not asked
    trial = evaluate_model(tiny_dir, rows, settings, reference_logps=base["heldout_logps"],
                           opponent_answers=base["answers"])
    assert len(asked) == 2 * 3 * 2  # both orders, target and English prompts
    assert trial["judge_win_rate"] == trial["english_judge_win_rate"] == 0.5
    assert trial["details"]["judge"]["target"]["ties"] == 3
    assert trial["objective"] == pytest.approx(objective(trial, section.objective.weights))
    wrong = {**base["answers"], "ids": ["other", "ids", "here"]}
    with pytest.raises(EvaluationError, match="other prompts"):
        evaluate_model(tiny_dir, rows, settings, opponent_answers=wrong)


def test_evaluate_model_refuses_mixed_languages(tiny_dir: Path, rows) -> None:
    with pytest.raises(EvaluationError, match="also hold"):
        evaluate_model(tiny_dir, rows, EvalSettings("yo", _section(), TEMPLATE, MAX_LENGTH))


def test_make_judge_serves_a_real_model(tiny_dir: Path) -> None:
    judge = make_judge(tiny_dir, "transformers", max_new_tokens=4)
    try:
        replies = judge(["Question: 1+1? Answer A: 2. Answer B: 3.", "Hi"])
    finally:
        judge.close()
    assert len(replies) == 2 and all(isinstance(r, str) for r in replies)


def test_heldout_reward_margin_scales_with_the_trials_beta(tiny_dir: Path, rows,
                                                           tmp_path: Path) -> None:
    """The held-out reward margin is measured at the beta it is given (the trial's effective
    beta, tests/test_schedule.py): 0.5 gives five times the margin of 0.1 (the margin is beta
    times a log-ratio difference), not the same, and not the beta-0.1 result from the cache
    of the same model, rows and reference."""
    settings = EvalSettings("sw", _section(), TEMPLATE, MAX_LENGTH)
    base = evaluate_model(tiny_dir, rows, settings)
    # A reference that differs from the policy: chosen answers made likelier under it.
    reference = (torch.tensor(base["heldout_logps"]) + torch.tensor([1.0, 0.0, 0.5, 0.0])).tolist()
    kwargs = {"reference_logps": reference, "cache_uri": str(tmp_path / "trial")}
    low = evaluate_model(tiny_dir, rows, replace(settings, beta=0.1), **kwargs)
    high = evaluate_model(tiny_dir, rows, replace(settings, beta=0.5), **kwargs)
    assert low["reward_margin"] < -1e-3  # the reference prefers the chosen answers
    assert high["reward_margin"] == pytest.approx(5 * low["reward_margin"], rel=1e-4)
    assert high["target_nll"] == pytest.approx(low["target_nll"])  # beta scales rewards only
