"""The training sections of a sweep spec: stages (losses, LoRA), methods, resources, train.

Also :data:`BUILTIN_SCHEDULES`, what ``methods: [clo, sft, sft_dpo, crpo, sft_dpo_mono]`` runs
when the spec defines no schedule of that name. Shared helpers come from
:mod:`clo_ray.spec.sections`.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from clo_ray.spec.sections import (
    Problems,
    Section,
    check_module_sets,
    check_slug,
    module_sets,
    problem,
    template_problem,
)

# ------------------------------------------------------------------------------ stages

LOSSES = ("clo", "sft", "dpo", "crpo")
REFERENCE_LOSSES = ("clo", "dpo", "crpo")  # compared against reference log-probs


def stage_encoding(loss: str, sft_data: str | None = None, dpo_pairs: str | None = None) -> str:
    """The batch layout a stage encodes its rows with (``clo_ray.train.batches.LAYOUTS``);
    torch-free so the plan can tell which stages share a reference pass."""
    if loss == "sft":
        return f"sft-{sft_data or 'target'}"
    if loss == "crpo":
        return "ranked"
    return "monolingual" if loss == "dpo" and dpo_pairs == "monolingual" else "pairs"
# field -> (losses it applies to, default for those losses). Setting one on another loss is
# an error: e.g. lambda on an sft stage would silently do nothing.
LOSS_FIELDS: dict[str, tuple[tuple[str, ...], Any]] = {
    "lambda": (("clo",), 0.5),  # the paper: 0.5 for every model and language
    "beta": (("clo", "dpo", "crpo"), 0.1),  # not given by the CLO paper; CRPO's value
    "sft_data": (("sft",), "target"),  # the paper's SFT baseline: translated data only
    "dpo_variant": (("dpo",), "sigmoid"),
    # cross_lingual: the CLO paper's SFT+DPO on CLO's pairs; monolingual: CRPO's, each
    # language's chosen over its own rejected answer (preference data)
    "dpo_pairs": (("dpo",), "cross_lingual"),
    "pair_reduction": (("clo", "dpo"), "sum"),  # the paper writes the two directions summed
    "nll_reduction": (("clo", "sft", "crpo"), "token"),  # not stated by the paper
    "alpha": (("crpo",), 0.2),  # CRPO: weight of the ranking term (1 - alpha on the NLL)
    "lambda_weighting": (("crpo",), "ndcg2"),  # CRPO's main scheme
    "lambda_mu": (("crpo",), 10.0),  # nDCG2++'s mu
    # psi of y_w^t, y_w^e, y_l^t, y_l^e; CRPO's Appendix A values were not available to us
    "relevance": (("crpo",), (3.0, 2.0, 1.0, 0.0)),
}


class LoraSpec(Section):
    """Train LoRA adapters instead of the selected weights themselves."""

    r: int = Field(16, gt=0)
    alpha: float = Field(32.0, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    targets: list[str] | None = None  # module sets; default: the stage's modules

    @field_validator("targets")
    @classmethod
    def _targets(cls, value: list[str] | None) -> list[str] | None:
        if value is not None:
            found = Problems()
            if not value:
                found.add((), "no LoRA target modules", allowed=module_sets(), value=value)
            check_module_sets(value, found)
            found.raise_if_any()
        return value


class StageSpec(Section):
    """One stage of a schedule: what trains, on which loss, for how long.

    A stage's reference model (clo, dpo) is the model at the START of that stage: CLO's is
    the base model (the paper), SFT+DPO's DPO reference is the SFT result. Reference
    log-probs of a first stage depend only on (model, data) and are computed once and shared.
    ``lr`` 8e-6 and 10% warmup are the follow-up paper's values (the CLO paper gives none).
    """

    name: str | None = None
    loss: Literal["clo", "sft", "dpo", "crpo"]
    modules: list[str]  # module sets (clo_ray.models.resolve.MODULE_SETS); the paper: attention
    lora: LoraSpec | None = None
    layers: tuple[int, int] | None = None  # [start, end) decoder layers; default all
    epochs: float | None = Field(None, gt=0)  # exactly one of epochs / steps
    steps: int | None = Field(None, gt=0)
    lr: float = Field(8e-6, gt=0)
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    lambda_: float | None = Field(None, alias="lambda", ge=0, le=1)  # clo: SFT weight
    beta: float | None = Field(None, gt=0)  # clo, dpo: reward scale
    sft_data: Literal["target", "english", "both"] | None = None  # sft only
    dpo_variant: Literal["sigmoid", "ipo"] | None = None  # dpo only
    pair_reduction: Literal["sum", "mean"] | None = None  # clo, dpo: the two directions
    nll_reduction: Literal["token", "sequence"] | None = None  # clo, sft, crpo: NLL averaging
    dpo_pairs: Literal["cross_lingual", "monolingual"] | None = None  # dpo only
    alpha: float | None = Field(None, ge=0, le=1)  # crpo: weight of the ranking loss
    lambda_weighting: Literal["lambdarank", "ndcg2", "ndcg2pp"] | None = None  # crpo only
    lambda_mu: float | None = Field(None, ge=0)  # crpo, ndcg2pp only
    relevance: tuple[float, float, float, float] | None = None  # crpo: psi per candidate

    @field_validator("modules", mode="before")
    @classmethod
    def _one_module(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("modules")
    @classmethod
    def _modules(cls, value: list[str]) -> list[str]:
        found = Problems()
        if not value:
            found.add((), "stage has no trainable modules", allowed=module_sets(), value=value)
        check_module_sets(value, found)
        found.raise_if_any()
        return value

    @field_validator("layers")
    @classmethod
    def _layers(cls, value: tuple[int, int] | None) -> tuple[int, int] | None:
        if value is not None and not 0 <= value[0] < value[1]:
            raise problem("needs 0 <= start < end", allowed=["[start, end)"])
        return value

    @model_validator(mode="after")
    def _per_loss(self) -> StageSpec:
        found = Problems()
        if self.epochs is None and self.steps is None:
            found.add((), "needs epochs or steps (how long the stage trains)")
        elif self.epochs is not None and self.steps is not None:
            found.add("steps", f"set only one of epochs or steps (epochs is {self.epochs:g})",
                      value=self.steps)
        for key, (losses, default) in LOSS_FIELDS.items():
            attr = "lambda_" if key == "lambda" else key
            if getattr(self, attr) is None:
                if self.loss in losses:
                    setattr(self, attr, default)
            elif self.loss not in losses:
                found.add(key, f"does not apply to a {self.loss!r} stage",
                          allowed=[f"losses {', '.join(losses)}"], value=getattr(self, attr))
        if self.relevance is not None and not all(
                a > b for a, b in zip(self.relevance, self.relevance[1:], strict=False)):
            found.add("relevance", "must keep CRPO's hierarchy y_w^t > y_w^e > y_l^t > y_l^e "
                      "(strictly decreasing)", value=list(self.relevance))
        found.raise_if_any()
        return self


class MethodSpec(Section):
    """A method of the grid: a name and the schedule(s) it runs (several: Optuna chooses)."""

    name: str
    schedules: list[str] | None = None  # default: the schedule with the method's name

    @model_validator(mode="before")
    @classmethod
    def _from_name(cls, value: Any) -> Any:
        return {"name": value} if isinstance(value, str) else value

    _slug = field_validator("name")(check_slug)

    @model_validator(mode="after")
    def _default(self) -> MethodSpec:
        if self.schedules is None:
            self.schedules = [self.name]
        elif not self.schedules or len(set(self.schedules)) != len(self.schedules):
            raise problem("needs one or more distinct schedule names", where="schedules",
                          value=self.schedules)
        return self


# ------------------------------------------------------------------------------ resources, train


_LABEL_NAME = r"[A-Za-z0-9](?:[-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?"
_LABEL_KEY = re.compile(rf"(?:[a-z0-9](?:[-a-z0-9.]{{0,251}}[a-z0-9])?/)?{_LABEL_NAME}")
_LABEL_VALUE = re.compile(rf"!?(?:{_LABEL_NAME}|in\({_LABEL_NAME}(?:,{_LABEL_NAME})*\))?")


def label_selector_problem(selector: dict[str, str]) -> str | None:
    """A Ray label selector's syntax (Kubernetes label keys and values; ``!value``,
    ``in(a,b)``, ``!in(a,b)``), checked when the spec loads: Ray would refuse a bad one only
    when the first trial is placed. (Not Ray's own checker: importing ray would slow --plan.)"""
    for key, value in selector.items():
        if not _LABEL_KEY.fullmatch(key):
            return f"label key {key!r}: expected [prefix/]name, name 1-63 of [A-Za-z0-9-_.]"
        if not _LABEL_VALUE.fullmatch(value):
            return (f"label value {value!r} of {key!r}: expected value, !value, in(a,b) or "
                    "!in(a,b), each value 1-63 of [A-Za-z0-9-_.]")
    return None


class ResourcesSection(Section):
    """What one trial gets: a Ray Train TorchTrainer with DeepSpeed ZeRO on N workers."""

    workers_per_trial: int = Field(1, ge=1)
    gpus_per_worker: float = Field(0.0, ge=0)  # 0 = CPU training (DS_ACCELERATOR=cpu, gloo)
    cpus_per_worker: float = Field(1.0, gt=0)
    zero_stage: int = Field(0, ge=0, le=3)
    offload: Literal["none", "optimizer", "optimizer_and_params"] = "none"
    precision: Literal["bf16", "fp16", "fp32"] = "bf16"
    max_failures: int = Field(0, ge=0)  # trial retries (Ray FailureConfig; 0 = Ray's default)
    # Node labels the trial's own process (Tune's function trainable, and with it the Train
    # controller Ray pins to that node) must run on: {clo-ray/capacity: on-demand} keeps
    # them off spot nodes on the clusters/ configs, which label every node type so. A
    # selector value may use Ray's operators ("!spot", "in(a,b)").
    trial_labels: dict[str, str] = {}
    # Custom resources the trial's process holds on top of one CPU, for where a count
    # matters (e.g. {trial_slot: 1} against nodes that advertise trial_slot: 2 allows two
    # trials per node). Placement by node kind is trial_labels' job, not this.
    trial_resources: dict[str, float] = {}
    # How Ray places a trial's train workers (Ray Train's ScalingConfig): PACK (default:
    # fewest nodes, spills over), STRICT_PACK (one node: an 8-GPU ZeRO-3 trial over NVLink,
    # never split across nodes), SPREAD / STRICT_SPREAD (one per node).
    placement_strategy: Literal["PACK", "STRICT_PACK", "SPREAD", "STRICT_SPREAD"] = "PACK"
    # Node labels the train workers must run on (a Ray 2.60 label selector, like
    # trial_labels; e.g. {clo-ray/capacity: on-demand} for workers that must not be preempted).
    worker_labels: dict[str, str] = {}
    # For the plan's cost estimate only (default: 400 TFLOP/s per GPU, see clo_ray.sweep.plan)
    assumed_tflops_per_worker: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _deepspeed(self) -> ResourcesSection:
        found = Problems()
        if self.precision == "fp16" and self.gpus_per_worker == 0:
            found.add("precision", "DeepSpeed refuses fp16 on CPU (gpus_per_worker is 0)",
                      allowed=["bf16", "fp32"], value="fp16")
        for field in ("trial_labels", "worker_labels"):
            if problem := label_selector_problem(getattr(self, field)):
                found.add(field, problem, value=getattr(self, field))
        for name, amount in self.trial_resources.items():
            if amount < 0 or name == "GPU":
                found.add(("trial_resources", name), "must be >= 0, and a trial's own process "
                          "holds no GPU (its train workers do: gpus_per_worker)", value=amount)
        need = {"optimizer": 1, "optimizer_and_params": 3}.get(self.offload, 0)
        if self.zero_stage < need:
            found.add("offload", f"offloading {self.offload.replace('_', ' ')} needs "
                      f"zero_stage >= {need} (zero_stage is {self.zero_stage})",
                      value=self.offload)
        found.raise_if_any()
        return self


DEFAULT_PROMPT_TEMPLATE = "### Instruction:\n{prompt}\n\n### Response:\n"


class TrainSection(Section):
    """The training loop's knobs, shared by every stage (stages set lr, length, loss)."""

    batch_pairs: int = Field(32, gt=0)  # global batch, in parallel pairs (not sequences)
    micro_batch_pairs: int = Field(1, gt=0)  # per worker per step
    max_length: int = Field(2048, gt=0)  # tokens per sequence (the follow-up paper: 3072)
    grad_clip: float | None = Field(1.0, gt=0)
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "linear"
    weight_decay: float = Field(0.0, ge=0)
    gradient_checkpointing: bool = True
    report_every: int = Field(10, gt=0)  # optimizer steps between metric reports
    checkpoint_every: int | None = Field(None, gt=0)  # steps; default: at each stage's end
    # Used when the tokenizer has no chat template (base models rarely have one)
    prompt_template: str = DEFAULT_PROMPT_TEMPLATE

    @field_validator("prompt_template")
    @classmethod
    def _template(cls, value: str) -> str:
        why = template_problem(value, ("prompt",), ("prompt",))
        if why:
            raise problem(why, allowed=["{prompt}"])
        return value


# ------------------------------------------------------------------------------ built-in schedules


def _stage(loss: str, modules: str, **extra: Any) -> dict[str, Any]:
    return {"name": loss, "loss": loss, "modules": [modules], "epochs": 2, "lr": 8e-6, **extra}


# What `methods: [clo, sft, sft_dpo]` runs when the spec defines no schedule of that name.
# lambda 0.5 and attention-only are the paper's; 2 epochs, lr 8e-6, beta 0.1 and 10% warmup
# the follow-up paper's (the CLO paper gives no others). SFT+DPO's DPO stage starts from (and
# uses as its reference) the SFT result. crpo: CRPO's alpha 0.2 and beta 0.1, nDCG2 weights;
# it updates every weight (CRPO compares against full-model SFT and DPO), and it needs a
# preference corpus; sft_dpo_mono is CRPO's SFT+DPO baseline on the same preference data.
BUILTIN_SCHEDULES: dict[str, list[dict[str, Any]]] = {
    "clo": [_stage("clo", "attention", **{"lambda": 0.5, "beta": 0.1})],
    "sft": [_stage("sft", "all", sft_data="target")],
    "sft_dpo": [_stage("sft", "all", sft_data="target"), _stage("dpo", "all", beta=0.1)],
    "crpo": [_stage("crpo", "all", alpha=0.2, beta=0.1, lambda_weighting="ndcg2")],
    "sft_dpo_mono": [_stage("sft", "all", sft_data="target"),
                     _stage("dpo", "all", beta=0.1, dpo_pairs="monolingual")],
}
