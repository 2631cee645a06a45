"""The evaluation sections of a sweep spec: metrics, evaluation (judge, lm_eval, objective), report.

:data:`METRICS` is what the evaluate stage reports per trial; :data:`TRAINING_METRICS` the ones
also reported during training (for early stopping, see :mod:`clo_ray.spec.search_space`).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from clo_ray.spec.sections import Problems, Section, model_ref_kind, problem

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


class JudgeSection(Section):
    """LLM-as-judge pairwise win rate, as the paper's AlpacaEval-style evaluation (opt-in).

    Judged after the tune stage (:mod:`clo_ray.eval.judge_stage`), once for all trials: the
    opponent (the best SFT trial of the same model, language and budget, or the base model)
    may finish after the trial it is compared with, and one judge load serves every pair.
    So Optuna never sees judge metrics while it searches, and an objective that weights them
    is completed in results.parquet by that stage.
    """

    enabled: bool = False
    model: str | None = None  # the judge model; required when enabled
    backend: Literal["auto", "vllm", "transformers"] = "auto"
    opponent: Literal["sft", "base"] = "sft"  # the paper: win rate against the SFT model
    max_new_tokens: int = Field(512, gt=0)

    @field_validator("model")
    @classmethod
    def _model(cls, value: str | None) -> str | None:
        if value is not None:
            model_ref_kind(value)
        return value

    @model_validator(mode="after")
    def _needs_model(self) -> JudgeSection:
        if self.enabled and self.model is None:
            raise problem("required when the judge is enabled", where="model", value=None)
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


class EvaluationSection(Section):
    """Evaluation of every trial on pairs held out of every budget (never trained on)."""

    holdout: int = Field(100, ge=1)  # pairs set aside before budgets are drawn
    max_prompts: int = Field(50, gt=0)  # held-out prompts generated from, per language
    max_new_tokens: int = Field(256, gt=0)
    backend: Literal["auto", "vllm", "transformers"] = "auto"
    langid_threshold: float = Field(0.5, ge=0, le=1)
    judge: JudgeSection = JudgeSection()
    lm_eval: LmEvalSection = LmEvalSection()
    objective: ObjectiveSection = ObjectiveSection()

    def metric_names(self) -> list[str]:
        """Metrics this evaluation produces (judge ones only with the judge enabled)."""
        names = [m for m in METRICS if self.judge.enabled or m not in JUDGE_METRICS]
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
        found.raise_if_any()
        return self


class ReportSection(Section):
    """What the report stage writes: tables of these metrics, curves, files."""

    metrics: list[str] = ["target_fidelity", "english_retention", "target_nll", "english_nll",
                          "preference_accuracy"]
    plots: bool = True  # data-budget curves (PNG)
    formats: list[Literal["md", "parquet"]] = ["md", "parquet"]
