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
from clo_ray.sweep.eval_plan import evaluation_cost

DEFAULT_ENGLISH_TOKENS = 400.0  # English prompt + response tokens of an oasst1-like pair
CHARS_PER_TOKEN = 4.0  # English characters per token, the usual rule of thumb
# Target-language tokens per English token for Llama-style (English-centric) tokenizers.
SCRIPT_EXPANSION = {"Latn": 1.5, "Hans": 1.4, "Kore": 2.5}
OTHER_SCRIPT_EXPANSION = 2.0
GPU_TFLOPS = 400.0  # sustained bf16 TFLOP/s per GPU: ~40% of an H100's 989 dense peak
CPU_TFLOPS_PER_CORE = 0.02  # sustained fp32 training TFLOP/s per CPU core (AVX2)
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

    @property
    def total_trials(self) -> int:
        return sum(c.trials for c in self.cells)

    @property
    def total_hours(self) -> float:
        return sum(c.hours or 0.0 for c in self.cells)


def expansion(language: str) -> float:
    """Target tokens per English token for ``language`` (by its script)."""
    return SCRIPT_EXPANSION.get(LANGUAGES[language].script, OTHER_SCRIPT_EXPANSION)


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


def _stage_tokens(loss: str, sft_data: str | None, english: float, target: float) -> float:
    """Tokens one pair contributes to a stage (all its sequences)."""
    if loss in REFERENCE_LOSSES:
        return 2 * (english + target)
    return {"target": target, "english": english}.get(sft_data or "", english + target)


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
        per_pair = _stage_tokens(stage.loss, stage.sft_data, english, target)
        pairs = stage.epochs * budget if stage.epochs else \
            (stage.steps or 0) * spec.train.batch_pairs  # one of the two is set
        train += pairs * per_pair
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
        GPU_TFLOPS * res.gpus_per_worker if gpu else CPU_TFLOPS_PER_CORE * res.cpus_per_worker)
    devices = res.workers_per_trial * (res.gpus_per_worker if gpu else res.cpus_per_worker)
    throughput = per_worker * res.workers_per_trial * 1e12  # FLOP/s per trial
    params = _parameters(spec)
    # the search's trials, then each cell's best configuration again with repeats - 1 seeds
    trials = spec.search.trials_per_cell + spec.search.repeats - 1
    holdout = spec.evaluation.holdout
    cells, shared_done = [], set()
    for model in spec.models:
        p = params[model_label(model)]
        for lang in spec.languages:
            target = english * expansion(lang)
            for method in spec.methods:
                names = method.schedules or []
                for budget in spec.budgets:
                    costs = [_schedule_cost(spec, s, budget, english, target) for s in names]
                    train, ref_trial, ref_shared = max(costs, key=lambda c: 3 * c[0] + c[1])
                    key = (model_label(model), lang, budget, _first_encoding(spec, names))
                    if ref_shared and key not in shared_done:
                        shared_done.add(key)
                    else:
                        ref_shared = 0.0
                    tokens = trials * (train + ref_trial) + ref_shared
                    flops = None if p is None else \
                        p * (trials * (6 * train + 2 * ref_trial) + 2 * ref_shared)
                    hours = None if flops is None else flops / throughput / 3600 * devices
                    cell = Cell(model_label(model), lang, method.name, budget)
                    cells.append(CellPlan(cell, trials, max(len(spec.stages(s)) for s in names),
                                          budget, holdout, tokens, flops, hours))
    unit = "GPU" if gpu else "CPU"
    sizes = ", ".join(f"{label} {p / 1e9:.3g}B" if p else f"{label} unknown (set params_b)"
                      for label, p in params.items())
    scripts = sorted({(LANGUAGES[c].script, c) for c in spec.languages})
    assumptions = (
        corpus_note,
        f"English tokens per pair: {english:.0f} ({english_note})",
        "target tokens = English tokens x script factor: " + ", ".join(
            f"{code} {expansion(code):g} ({script})" for script, code in scripts),
        "tokens per pair: clo/dpo 4 sequences (both directions x chosen/rejected) = "
        "2 x (English + target); crpo 4 answers to the target prompt, about the same; sft: "
        "target, English or both per sft_data",
        "training FLOPs = 6 x params x tokens over epochs x budget (or steps x "
        f"train.batch_pairs = {spec.train.batch_pairs}) pairs; full backward assumed (an upper "
        "bound for attention-only / LoRA stages); no truncation at train.max_length",
        "reference log-probs = 2 x params x tokens: once per (model, language, budget, "
        "encoding) for a first-stage clo/dpo/crpo (cached, shared), per trial for later stages",
        f"parameters: {sizes}",
        f"throughput: {per_worker:g} TFLOP/s per worker"
        + ("" if res.assumed_tflops_per_worker else
           f" ({GPU_TFLOPS:g} per GPU = ~40% of an H100's dense bf16 peak)" if gpu else
           f" ({CPU_TFLOPS_PER_CORE:g} per CPU core)")
        + f" x {res.workers_per_trial} workers; {unit}-hours = wall hours x {devices:g} "
        f"{unit}s per trial",
        "not included in GPU-hours: translation, evaluation (counted below), search-space "
        "variation (stages as configured; several schedules: the most expensive), retries",
    )
    return Plan(spec.run.name, spec_hash(spec), RunLayout.of(spec).uri,
                tuple(model_label(m) for m in spec.models), tuple(spec.languages),
                tuple(m.name for m in spec.methods), tuple(spec.budgets), trials, unit,
                tuple(cells), assumptions, rows,
                tuple(label for label, p in params.items() if p is None),
                tuple(evaluation_cost(spec)), spec.search.repeats)


# ------------------------------------------------------------------------------ printing


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
             str(c.train_pairs), str(c.holdout_pairs), _count(c.tokens), _hours(c.hours)]
            for c in plan.cells]
    lines += _table(["model", "lang", "method", "budget", "trials", "stages", "train",
                     "holdout", "tokens", unit], rows, 3)
    lines += ["", "by model:", *_summary(plan, "model"), "", "by method:",
              *_summary(plan, "method"), ""]
    if plan.unknown_sizes:
        lines.append(f"unknown model size (not in the totals): {', '.join(plan.unknown_sizes)}"
                     " -> set models[].params_b")
    lines += [
        f"total: {len(plan.cells)} cells, {plan.total_trials} trials, "
        f"{max((c.stages for c in plan.cells), default=0)} stages per trial at most",
        f"total compute: {_hours(plan.total_hours)} {plan.device}-hours "
        f"({_hours(plan.total_hours / 24)} {plan.device}-days)",
        "",
        "evaluation (counts; not in the hours above):",
        *(f"  {line}" for line in plan.evaluation),
    ]
    return "\n".join(lines)
