"""The scalar a trial is ranked by: a weighted sum of its metrics (spec ``objective.weights``).

A metric named in the weights but missing (or None / NaN: not measured) is an error, never a
silent 0: a 0 would rank a trial whose judge failed as if it had lost every comparison, and
Optuna would learn from that number. Losses take negative weights (``target_nll: -0.1``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from clo_ray.errors import CloRayError


class ObjectiveError(CloRayError, ValueError):
    """A metric the objective weighs was not computed."""


def objective(metrics: Mapping[str, float | None], weights: Mapping[str, float]) -> float:
    """``sum(weight * metrics[name])`` over ``weights``; metrics not weighed are ignored."""
    if not weights:
        raise ObjectiveError("the objective has no weights: name at least one metric")
    total = 0.0
    for name, weight in weights.items():
        value = metrics.get(name)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            why = "missing" if name not in metrics else f"not measured ({value})"
            have = sorted(k for k, v in metrics.items() if isinstance(v, (int, float)))
            raise ObjectiveError(
                f"objective weight on metric {name!r}, which is {why}; metrics present: "
                f"{have} (judge metrics need judge.enabled and opponent answers)")
        total += float(weight) * float(value)
    return total
