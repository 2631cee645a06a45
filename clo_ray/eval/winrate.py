"""Win-rate statistics exactly as alpaca_eval defines them, so our numbers read like the papers'.

Per item, a *preference* in alpaca_eval's encoding: 1.0 the reference (opponent) wins, 2.0
the evaluated model wins, 1.5 a draw. From a list of them, alpaca_eval's own code
(``alpaca_eval.metrics.get_winrate``) gives::

    win_rate       = 100 * mean(preference - 1)
    standard_error = 100 * sem(preference - 1)       (sample std, ddof 1, / sqrt(n))
    n_wins, n_wins_base, n_draws, n_total, discrete_win_rate

The papers' "+-1.5" is that standard error over the 805 AlpacaEval items.

Length control. alpaca_eval's length-controlled win rate fits a logistic GLM of the
preference on ``tanh(standardised length difference)`` plus, in its default
``length_controlled_v1``, a per-instruction difficulty fitted on the 805 English AlpacaEval
instructions and a regulariser towards "gamed" baselines, both downloaded from the hub. Our
prompts are translated or our own, and runs are offline, so we use its
``length_controlled_minimal`` formula (length term + intercept) with its own design-matrix
and fitting code (:func:`alpaca_eval.metrics.glm_winrate.fit_LogisticRegressionCV`): the LC
win rate is the GLM's mean predicted preference at zero length difference. Without the
per-instruction term every item gets the same prediction, so alpaca_eval's ``lc_standard_error``
(the sem of those predictions) would be 0 by construction; we report a bootstrap standard
error and 95% percentile interval instead (items resampled, the GLM refitted with the
regularisation strength cross-validation chose on the full data). LC is reported beside
the raw win rate, never instead of it: with another judge and other prompts it is only an
approximation (alpaca_eval warns when the two differ by more than 10 points).
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

logger = logging.getLogger(__name__)

REFERENCE_WINS, DRAW, MODEL_WINS = 1.0, 1.5, 2.0
Outcome = Literal["win", "loss", "tie"]
LC_FORMULA = "np.tanh(std_delta_len) + not_gamed_baseline.astype(float) - 1"
MIN_LC_ITEMS = 10  # the GLM's 5-fold cross-validation needs a few items per fold
Z95 = 1.959963984540054


@dataclass(frozen=True)
class WinRate:
    """alpaca_eval's head-to-head metrics (percent) plus our intervals.

    ``ci95``: win_rate +- 1.96 standard_error (normal approximation of a mean).
    ``length_controlled_winrate`` / ``lc_standard_error`` / ``lc_ci95``: None below
    :data:`MIN_LC_ITEMS` items or when every length difference is 0 (nothing to control).
    """

    win_rate: float
    standard_error: float
    n_wins: int
    n_wins_base: int
    n_draws: int
    n_total: int
    discrete_win_rate: float
    ci95: tuple[float, float]
    length_controlled_winrate: float | None = None
    lc_standard_error: float | None = None
    lc_ci95: tuple[float, float] | None = None


def preference(outcome: Outcome) -> float:
    """alpaca_eval's preference for one item, seen from the evaluated model."""
    return {"win": MODEL_WINS, "loss": REFERENCE_WINS, "tie": DRAW}[outcome]


def win_rate(preferences: Sequence[float]) -> dict[str, float]:
    """``win_rate``, ``standard_error`` and the counts, by alpaca_eval's ``get_winrate``."""
    from alpaca_eval.metrics.winrate import get_winrate

    if not preferences:
        raise ValueError("no preferences: nothing was judged")
    bad = [p for p in preferences if p not in (REFERENCE_WINS, DRAW, MODEL_WINS)]
    if bad:
        raise ValueError(f"preferences must be 1.0, 1.5 or 2.0 (alpaca_eval's encoding), "
                         f"got {bad[:5]}")
    found = get_winrate([{"preference": float(p)} for p in preferences])
    out = {k: int(v) if k.startswith("n_") else float(v) for k, v in found.items()}
    if not math.isfinite(out["standard_error"]):  # one item: the sample std is undefined
        out["standard_error"] = 0.0
    return out


