"""The search section of a sweep spec: the Optuna space run inside each grid cell.

:data:`SEARCH_FIELDS` lists what may be searched and :func:`search_key` parses a space key
(``lr``, ``dpo.beta``, ...); :class:`Distribution` is one Optuna distribution and
:class:`SchedulerSection` the optional early stopping (Ray Tune ASHA).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from clo_ray.spec.evaluation import TRAINING_METRICS
from clo_ray.spec.sections import Problems, Section, is_set, module_sets, problem
from clo_ray.spec.training import LOSS_FIELDS, LOSSES

# ------------------------------------------------------------------------------ search


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _integer(v: Any) -> bool:
    return _number(v) and float(v).is_integer()


def _modules_choice(v: Any) -> bool:
    names = [v] if isinstance(v, str) else v
    return isinstance(names, list) and bool(names) and all(n in module_sets() for n in names)


# FIELD -> (distribution types, what a value must be, check). A FIELD key applies to every stage
# the field applies to (lambda: clo; beta: clo and dpo; the rest: all); LOSS.FIELD (dpo.beta)
# only to stages of that loss; "schedule" picks among a method's schedules.
SEARCH_FIELDS: dict[str, tuple[tuple[str, ...], str, Any]] = {
    "lr": (("float", "categorical"), "a number > 0", lambda v: _number(v) and v > 0),
    "beta": (("float", "categorical"), "a number > 0", lambda v: _number(v) and v > 0),
    "lambda": (("float", "categorical"), "a number in [0, 1]",
               lambda v: _number(v) and 0 <= v <= 1),
    "alpha": (("float", "categorical"), "a number in [0, 1]",
              lambda v: _number(v) and 0 <= v <= 1),
    "epochs": (("float", "int", "categorical"), "a number > 0", lambda v: _number(v) and v > 0),
    "steps": (("int", "categorical"), "an integer >= 1", lambda v: _integer(v) and v >= 1),
    "warmup_ratio": (("float", "categorical"), "a number in [0, 1)",
                     lambda v: _number(v) and 0 <= v < 1),
    "modules": (("categorical",), "a module set or a list of them", _modules_choice),
    "lora_r": (("int", "categorical"), "an integer >= 1", lambda v: _integer(v) and v >= 1),
    "schedule": (("categorical",), "a schedule name", lambda v: isinstance(v, str)),
}
SEARCH_KEYS = (*SEARCH_FIELDS, "LOSS.FIELD (e.g. dpo.beta)")


def search_key(key: str) -> tuple[str, tuple[str, ...]] | None:
    """``(field, losses it applies to)`` for a search-space key, None when malformed."""
    loss, _, field = key.rpartition(".")
    if field not in SEARCH_FIELDS or (loss and (loss not in LOSSES or field == "schedule")):
        return None
    applies = LOSS_FIELDS.get(field, (LOSSES, None))[0]
    if loss and loss not in applies:
        return None
    return field, (loss,) if loss else applies


class Distribution(Section):
    """An Optuna distribution: float / int (low, high, log, step) or categorical (choices)."""

    type: Literal["float", "int", "categorical"]
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = Field(None, gt=0)
    choices: list[Any] | None = None

    @model_validator(mode="after")
    def _shape(self) -> Distribution:
        found = Problems()
        for name in ("low", "high", "log", "step") if self.type == "categorical" else ["choices"]:
            if is_set(self, name):
                found.add(name, f"does not apply to a {self.type} distribution",
                          value=getattr(self, name))
        if self.type == "categorical":
            if not self.choices:
                found.add("choices", "needs at least one choice", value=self.choices)
        elif self.low is None or self.high is None:
            found.add("low" if self.low is None else "high", "required", value=None)
        else:
            if self.low >= self.high:
                found.add("low", f"must be below high ({self.high:g})", value=self.low)
            if self.log and self.low <= 0:
                found.add("low", "a log distribution needs low > 0", value=self.low)
            if self.type == "int":
                for name in ("low", "high", "step"):
                    value = getattr(self, name)
                    if value is not None and not value.is_integer():
                        found.add(name, "an int distribution needs integers", value=value)
        found.raise_if_any()
        return self


class SchedulerSection(Section):
    """Early stopping across a cell's trials (Ray Tune ASHA); ``none`` runs every trial out."""

    type: Literal["none", "asha"] = "none"
    grace_period: int = Field(1, gt=0)  # in reports (train.report_every steps each)
    reduction_factor: float = Field(3.0, gt=1)
    metric: str = "target_nll"  # one of TRAINING_METRICS: reported during training
    mode: Literal["max", "min"] = "min"


class SearchSection(Section):
    """The Optuna search run inside each grid cell (model x language x method x budget)."""

    trials_per_cell: int = Field(1, ge=1)
    sampler: Literal["tpe", "random"] = "tpe"
    metric: str = "objective"  # "objective" = evaluation.objective's weighted sum
    mode: Literal["max", "min"] = "max"
    space: dict[str, Distribution] = {}
    scheduler: SchedulerSection = SchedulerSection()
    # Optimise each evaluation.objective metric separately (Pareto front) instead of the sum
    multi_objective: bool = False
    optuna_storage: str | None = None  # e.g. sqlite:///optuna.db; default: in memory
    max_concurrent_trials: int | None = Field(None, gt=0)
    # Seeds per cell's chosen configuration: after the search, each cell's best trial is
    # trained again with repeats - 1 other seeds (data order and budget subsample; the
    # held-out set stays), so every reported number has a mean and a 95% interval.
    repeats: int = Field(1, ge=1)

    @field_validator("optuna_storage")
    @classmethod
    def _storage(cls, value: str | None) -> str | None:
        if value is not None and "://" not in value:
            raise problem("not a database URL", allowed=["sqlite:///path.db", "postgresql://..."])
        return value

    @model_validator(mode="after")
    def _space(self) -> SearchSection:
        found = Problems()
        for key, dist in self.space.items():
            parsed = search_key(key)
            if parsed is None:
                found.add(("space", key), "unknown search parameter", allowed=SEARCH_KEYS,
                          value=key)
                continue
            kinds, what, check = SEARCH_FIELDS[parsed[0]]
            if dist.type not in kinds:
                found.add(("space", key, "type"), f"{key} cannot be searched this way",
                          allowed=kinds, value=dist.type)
                continue
            choices = dist.choices or []
            named: list[tuple[str, int | None]] = (
                [("choices", i) for i in range(len(choices))] if dist.type == "categorical"
                else [("low", None), ("high", None)])
            for attr, index in named:
                value = choices[index] if index is not None else getattr(dist, attr)
                if isinstance(value, str) and what.startswith("a number"):
                    try:  # YAML 1.1 reads 1e-5 (no dot) as a string
                        value = float(value)
                        if index is not None:
                            choices[index] = value
                    except ValueError:
                        pass
                if not check(value):
                    where = (attr,) if index is None else (attr, index)
                    found.add(("space", key, *where), f"must be {what}", value=value)
        if self.scheduler.metric not in TRAINING_METRICS:
            found.add(("scheduler", "metric"), "not reported during training",
                      allowed=TRAINING_METRICS, value=self.scheduler.metric)
        found.raise_if_any()
        return self
