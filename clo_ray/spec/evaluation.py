"""The evaluation sections of a sweep spec: metrics, evaluation (judge, lm_eval, objective), report.

:data:`METRICS` is what the evaluate stage reports per trial; :data:`TRAINING_METRICS` the ones
also reported during training (for early stopping, see :mod:`clo_ray.spec.search_space`).
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from clo_ray.benchmarks import BENCHMARKS
from clo_ray.spec.sections import Problems, Section, check_slug, model_ref_kind, problem

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

# ------------------------------------------------------------------------------ metrics

# What the evaluate stage reports per trial (objective weights, report columns, search metric).
METRICS: dict[str, str] = {
    "target_fidelity": "share of held-out target prompts answered in the target language",
    "english_retention": "share of held-out English prompts still answered in English",
    "target_nll": "held-out target-language response NLL per token (lower is better)",
    "english_nll": "held-out English response NLL per token (lower is better)",
    "preference_accuracy": "share of held-out CLO pairs whose implicit reward prefers the "
                           "prompt's language in both directions",
    "reward_margin": "mean held-out implicit reward margin, chosen - rejected",
    "judge_win_rate": "LLM-judge win rate on target prompts (the paper's headline metric)",
    "english_judge_win_rate": "LLM-judge win rate on English prompts (English retention)",
}
JUDGE_METRICS = ("judge_win_rate", "english_judge_win_rate")
# Reported every train.report_every steps, so an early-stopping scheduler can use them.
TRAINING_METRICS = ("train_loss", "target_nll", "english_nll", "preference_accuracy",
                    "reward_margin")


# ------------------------------------------------------------------------------ evaluation


class JudgeEndpoint(Section):
    """An OpenAI-compatible chat endpoint serving the judge (``vllm serve``, a hosted API).

    ``base_url`` / ``model`` are given directly or through the NAME of an environment
    variable (``base_url_env``, ``model_env``), so one spec serves every cluster. The key
    is only ever named (``api_key_env``): it never enters the spec, logs or storage.
    """

    base_url: str | None = None
    base_url_env: str | None = None
    model: str | None = None
    model_env: str | None = None
    api_key_env: str | None = None  # None: no key (a local vllm serve)
    max_concurrency: int = Field(8, gt=0)
    max_retries: int = Field(4, ge=0)
    timeout_s: float = Field(120.0, gt=0)

    @model_validator(mode="after")
    def _one_of_each(self) -> JudgeEndpoint:
        found = Problems()
        for field in ("base_url", "model"):
            given = [f for f in (field, f"{field}_env") if getattr(self, f) is not None]
            if len(given) != 1:
                found.add((field,), f"set exactly one of {field} and {field}_env",
                          value=[getattr(self, f) for f in given] or None)
        for field in ("base_url_env", "model_env", "api_key_env"):
            name = getattr(self, field)
            if name is not None and not _ENV_NAME.match(name):
                found.add((field,), "the NAME of an environment variable, not its value",
                          allowed=["[A-Za-z_][A-Za-z0-9_]*"], value=name)
        found.raise_if_any()
        return self


OPPONENTS = ("sft", "sft_largest", "base")


class JudgeSection(Section):
    """LLM-as-judge pairwise win rate, as the paper's AlpacaEval-style evaluation (opt-in).

    Judged after the tune stage (:mod:`clo_ray.eval.judge_stage`), once for all trials: an
    opponent may finish after the trial it is compared with, and one judge serves every
    pair. So Optuna never sees judge metrics while it searches, and an objective that
    weights them is completed in results.parquet by that stage.

    ``opponents``: ``sft`` (the best SFT trial of the same model, language and budget: the
    paper's table), ``sft_largest`` (SFT at the largest budget: the paper's data-size
    curves), ``base`` (the untrained model). The first is the headline (results.parquet's
    ``judge_win_rate``); every comparison is in judgements.parquet. ``prompt_sets``: which
    prompt sets are judged (names from ``evaluation.prompt_sets``, ``heldout`` for the
    held-out pairs; default: every prompt set, else the held-out pairs).
    """

    enabled: bool = False
    model: str | None = None  # a local judge model (backend auto / vllm / transformers)
    backend: Literal["auto", "vllm", "transformers", "endpoint"] = "auto"
    endpoint: JudgeEndpoint | None = None  # backend "endpoint"
    opponents: list[Literal["sft", "sft_largest", "base"]] = ["sft"]
    prompt_sets: list[str] | None = None
    max_new_tokens: int = Field(512, gt=0)
    bootstrap: int = Field(200, ge=0)  # resamples for the length-controlled rate's interval

    @model_validator(mode="before")
    @classmethod
    def _old_opponent(cls, data: Any) -> Any:
        """``opponent: sft`` (one opponent, the spelling before ``opponents``) still reads."""
        if isinstance(data, dict) and "opponent" in data:
            data = dict(data)
            if "opponents" in data:
                raise problem("give opponents only (opponent is its old one-value spelling)",
                              where="opponent", value=data["opponent"])
            data["opponents"] = [data.pop("opponent")]
        return data

    @field_validator("model")
    @classmethod
    def _model(cls, value: str | None) -> str | None:
        if value is not None:
            model_ref_kind(value)
        return value

    @field_validator("opponents")
    @classmethod
    def _opponents(cls, value: list[str]) -> list[str]:
        if not value or len(set(value)) != len(value):
            raise problem("one or more opponents, each once", allowed=list(OPPONENTS))
        return value

    @model_validator(mode="after")
    def _needs_model(self) -> JudgeSection:
        if not self.enabled:
            return self
        if self.backend == "endpoint" and self.endpoint is None:
            raise problem("required with backend endpoint", where="endpoint", value=None)
        if self.backend != "endpoint" and self.model is None:
            raise problem("required when the judge is enabled (or use backend: endpoint)",
                          where="model", value=None)
        return self


class LmEvalSection(Section):
    """lm-evaluation-harness tasks (e.g. Global-MMLU, BELEBELE, MMMLU) on each trial's exported
    model; off while ``tasks`` is empty. Each task becomes the metric ``lm_eval.<task>`` (its
    main metric) plus ``lm_eval.<task>.<metric>`` for every metric it computes (see
    :mod:`clo_ray.eval.lm_eval`). The datasets must be readable offline where trials run
    (the hub cache, or a task of your own in ``include_path`` reading local files)."""

    tasks: list[str] = []
    include_path: str | None = None  # a local folder of your own task YAMLs
    limit: int | None = Field(None, gt=0)  # examples per task (None: all)
    num_fewshot: int | None = Field(None, ge=0)  # None: each task's own default
    batch_size: int = Field(8, gt=0)
    apply_chat_template: bool = False  # for chat models on tasks written for them

    @property
    def enabled(self) -> bool:
        return bool(self.tasks)

    @field_validator("tasks")
    @classmethod
    def _tasks(cls, value: list[str]) -> list[str]:
        found = Problems()
        for i, task in enumerate(value):
            if not task.strip() or any(c in task for c in "./ "):
                found.add((i,), "an lm-eval task name (no '.', '/' or spaces: it becomes "
                          "part of the metric name lm_eval.<task>)", value=task)
            elif task in value[:i]:
                found.add((i,), "listed twice", value=task)
        found.raise_if_any()
        return value

    @field_validator("include_path")
    @classmethod
    def _include_path(cls, value: str | None) -> str | None:
        if value is not None and "://" in value:
            raise problem("lm-eval reads task YAMLs from a local folder, not from object "
                          "storage: copy them next to the spec (shipped with the job's "
                          "working directory)", value=value)
        return value


class ObjectiveSection(Section):
    """The scalar each trial is ranked by: sum of weight x metric (negative weights for losses)."""

    # The paper's two axes: answer in the target language, and keep English.
    weights: dict[str, float] = {"target_fidelity": 1.0, "english_retention": 0.5}


class GenerationSpec(Section):
    """How answers to a prompt set are generated: greedy (``temperature: 0``, reproducible:
    what language fidelity wants) or sampled (CRPO: temperature 0.8), seeded."""

    temperature: float = Field(0.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int = 0
    max_new_tokens: int | None = Field(None, gt=0)  # None: evaluation.max_new_tokens

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


PROMPT_SET_FORMATS = ("auto", "alpaca_eval", "parallel", "parquet")
BUILTIN_PROMPTS = "builtin:eval-prompts"


class PromptSetSpec(Section):
    """A set of instructions every trial answers (besides the held-out pairs), e.g.
    AlpacaEval's 805, judged against each trial's opponents.

    ``path``: an alpaca_eval file (JSON list or JSONL of ``{"instruction", "dataset"?}``),
    a parallel file (``text.<lang>.prompt``), a parquet table with an ``instruction``
    column, or ``builtin:eval-prompts`` (102 instructions written for clo-ray, in English
    and the six paper languages). Languages the file lacks are translated by the spec's
    translator through the translate stage and its cache (the paper translated AlpacaEval).
    """

    name: str
    path: str
    format: Literal["auto", "alpaca_eval", "parallel", "parquet"] = "auto"
    max_prompts: int | None = Field(None, gt=0)  # the first N (None: all)
    generation: GenerationSpec = GenerationSpec()
    english: bool = True  # also answer the English instructions (English retention)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if value == "heldout":
            raise problem("reserved for the held-out pairs", value=value)
        return check_slug(value)


class EvaluationSection(Section):
    """Evaluation of every trial on pairs held out of every budget (never trained on), on
    the prompt sets, and on the benchmarks."""

    holdout: int = Field(100, ge=1)  # pairs set aside before budgets are drawn
    max_prompts: int = Field(50, gt=0)  # held-out prompts generated from, per language
    max_new_tokens: int = Field(256, gt=0)
    backend: Literal["auto", "vllm", "transformers"] = "auto"
    # Prompts per generate call with transformers (answers and a local judge; vLLM schedules
    # its own batches). Fewer, larger calls mean fewer decoding passes over the weights
    # (SmolLM2-135M, 48 sampled prompts, 2 cores: 33 s at 8, 26 s at 48); padding to the
    # longest prompt in a call is the price, so GPU users with long prompts keep it small.
    batch_size: int = Field(8, gt=0)
    langid_threshold: float = Field(0.5, ge=0, le=1)
    prompt_sets: list[PromptSetSpec] = []
    judge: JudgeSection = JudgeSection()
    lm_eval: LmEvalSection = LmEvalSection()
    # Benchmarks by name (clo_ray.benchmarks): each trial runs its language's task and the
    # English one; shots per benchmark (default: CRPO's). lm_eval's settings (limit,
    # batch_size, include_path) apply.
    benchmarks: list[str] = []
    benchmark_shots: dict[str, int] = {}
    objective: ObjectiveSection = ObjectiveSection()

    @field_validator("benchmarks")
    @classmethod
    def _benchmarks(cls, value: list[str]) -> list[str]:
        found = Problems()
        for i, name in enumerate(value):
            if name not in BENCHMARKS:
                found.add((i,), "unknown benchmark", allowed=sorted(BENCHMARKS), value=name)
            elif name in value[:i]:
                found.add((i,), "listed twice", value=name)
        found.raise_if_any()
        return value

    def judged_sets(self) -> list[str]:
        """The prompt sets the judge compares (``heldout``: the held-out pairs)."""
        if self.judge.prompt_sets is not None:
            return list(self.judge.prompt_sets)
        return [p.name for p in self.prompt_sets] or ["heldout"]

    def metric_names(self) -> list[str]:
        """Metrics this evaluation produces (judge ones only with the judge enabled)."""
        names = [m for m in METRICS if self.judge.enabled or m not in JUDGE_METRICS]
        names += [f"benchmark.{b}{side}" for b in self.benchmarks for side in ("", ".en")]
        return names + [f"lm_eval.{task}" for task in self.lm_eval.tasks]

    @model_validator(mode="after")
    def _objective(self) -> EvaluationSection:
        found, known = Problems(), self.metric_names()
        weights = self.objective.weights
        for name in weights:
            if name not in known:
                found.add(("objective", "weights", name), "not a metric this evaluation "
                          "computes (judge metrics need judge.enabled; lm_eval.TASK needs "
                          "the task in lm_eval.tasks)", allowed=known, value=name)
        if not any(weights.values()):
            found.add(("objective", "weights"), "needs a non-zero weight", value=weights)
        names = [p.name for p in self.prompt_sets]
        for i, name in enumerate(names):
            if name in names[:i]:
                found.add(("prompt_sets", i, "name"), "listed twice", value=name)
        for i, name in enumerate(self.judge.prompt_sets or []):
            if name not in ["heldout", *names]:
                found.add(("judge", "prompt_sets", i), "not a prompt set of this evaluation",
                          allowed=["heldout", *names], value=name)
        for name, shots in self.benchmark_shots.items():
            if name not in self.benchmarks:
                found.add(("benchmark_shots", name), "not in evaluation.benchmarks",
                          allowed=list(self.benchmarks), value=name)
            elif shots < 0:
                found.add(("benchmark_shots", name), "a number of examples, >= 0", value=shots)
        found.raise_if_any()
        return self


class ReportSection(Section):
    """What the report stage writes: tables of these metrics, curves, files."""

    metrics: list[str] = ["target_fidelity", "english_retention", "target_nll", "english_nll",
                          "preference_accuracy"]
    plots: bool = True  # data-budget curves (PNG)
    formats: list[Literal["md", "parquet"]] = ["md", "parquet"]
