"""Evaluation arithmetic without a model: language fidelity, judge parsing and scoring,
the objective."""

import pytest

from clo_ray.errors import LanguageError
from clo_ray.eval.fidelity import EMPTY, UNDETERMINED, language_fidelity
from clo_ray.eval.judge import JUDGE_PROMPT, judge_pairwise, judge_prompt, parse_verdict
from clo_ray.eval.objective import ObjectiveError, objective

N = 40  # sample rows per language: enough texts, fast language id


@pytest.fixture(scope="module")
def swahili():
    from conftest import sample_translations

    return sample_translations("sw", limit=N)


# ------------------------------------------------------------------------------ fidelity


def test_correct_answer_sets_score_one(swahili) -> None:
    target = language_fidelity(swahili.column("response").to_pylist(), "sw", threshold=0.5)
    english = language_fidelity(swahili.column("response_en").to_pylist(), "en", threshold=0.5)
    assert (target.rate, target.n, target.detected) == (1.0, N, {"sw": N})
    assert (english.rate, english.detected) == (1.0, {"en": N})


def test_swapped_answer_sets_score_zero(swahili) -> None:
    """Swahili answers scored as Yoruba, English answers to a German prompt set: the paper's
    failure (answering in English) and a wrong-target mix-up both read as 0."""
    as_yoruba = language_fidelity(swahili.column("response").to_pylist(), "yo", threshold=0.5)
    as_german = language_fidelity(swahili.column("response_en").to_pylist(), "de",
                                  threshold=0.5)
    assert as_yoruba.rate == 0.0 and as_yoruba.detected == {"sw": N}
    assert as_german.rate == 0.0 and as_german.detected == {"en": N}


def test_mixed_and_empty_answers(swahili) -> None:
    sw = swahili.column("response").to_pylist()[:6]
    en = swahili.column("response_en").to_pylist()[:2]
    got = language_fidelity([*sw, *en, "", "   "], "sw", threshold=0.5)
    assert got.rate == pytest.approx(6 / 10)
    assert got.detected == {"sw": 6, "en": 2, EMPTY: 2} and got.n == 10


def test_low_confidence_is_undetermined_and_no_answers_is_zero(swahili) -> None:
    text = swahili.column("response").to_pylist()[0]
    assert language_fidelity([text], "sw", threshold=1.01).detected == {UNDETERMINED: 1}
    assert language_fidelity([], "sw", threshold=0.5).rate == 0.0
    with pytest.raises(LanguageError):
        language_fidelity(["hello"], "xx", threshold=0.5)


# ------------------------------------------------------------------------------ judge parser


@pytest.mark.parametrize("reply, verdict", [
    ("", None),
    ("   \n", None),
    ("A", "A"),
    ("b", "B"),
    ("(A)", "A"),
    ("B.", "B"),
    ("[[B]]", "B"),
    ("[[C]]", "tie"),
    ("**Verdict:** [[A]]", "A"),
    ("Verdict: tie", "tie"),
    ("verdict: TIE.", "tie"),
    ("Verdict: a tie", "tie"),
    ('Verdict: "B"', "B"),
    ("verdict: b", "B"),
    ("The verdict is A.", "A"),
    ("Verdict: A\nAnswer A is more detailed than answer B.", "A"),
    ("Answer A", "A"),
    ("Output (a)", "A"),
    ("Answer B is better than answer A.", "B"),
    ("A is worse.", "B"),
    ("I prefer Assistant B.", "B"),
    ("It's a tie.", "tie"),
    ("Both answers are equally good.", "tie"),
    ("Neither answer is good.", "tie"),
    ("Ｖｅｒｄｉｃｔ：Ｂ", "B"),  # fullwidth
    ("Verdict:\u200b A", "A"),  # zero-width space
    ("判定：A", "A"),
    # ambiguous or absent
    ("A and B", None),
    ("Verdict: A or B", None),
    ("Verdict: A\nVerdict: B", None),
    ("Answer A is better. Answer B is better.", None),
    ("Verdict: C", None),
    ("I cannot decide.", None),
    ("A good answer would mention B", None),
])
def test_parse_verdict(reply: str, verdict: str | None) -> None:
    assert parse_verdict(reply) == verdict