def head_to_head(preferences: Sequence[float], model_lengths: Sequence[int],
                 reference_lengths: Sequence[int], *, bootstrap: int = 200,
                 seed: int = 0) -> WinRate:
    """Every statistic of one comparison: ``preferences[i]`` for item i, whose answers had
    ``model_lengths[i]`` and ``reference_lengths[i]`` characters (alpaca_eval measures
    length in characters)."""
    if not len(preferences) == len(model_lengths) == len(reference_lengths):
        raise ValueError(f"{len(preferences)} preferences, {len(model_lengths)} model lengths "
                         f"and {len(reference_lengths)} reference lengths: one of each per item")
    raw = win_rate(preferences)
    half = Z95 * raw["standard_error"]
    lc = _length_controlled(np.asarray(preferences, float) - 1.0,
                            np.asarray(model_lengths, float) - np.asarray(reference_lengths, float),
                            bootstrap, seed)
    return WinRate(raw["win_rate"], raw["standard_error"], int(raw["n_wins"]),
                   int(raw["n_wins_base"]), int(raw["n_draws"]), int(raw["n_total"]),
                   raw["discrete_win_rate"],
                   (max(0.0, raw["win_rate"] - half), min(100.0, raw["win_rate"] + half)),
                   *lc)


def _length_controlled(pref01: np.ndarray, delta: np.ndarray, bootstrap: int, seed: int
                       ) -> tuple[float | None, float | None, tuple[float, float] | None]:
    """(LC win rate, bootstrap SE, bootstrap 95% interval), all percent; Nones when the
    GLM cannot be fitted (too few items, no length difference)."""
    if len(pref01) < MIN_LC_ITEMS or not np.std(delta) > 0:
        return None, None, None
    if np.all(pref01 == pref01[0]):  # nothing for length to explain: every item agrees
        value = float(pref01[0] * 100)
        return value, 0.0, (value, value)
    point, c_value = _fit_lc(pref01, delta, n_splits=5)
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(bootstrap):
        pick = rng.integers(0, len(pref01), len(pref01))
        if np.std(delta[pick]) > 0 and not np.all(pref01[pick] == pref01[pick][0]):
            draws.append(_fit_lc(pref01[pick], delta[pick], n_splits=0, c_value=c_value)[0])
        else:
            draws.append(float(pref01[pick].mean() * 100))
    if not draws:
        return point, None, None
    low, high = np.percentile(draws, [2.5, 97.5])
    return point, float(np.std(draws, ddof=1)) if len(draws) > 1 else 0.0, (float(low),
                                                                              float(high))


def _fit_lc(pref01: np.ndarray, delta: np.ndarray, *, n_splits: int,
            c_value: float = 100.0) -> tuple[float, float]:
    """alpaca_eval's GLM on these items: (mean predicted preference at zero length
    difference, percent; the regularisation strength C it used)."""
    import pandas as pd
    from alpaca_eval.metrics.glm_winrate import fit_LogisticRegressionCV, make_dmatrix_for_model

    train = pd.DataFrame({"preference": pref01, "std_delta_len": delta / np.std(delta, ddof=1),
                          "not_gamed_baseline": True})
    test = pd.DataFrame({"not_gamed_baseline": [True] * len(pref01),
                         "std_delta_len": [0.0] * len(pref01)})
    design, design_test = make_dmatrix_for_model(train, test, formula=LC_FORMULA)
    with warnings.catch_warnings():  # scikit-learn's deprecation notes about its arguments
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", UserWarning)
        model = fit_LogisticRegressionCV(design, "preference", is_ytrue_proba=True,
                                         n_splits=n_splits, C=c_value)
    predicted = model.predict_proba(design_test)[:, 1]
    chosen = float(np.ravel(getattr(model, "C_", [c_value]))[0])
    return float(predicted.mean() * 100), chosen
