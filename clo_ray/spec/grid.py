"""The grid a sweep crosses: one :class:`Cell` per (model, language, method, budget).

One type for the plan (its cost per cell), Tune (one Optuna study per cell) and the report
(one table entry per cell, from results.parquet's columns of the same names).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    from clo_ray.spec.schema import SweepSpec


class Cell(NamedTuple):
    """One grid cell: an independent search over the same data set.

    A tuple, so a cell is a dict key, sorts, and unpacks like results.parquet's columns.
    """

    model: str  # the model's label (spec.models[i].label): tables, run names, results rows
    language: str  # target language; several joined with "+" (multi-target)
    method: str
    budget: int  # training pairs per language

    @property
    def key(self) -> str:
        return f"{self.model}/{self.language}/{self.method}/{self.budget}"


def model_label(model: Any) -> str:
    """A ``spec.models`` entry's label (its reference when it has none)."""
    return str(getattr(model, "label", None) or model.name)


def grid_cells(spec: SweepSpec) -> list[Cell]:
    """Every cell of the spec's grid, in a stable order (models, languages, methods, budgets)."""
    return [Cell(model_label(m), lang, method.name, budget)
            for m in spec.models for lang in spec.languages for method in spec.methods
            for budget in spec.budgets]


def model_reference(spec: SweepSpec, cell: Cell) -> str:
    """The model reference (hub id, local dir, built-in) of ``cell``'s model label."""
    for model in spec.models:
        if model_label(model) == cell.model:
            return model.name
    raise KeyError(f"no model labelled {cell.model!r} in the spec "
                   f"({[model_label(m) for m in spec.models]})")


def cell_of(config: Mapping[str, Any]) -> Cell:
    """The cell a Tune trial's config belongs to (the searcher puts it there as a dict)."""
    return Cell(**config["cell"])