def test_judge_prompt_keeps_braces_in_answers() -> None:
    text = judge_prompt("q {x}", "def f(): return {'a': 1}", "{answer_b}")
    assert "{'a': 1}" in text and text.count("{answer_b}") == 1
    assert "Verdict: A" in JUDGE_PROMPT


# ------------------------------------------------------------------------------ judge scoring


def _fake_judge(prefer: list[str | None]):
    """A judge that, for question i, prefers answer text ``prefer[i]`` ("model" /
    "opponent" / "tie" / None = garbage) wherever it sits, plus a biased variant."""
    calls: list[list[str]] = []

    def judge(prompts: list[str]) -> list[str]:
        calls.append(prompts)
        replies = []
        for prompt in prompts:
            index = int(prompt.split("[Question]\n")[1].split("\n")[0].removeprefix("q"))
            a_is_model = prompt.split("[Answer A]\n")[1].startswith("model")
            want = prefer[index]
            if want is None:
                replies.append("I refuse to judge.")
            elif want == "tie":
                replies.append("Verdict: tie")
            else:
                replies.append("Verdict: A" if (want == "model") == a_is_model else "Verdict: B")
        return replies

    judge.calls = calls  # type: ignore[attr-defined]
    return judge


def test_judge_pairwise_counts_both_orders() -> None:
    prefer = ["model", "model", "model", "opponent", "tie", None]
    judge = _fake_judge(prefer)
    n = len(prefer)
    result = judge_pairwise(judge, [f"q{i}" for i in range(n)],
                            [f"model {i}" for i in range(n)], [f"opponent {i}" for i in range(n)])
    assert (result.wins, result.losses, result.ties, result.unparseable, result.n) == (3, 1, 1,
                                                                                      1, 6)
    assert result.win_rate == pytest.approx((3 + 0.5) / 5)
    assert len(judge.calls) == 1 and len(judge.calls[0]) == 2 * n  # one call, both orders
    first, second = judge.calls[0][0], judge.calls[0][n]
    assert first.index("model 0") < first.index("opponent 0")
    assert second.index("opponent 0") < second.index("model 0")


def test_position_bias_counts_as_tie_and_nothing_judged_is_none() -> None:
    always_a = judge_pairwise(lambda prompts: ["[[A]]"] * len(prompts), ["q0", "q1"],
                              ["m0", "m1"], ["o0", "o1"])
    assert (always_a.wins, always_a.losses, always_a.ties, always_a.win_rate) == (0, 0, 2, 0.5)
    garbage = judge_pairwise(lambda prompts: ["?"] * len(prompts), ["q0"], ["m"], ["o"])
    assert garbage.win_rate is None and garbage.unparseable == 1
    assert judge_pairwise(lambda prompts: [], [], [], []).n == 0
    with pytest.raises(ValueError, match="one of each"):
        judge_pairwise(lambda prompts: prompts, ["q"], ["a", "b"], ["o"])
    with pytest.raises(ValueError, match="replies"):
        judge_pairwise(lambda prompts: ["A"], ["q"], ["a"], ["o"])


# ------------------------------------------------------------------------------ objective


def test_objective_is_a_weighted_sum() -> None:
    metrics = {"target_fidelity": 0.8, "english_retention": 0.6, "target_nll": 2.0,
               "judge_win_rate": None}
    got = objective(metrics, {"target_fidelity": 1.0, "english_retention": 0.5,
                              "target_nll": -0.1})
    assert got == pytest.approx(0.8 + 0.3 - 0.2)


@pytest.mark.parametrize("metrics, why", [
    ({"target_fidelity": 0.8}, "missing"),
    ({"target_fidelity": 0.8, "judge_win_rate": None}, "not measured"),
    ({"target_fidelity": 0.8, "judge_win_rate": float("nan")}, "not measured"),
])
def test_objective_names_an_unmeasured_metric(metrics: dict, why: str) -> None:
    with pytest.raises(ObjectiveError, match=f"'judge_win_rate', which is {why}"):
        objective(metrics, {"target_fidelity": 1.0, "judge_win_rate": 1.0})
    with pytest.raises(ObjectiveError, match="no weights"):
        objective(metrics, {})
