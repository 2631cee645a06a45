"""What a sweep's evaluation will cost, for ``--plan``: generations, judge calls, benchmarks.

Counted, not timed: how long a generation or a judge call takes depends on the model, the
hardware and the endpoint, which the plan cannot know. Prompt sets are counted from their
files where the plan can read them (``max_prompts`` caps them), else from ``max_prompts``,
else, for an ``alpaca_eval`` set, as AlpacaEval's 805 instructions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from clo_ray.spec.grid import grid_cells

if TYPE_CHECKING:
    from clo_ray.spec.schema import SweepSpec

ALPACA_EVAL_SIZE = 805  # AlpacaEval's instructions: what an unreadable alpaca_eval set holds


def _set_sizes(spec: SweepSpec
               ) -> tuple[dict[str, int | None], dict[str, tuple[str, ...]], list[str]]:
    """Instructions per prompt set (None: unknown here), the languages each file holds, and
    the sets counted as AlpacaEval's size because their file is not readable here."""
    from clo_ray.eval.prompt_sets import PromptSetError, load_prompt_set

    sizes: dict[str, int | None] = {}
    languages: dict[str, tuple[str, ...]] = {}
    assumed_sets: list[str] = []
    for section in spec.evaluation.prompt_sets:
        try:
            found = load_prompt_set(section, spec.run.storage_options or None)
            sizes[section.name], languages[section.name] = found.table.num_rows, found.languages
        except PromptSetError:
            assumed = ALPACA_EVAL_SIZE if section.format == "alpaca_eval" else None
            sizes[section.name], languages[section.name] = section.max_prompts or assumed, ()
            if assumed and not section.max_prompts:
                assumed_sets.append(section.name)
    return sizes, languages, assumed_sets


@dataclass(frozen=True)
class EvalCounts:
    """The amounts the cost model (clo_ray.sweep.cost_model) turns into device time."""

    generations: int  # answers per evaluated model (held-out + prompt sets)
    judge_calls: int  # both answer orders
    translated: int  # prompt-set instructions the translator translates (once)


def evaluation_cost(spec: SweepSpec) -> tuple[list[str], EvalCounts]:
    """Lines for the plan (per evaluated model and in all; module docstring), and the
    counts behind them."""
    evaluation, judge = spec.evaluation, spec.evaluation.judge
    cells = grid_cells(spec)
    per_cell = spec.search.trials_per_cell + spec.search.repeats - 1
    trials = len(cells) * per_cell
    bases = len(spec.models) * len(spec.languages)
    sizes, held, assumed = _set_sizes(spec)
    unknown = [name for name, n in sizes.items() if n is None]
    prompts = {name: n or 0 for name, n in sizes.items()}
    heldout = 2 * evaluation.max_prompts
    sides = {"heldout": 2, **{s.name: 2 if s.english else 1 for s in evaluation.prompt_sets}}
    sets = sum(n * sides[name] for name, n in prompts.items())
    lines = [f"generations: {heldout + sets:,} per evaluated model ({heldout} held-out "
             f"prompts, {sets:,} prompt-set prompts; target language, + English where a set "
             f"asks) x {trials + bases:,} models ({trials:,} trials + {bases} base models) = "
             f"{(heldout + sets) * (trials + bases):,}"]
    to_translate = {name: [c for c in spec.languages if c not in held[name]]
                    for name in sizes}
    calls = 0
    for name, missing in to_translate.items():
        if missing and prompts[name]:
            lines.append(f"prompt set {name}: {prompts[name]:,} instructions translated into "
                         f"{', '.join(missing)} by the translator (once, cached)")
    if judge.enabled:
        sft = [c for c in cells if c.method == "sft"]
        largest = max(spec.budgets)
        comparisons = 0
        for opponent in judge.opponents:
            if opponent == "sft":
                comparisons += per_cell * sum(c.method != "sft" for c in cells)
            elif opponent == "sft_largest":
                comparisons += trials - per_cell * sum(c.budget == largest for c in sft)
            else:
                comparisons += trials
        judged = {"heldout": evaluation.max_prompts, **prompts}
        items = sum(judged.get(name, 0) * sides[name] for name in evaluation.judged_sets())
        calls = comparisons * items * 2  # both answer orders
        where = "the endpoint" if judge.backend == "endpoint" else f"{judge.model}"
        lines.append(f"judge calls: {calls:,} = {comparisons:,} comparisons "
                     f"({', '.join(judge.opponents)}) x {items:,} items (prompt sets "
                     f"{', '.join(evaluation.judged_sets())}; target language, + English where a "
                     f"set asks) x 2 answer orders, on {where}")
    tasks = 2 * len(evaluation.benchmarks) + len(evaluation.lm_eval.tasks)
    if tasks:
        names = ", ".join([*evaluation.benchmarks, *evaluation.lm_eval.tasks])
        lines.append(f"benchmark tasks: {tasks} lm-eval tasks per trial ({names}; target "
                     f"language + English) = {tasks * trials:,} task runs")
    if unknown:
        lines.append(f"prompt sets not readable here, counted as 0: {', '.join(unknown)} "
                     "(fetch them first, or set max_prompts)")
    if assumed:
        lines.append(f"prompt sets not readable here, counted as AlpacaEval's {ALPACA_EVAL_SIZE}"
                     f" instructions: {', '.join(assumed)}")
    counts = EvalCounts(heldout + sets, calls,
                        sum(prompts[name] * len(missing) for name, missing in to_translate.items()))
    return lines, counts
