"""The plan of a sweep: its grid cells, trials, data and an estimated compute cost.

``build_plan(spec)`` is pure bookkeeping over the validated spec (plus a cheap read of a local
corpus, for its size and text lengths); ``format_plan(plan)`` prints it. Nothing here imports
torch or ray: ``python -m clo_ray.sweep SPEC --plan`` answers in about a second.

The cost model is deliberately simple and prints every assumption it makes:

- English tokens per pair = characters / 4 over the corpus when it can be read here, else
  ``DEFAULT_ENGLISH_TOKENS`` (oasst1's top-ranked single-turn pairs run to a few hundred).
- Target tokens = English tokens x a factor per script (``SCRIPT_EXPANSION``): English-centric
  tokenizers split other languages into more pieces, most for non-Latin scripts.
- Sequences per pair: clo and dpo use both directions x chosen/rejected = 4 sequences,
  (x_en,y_en) (x_en,y_l) (x_l,y_l) (x_l,y_en), i.e. 2 x (English + target) tokens; sft reads the
  target pair (``sft_data: target``), the English pair, or both.
- Training FLOPs = 6 x params x tokens (forward + full backward), over epochs x budget pairs or
  steps x ``train.batch_pairs`` pairs. Reference log-probs = 2 x params x tokens, once per
  (model, language, budget) for a first-stage clo/dpo (cached, shared by the cell's trials and
  methods), per trial for a later stage (its reference is the model at that stage's start).
- Throughput = ``resources.assumed_tflops_per_worker`` (default 400 TFLOP/s per GPU, about 40%
  of an H100's dense bf16 peak; on CPU 0.02 TFLOP/s per core). Device-hours = wall hours x the
  trial's GPUs (or CPU cores when ``gpus_per_worker`` is 0).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from clo_ray.languages import LANGUAGES
from clo_ray.layout import RunLayout
from clo_ray.spec.grid import Cell, model_label
from clo_ray.spec.schema import SweepSpec, check_corpus_kind, check_corpus_size, spec_hash
from clo_ray.spec.training import REFERENCE_LOSSES, stage_encoding
from clo_ray.sweep.cost_model import (
    CPU_TFLOPS_PER_CORE,
    GPU_TFLOPS,
    TEMPLATE_TOKENS,
    TrialTime,
    evaluation_time,
    expansion,
    judge_hours,
    rates,
    rates_note,
    stage_pairs,
    stage_tokens,
    translation_hours,
    trial_time,
)
from clo_ray.sweep.eval_plan import evaluation_cost

DEFAULT_ENGLISH_TOKENS = 400.0  # English prompt + response tokens of an oasst1-like pair
CHARS_PER_TOKEN = 4.0  # English characters per token, the usual rule of thumb
MAX_CORPUS_BYTES = 256 << 20  # larger local corpora are not read by the plan


@dataclass(frozen=True)
class CellPlan:
    """What one grid cell will cost: ``trials`` trials of an independent search."""

    cell: Cell
    trials: int
    stages: int  # stages per trial (the longest schedule of the method)
    train_pairs: int
    holdout_pairs: int
    tokens: float  # every trial's training tokens + the reference passes charged to the cell
    flops: float | None  # None: the model's size is unknown
    hours: float | None  # device-hours (GPU-h, or CPU-h on CPU)
    trial_s: float | None = None  # wall seconds of one trial, all its phases

    @property
    def model(self) -> str:
        return self.cell.model

    @property
    def language(self) -> str:
        return self.cell.language

    @property
    def method(self) -> str:
        return self.cell.method

    @property
    def budget(self) -> int:
        return self.cell.budget


@dataclass(frozen=True)
class Plan:
    name: str
    spec_hash: str
    run_uri: str
    models: tuple[str, ...]
    languages: tuple[str, ...]
    methods: tuple[str, ...]
    budgets: tuple[int, ...]
    trials_per_cell: int  # search trials + repeats - 1
    device: str  # "GPU" or "CPU"
    cells: tuple[CellPlan, ...]
    assumptions: tuple[str, ...]
    corpus_rows: int | None  # None: not readable here (the size check was skipped)
    unknown_sizes: tuple[str, ...] = field(default=())  # model labels without a size
    evaluation: tuple[str, ...] = field(default=())  # the evaluation's cost (eval_plan)
    repeats: int = 1  # search.repeats
    phases: tuple[tuple[str, float], ...] = field(default=())  # device-hours by phase

    @property
    def total_hours(self) -> float:
        """Device-hours of everything: every phase of every trial, base models, translation
        and a local judge (an endpoint judge's calls are not ours)."""
        return sum(hours for _, hours in self.phases)

    @property
    def total_trials(self) -> int:
        return sum(c.trials for c in self.cells)

    @property
    def trial_wall_hours(self) -> float:
        """Wall hours of all trials run one after another (a trial's node is held while its
        evaluation runs on one device, so this is also node-hours at one trial per node)."""
        return sum(c.trials * (c.trial_s or 0.0) for c in self.cells) / 3600


def read_corpus_stats(spec: SweepSpec) -> tuple[int | None, float | None, str]:
    """``(rows, English tokens per pair, note)`` from the corpus when it is cheap to read here.

    Remote, missing or very large corpora are not read (rows None, the note says why). A
    malformed corpus raises its CorpusError: the sweep would fail on it too.
    """
    path = spec.corpus.path
    if "://" in path:
        return None, None, f"corpus {path} is remote: not read by the plan"
    if not path.startswith("builtin:"):
        local = Path(path).expanduser()
        if not local.exists():
            return None, None, f"corpus {path} not found here ({os.getcwd()}): download it " \
                               "before running the sweep"
        size = sum(p.stat().st_size for p in local.rglob("*")) if local.is_dir() \
            else local.stat().st_size
        if size > MAX_CORPUS_BYTES:
            return None, None, f"corpus {path} is {size >> 20} MiB: too large for the plan"
    try:
        from clo_ray.data.corpus import load_corpus
    except ImportError as err:
        return None, None, f"corpus loader unavailable here ({err})"
    import pyarrow.compute as pc

    corpus = load_corpus(path, spec.corpus.format, source_language=spec.corpus.source_language,
                         max_rows=spec.corpus.max_rows,
                         storage_options=dict(spec.run.storage_options) or None)
    check_corpus_kind(spec, corpus.preferences, path)
    table, rows = corpus.table, corpus.table.num_rows
    chars = sum(pc.sum(pc.utf8_length(table[c])).as_py() or 0 for c in ("prompt", "response"))
    tokens = chars / CHARS_PER_TOKEN / rows if rows else None
    kind = "preferences" if corpus.preferences else "pairs"
    return rows, tokens, f"corpus {path}: {rows} usable {kind} (format {corpus.format})"


def _parameters(spec: SweepSpec) -> dict[str, float | None]:
    from clo_ray.models.resolve import parameter_count

    return {model_label(m): m.params_b * 1e9 if m.params_b else parameter_count(m.name)
            for m in spec.models}


def _first_encoding(spec: SweepSpec, schedules: list[str]) -> str:
    """What a schedule's first stage encodes: methods share the base model's reference pass
    only when it matches."""
    stage = spec.stages(schedules[0])[0]
    return stage_encoding(stage.loss, stage.sft_data, stage.dpo_pairs)


def _schedule_cost(spec: SweepSpec, schedule: str, budget: int, english: float,
                   target: float) -> tuple[float, float, float]:
    """``(training tokens, reference tokens per trial, shared reference tokens)`` of a trial."""
    train = ref_trial = ref_shared = 0.0
    for i, stage in enumerate(spec.stages(schedule)):
        per_pair = stage_tokens(stage.loss, stage.sft_data, english, target)
        train += stage_pairs(spec, stage, budget) * per_pair
        if stage.loss in REFERENCE_LOSSES:
            if i == 0:
                ref_shared = budget * per_pair
            else:
                ref_trial += budget * per_pair
    return train, ref_trial, ref_shared


def build_plan(spec: SweepSpec, *, read_corpus: bool = True) -> Plan:
    """The sweep's cells and estimated cost; raises SpecError if a budget exceeds the corpus."""
    rows, english, corpus_note = read_corpus_stats(spec) if read_corpus else \
        (None, None, "corpus not read (read_corpus=False)")
    if rows is not None:
        check_corpus_size(spec, rows, spec.corpus.path)
    else:
        corpus_note += "; corpus-size check skipped"
    english_note = "from the corpus, characters / 4" if english else \
        "default for oasst1-like data; the corpus was not read"
    english = english or DEFAULT_ENGLISH_TOKENS
    res = spec.resources
    gpu = res.gpus_per_worker > 0
    per_worker = res.assumed_tflops_per_worker or (
        GPU_TFLOPS * res.gpus_per_worker if gpu else
        CPU_TFLOPS_PER_CORE * max(1.0, res.cpus_per_worker))  # torch threads: >= 1
    rate = rates(spec, per_worker * 1e12)
    params = _parameters(spec)
    eval_lines, counts = evaluation_cost(spec)
    # the search's trials, then each cell's best configuration again with repeats - 1 seeds
    trials = spec.search.trials_per_cell + spec.search.repeats - 1
    holdout = spec.evaluation.holdout
    cells: list[CellPlan] = []
    shared_done: set[tuple[str, str, int, str]] = set()
    unpriced: set[str] = set()
    phases = dict.fromkeys([*TrialTime.__dataclass_fields__, "shared reference",
                            "base models", "translation", "judge"], 0.0)
    for model in spec.models:
        p = params[model_label(model)]
        for lang in spec.languages:
            target = english * expansion(lang)
            evaluated = None if p is None else evaluation_time(spec, counts, p, rate,
                                                                 english, target, unpriced)
            base_s = 0.0  # the base model: once per (model, language), cached; the first
            if evaluated is not None:  # trial of the pair evaluates it
                base_s = evaluated.generate + evaluated.heldout + evaluated.benchmarks + \
                    evaluated.load
                phases["base models"] += base_s / 3600 * rate.eval_devices
            for method in spec.methods:
                names = method.schedules or []
                for budget in spec.budgets:
                    costs = [_schedule_cost(spec, s, budget, english, target) for s in names]
                    worst = max(range(len(names)), key=lambda i: 3 * costs[i][0] + costs[i][1])
                    train, ref_trial, ref_shared = costs[worst]
                    key = (model_label(model), lang, budget, _first_encoding(spec, names))
                    if ref_shared and key not in shared_done:
                        shared_done.add(key)
                    else:
                        ref_shared = 0.0
                    tokens = trials * (train + ref_trial) + ref_shared
                    flops = None if p is None else \
                        p * (trials * (6 * train + 2 * ref_trial) + 2 * ref_shared)
                    hours = seconds = None
                    if p is not None and evaluated is not None:
                        trial = trial_time(spec, names[worst], budget, p, rate, english,
                                            target, evaluated)
                        by_phase = trial.device_hours(rate)
                        shared_s = ref_shared * 2 * p / rate.train_flops
                        shared = shared_s / 3600 * rate.train_devices
                        for name, value in by_phase.items():
                            phases[name] += trials * value
                        phases["shared reference"] += shared
                        hours = trials * sum(by_phase.values()) + shared
                        # the cell's first trial also computes what later trials reuse
                        seconds = trial.seconds + shared_s + base_s
                        base_s = 0.0
                    cell = Cell(model_label(model), lang, method.name, budget)
                    cells.append(CellPlan(cell, trials, max(len(spec.stages(s)) for s in names),
                                          budget, holdout, tokens, flops, hours, seconds))
    phases["translation"] = translation_hours(spec, counts, rows, english, rate)
    phases["judge"] = judge_hours(spec, counts, rate)
    unit = "GPU" if gpu else "CPU"
    sizes = ", ".join(f"{label} {p / 1e9:.3g}B" if p else f"{label} unknown (set params_b)"
                      for label, p in params.items())
    scripts = sorted({(LANGUAGES[c].script, c) for c in spec.languages})
    assumptions: tuple[str, ...] = (
        corpus_note,
        f"English tokens per pair: {english:.0f} ({english_note})",
        "target tokens = English tokens x script factor: " + ", ".join(
            f"{code} {expansion(code):g} ({script})" for script, code in scripts),
        "tokens per pair: clo/dpo 4 sequences (both directions x chosen/rejected) = "
        "2 x (English + target); crpo 4 answers to the target prompt, about the same; sft: "
        f"target, English or both per sft_data; + {TEMPLATE_TOKENS} template tokens per "
        "sequence; no truncation at train.max_length",
        "training FLOPs per token = params x (2 forward + 2 activation gradients + 2 x the "
        "trained share for weight gradients (attention 0.33, mlp 0.62, all 1, LoRA 0.01) "
        "+ 2 recomputed forward with gradient checkpointing), over epochs x budget (or steps "
        f"x train.batch_pairs = {spec.train.batch_pairs}) pairs",
        "reference log-probs = 2 x params x tokens: once per (model, language, budget, "
        "encoding) for a first-stage clo/dpo/crpo (cached, shared), per trial for later stages",
        f"parameters: {sizes}",
        rates_note(spec, rate, per_worker),
        "per trial also: start-up (trial, Train worker group, DeepSpeed, evaluation task), "
        "base weights loaded, trained tensors checkpointed (bf16; + fp32 Adam state for "
        "mid-stage checkpoints), a full-model export (fp32) written and read back, the "
        "evaluation's generations (memory bound: one weight read per decoding step of a "
        "batch), held-out log-probs and lm-eval requests (forward passes); base models "
        "evaluated once per (model, language)",
        "not included: search-space variation (stages as configured; several schedules: the "
        "most expensive), retries and preemptions, node start-up and idle time, an endpoint "
        "judge's calls (counted below)",
    )
    if unpriced:
        assumptions += (f"benchmarks without a size here (not in the hours): "
                        f"{', '.join(sorted(unpriced))}",)
    return Plan(spec.run.name, spec_hash(spec), RunLayout.of(spec).uri,
                tuple(model_label(m) for m in spec.models), tuple(spec.languages),
                tuple(m.name for m in spec.methods), tuple(spec.budgets), trials, unit,
                tuple(cells), assumptions, rows,
                tuple(label for label, p in params.items() if p is None),
                tuple(eval_lines), spec.search.repeats, tuple(phases.items()))


# ------------------------------------------------------------------------------ printing

PHASE_LABELS = {"start": "trial start-up", "load": "model loads", "train": "training",
                "reference": "reference (later stages)", "checkpoint": "checkpoints",
                "export": "export", "generate": "generation", "heldout": "held-out log-probs",
                "benchmarks": "benchmarks (lm-eval)", "shared reference": "reference (shared)"}


def _count(value: float) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= size:
            return f"{value / size:.3g}{unit}"
    return f"{value:.0f}"


def _hours(value: float | None) -> str:
    if value is None:
        return "?"
    return f"{value:,.1f}" if value >= 10 else f"{value:.3g}"


def _table(header: list[str], rows: list[list[str]], text_columns: int) -> list[str]:
    """Aligned columns: the first ``text_columns`` left, the (numeric) rest right."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    fmt = lambda r: "  ".join(c.ljust(w) if i < text_columns else c.rjust(w)  # noqa: E731
                              for i, (c, w) in enumerate(zip(r, widths, strict=True)))
    return [fmt(header), fmt(["-" * w for w in widths]), *(fmt(r) for r in rows)]


def _summary(plan: Plan, key: str) -> list[str]:
    groups: dict[str, list[CellPlan]] = {}
    for cell in plan.cells:
        groups.setdefault(getattr(cell, key), []).append(cell)
    rows = [[name, str(len(cs)), str(sum(c.trials for c in cs)),
             _hours(sum(c.hours or 0 for c in cs)) + ("+?" if any(c.hours is None for c in cs)
                                                       else "")]
            for name, cs in groups.items()]
    return _table([key, "cells", "trials", f"{plan.device}-h"], rows, 1)


def format_plan(plan: Plan) -> str:
    """The plan as text: assumptions, every cell, per-model and per-method sums, totals."""
    unit = f"{plan.device}-h"
    grid = " x ".join(f"{len(v)} {n}" for n, v in (
        ("models", plan.models), ("languages", plan.languages), ("methods", plan.methods),
        ("budgets", plan.budgets)))
    lines = [
        f"Plan for sweep {plan.name!r} (spec hash {plan.spec_hash}); nothing is started",
        f"results: {plan.run_uri}",
        f"grid: {grid} = {len(plan.cells)} cells; {plan.trials_per_cell} trials per cell"
        + (f" ({plan.repeats - 1} of them repeats of the cell's best configuration)"
           if plan.repeats > 1 else ""),
        "assumptions (estimates, not measurements):",
        *(f"  - {a}" for a in plan.assumptions),
        "",
        "cells:",
    ]
    rows = [[c.model, c.language, c.method, str(c.budget), str(c.trials), str(c.stages),
             str(c.train_pairs), str(c.holdout_pairs), _count(c.tokens),
             "?" if c.trial_s is None else f"{c.trial_s / 60:.1f}", _hours(c.hours)]
            for c in plan.cells]
    lines += _table(["model", "lang", "method", "budget", "trials", "stages", "train",
                     "holdout", "tokens", "min/trial", unit], rows, 3)
    lines += ["", "by model:", *_summary(plan, "model"), "", "by method:",
              *_summary(plan, "method"), ""]
    if plan.unknown_sizes:
        lines.append(f"unknown model size (not in the totals): {', '.join(plan.unknown_sizes)}"
                     " -> set models[].params_b")
    lines += [
        f"total: {len(plan.cells)} cells, {plan.total_trials} trials, "
        f"{max((c.stages for c in plan.cells), default=0)} stages per trial at most",
        "",
        f"{plan.device}-hours by phase:",
        *_table(["phase", unit, "share"], [
            [PHASE_LABELS.get(name, name), _hours(hours),
             f"{100 * hours / plan.total_hours:.0f}%" if plan.total_hours else "-"]
            for name, hours in plan.phases if hours], 1),
        f"total compute: {_hours(plan.total_hours)} {plan.device}-hours "
        f"({_hours(plan.total_hours / 24)} {plan.device}-days), of which training "
        f"{_hours(dict(plan.phases).get('train', 0.0))}",
        f"trial wall time: {_hours(plan.trial_wall_hours)} hours one after another (longest "
        f"trial {max((c.trial_s or 0.0 for c in plan.cells), default=0.0) / 60:.0f} min); "
        f"N trials at once: about {_hours(plan.trial_wall_hours)} / N hours",
        "",
        "evaluation (counts; priced in the phases above, except an endpoint judge's calls):",
        *(f"  {line}" for line in plan.evaluation),
    ]
    return "\n".join(lines)
