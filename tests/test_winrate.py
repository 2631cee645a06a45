"""Win-rate statistics against a hand computation, and the judge's outcomes as preferences."""

from __future__ import annotations

import math

import numpy as np
import pytest

from clo_ray.eval.judge import judge_pairwise
from clo_ray.eval.winrate import head_to_head, preference, win_rate

# A fixed verdict list: 4 wins, 2 losses, 2 draws, as alpaca_eval's preferences.
VERDICTS = ["win", "loss", "tie", "win", "win", "loss", "win", "tie"]


def test_win_rate_and_standard_error_by_hand() -> None:
    prefs = [preference(v) for v in VERDICTS]
    assert prefs == [2.0, 1.0, 1.5, 2.0, 2.0, 1.0, 2.0, 1.5]
    got = win_rate(prefs)
    # by hand: x = pref - 1 = [1, 0, .5, 1, 1, 0, 1, .5]; mean .625
    x = [1, 0, .5, 1, 1, 0, 1, .5]
    mean = sum(x) / 8
    sd = math.sqrt(sum((v - mean) ** 2 for v in x) / 7)  # sample std, ddof 1 = sqrt(1.375 / 7)
    assert got["win_rate"] == pytest.approx(62.5)
    assert got["standard_error"] == pytest.approx(100 * sd / math.sqrt(8))
    assert got["standard_error"] == pytest.approx(15.6696, abs=1e-4)
    assert (got["n_wins"], got["n_wins_base"], got["n_draws"], got["n_total"]) == (4, 2, 2, 8)
    assert got["discrete_win_rate"] == pytest.approx(62.5)  # (4 + 2 / 2) / 8


def test_head_to_head_interval_and_edge_cases() -> None:
    stats = head_to_head([preference(v) for v in VERDICTS], [10] * 8, [10] * 8)
    half = 1.959964 * stats.standard_error
    assert stats.ci95 == pytest.approx((62.5 - half, min(100.0, 62.5 + half)), abs=1e-4)
    # 8 items and no length difference: length control is not attempted
    assert stats.length_controlled_winrate is None and stats.lc_ci95 is None
    one = head_to_head([2.0], [3], [1])
    assert (one.win_rate, one.standard_error) == (100.0, 0.0)
    with pytest.raises(ValueError, match="1.0, 1.5 or 2.0"):
        win_rate([3.0])
    with pytest.raises(ValueError, match="nothing was judged"):
        win_rate([])
    with pytest.raises(ValueError, match="one of each per item"):
        head_to_head([2.0], [1, 2], [1])


def test_length_control_removes_a_length_bias() -> None:
    """A judge that prefers the longer answer: the model wins often because it is longer;
    at zero length difference the GLM's rate is near parity, below the raw rate."""
    rng = np.random.default_rng(0)
    n = 120
    delta = rng.normal(60, 60, n).round()  # the model's answers are longer on average
    mine = (200 + delta).astype(int)
    prefs = [2.0 if rng.random() < 1 / (1 + math.exp(-d / 40)) else 1.0 for d in delta]
    stats = head_to_head(prefs, mine.tolist(), [200] * n, bootstrap=60, seed=1)
    assert stats.win_rate > 65
    assert stats.length_controlled_winrate is not None and stats.lc_ci95 is not None
    assert stats.length_controlled_winrate < stats.win_rate - 5
    assert stats.lc_ci95[0] <= stats.length_controlled_winrate <= stats.lc_ci95[1]
    assert stats.lc_standard_error and stats.lc_standard_error > 0
    again = head_to_head(prefs, mine.tolist(), [200] * n, bootstrap=60, seed=1)
    assert again == stats  # seeded: the same interval every run


def test_judge_outcomes_feed_the_statistics_and_failures_are_named() -> None:
    """judge_pairwise's per-item outcomes -> alpaca_eval preferences; a None reply (a judge
    call that failed after retries) is counted as failed, outside the rate."""
    n = 5
    script = {  # question -> (verdict with the model as A, verdict with the model as B)
        0: ("Verdict: A", "Verdict: B"),  # win
        1: ("Verdict: B", "Verdict: A"),  # loss
        2: ("Verdict: A", "Verdict: A"),  # position bias: tie
        3: (None, "Verdict: B"),          # a failed call
        4: ("no idea", "Verdict: B"),     # unparseable
    }

    def judge(prompts: list[str]) -> list[str | None]:
        return [script[i % n][i // n] for i in range(len(prompts))]

    result = judge_pairwise(judge, [f"q{i}" for i in range(n)], [f"m{i}" for i in range(n)],
                            [f"o{i}" for i in range(n)])
    assert result.outcomes == ("win", "loss", "tie", "failed", "unparseable")
    assert (result.wins, result.losses, result.ties, result.failed, result.unparseable) == (
        1, 1, 1, 1, 1)
    assert result.win_rate == pytest.approx(0.5)
    assert result.preferences() == [2.0, 1.0, 1.5]
    assert result.judged_items() == [0, 1, 2]
