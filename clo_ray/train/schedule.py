"""Stages of a schedule: which parameters train, for how long, against which reference.

A schedule is a list of :class:`~clo_ray.spec.schema.StageSpec`. CLO is one stage (attention only,
the paper); SFT+DPO is an sft stage then a dpo stage. Every stage starts from a plain
Hugging Face model holding the base weights plus everything earlier stages trained, and:

1. :func:`prepare_stage_model` sets the trainable set *before* ``deepspeed.initialize``
   (ZeRO-3 partitions parameters to shape ``[0]`` afterwards, and DeepSpeed builds its
   optimizer partitions from ``requires_grad``): ``requires_grad`` is False everywhere and
   True only for :func:`clo_ray.models.resolve.select_parameters` names; with ``lora`` the selected
   Linear/Embedding modules get peft adapters instead and only those train;
2. :func:`build_optimizer` gives AdamW the trainable parameters only;
3. :func:`stage_steps` is the stage's length in optimizer steps;
4. the stage's reference model (clo, dpo) is the model at the stage start: the base model for
   the first stage, the SFT result for SFT+DPO's dpo stage (:func:`needs_reference`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from pydantic import ValidationError

from clo_ray.errors import CloRayError
from clo_ray.models.selectors import select_parameters
from clo_ray.spec.search_space import search_key
from clo_ray.spec.training import LOSS_FIELDS, REFERENCE_LOSSES, StageSpec

# Search keys (clo_ray.spec.schema.SEARCH_FIELDS) -> StageSpec attribute.
_OVERRIDE_ATTRS = {"lambda": "lambda_", "lora_r": "lora"}


class ScheduleError(CloRayError):
    """A stage cannot be set up (an override that fits no stage, LoRA on a non-Linear module)."""


# ----------------------------------------------------------------------------- stage plan


def needs_reference(stage: StageSpec) -> bool:
    """Whether the stage's loss compares against reference log-probs (clo, dpo, crpo)."""
    return stage.loss in REFERENCE_LOSSES


def stage_steps(stage: StageSpec, n_pairs: int, batch_pairs: int) -> int:
    """Optimizer steps of a stage: ``steps``, or ``ceil(epochs x n_pairs / batch_pairs)``.

    Epochs count passes over the stage's training pairs; the last step of a fractional epoch
    is a full batch (the sample stream wraps into the next epoch's order).
    """
    if stage.steps is not None:
        return int(stage.steps)
    if n_pairs <= 0:
        raise ScheduleError("a stage measured in epochs needs at least one training pair")
    return max(1, math.ceil(float(stage.epochs or 0) * n_pairs / batch_pairs))


def apply_overrides(stages: Sequence[StageSpec], overrides: Mapping[str, Any]) -> list[StageSpec]:
    """Stages with search values applied (a Tune trial's sampled config).

    Keys are the spec's search keys: ``lr``, ``beta``, ``lambda``, ``epochs``, ``steps``,
    ``warmup_ratio``, ``modules``, ``lora_r`` apply to every stage whose loss takes them
    (``beta``: clo and dpo; ``lambda``: clo), ``LOSS.FIELD`` (``dpo.beta``) to that loss's
    stages only. ``schedule`` is chosen by the caller, not here. A key that changes no stage is
    an error: a silently ignored search dimension wastes a sweep.
    """
    updated = [stage.model_copy(deep=True) for stage in stages]
    for key, value in overrides.items():
        if key == "schedule":
            continue
        parsed = search_key(key)
        if parsed is None:
            raise ScheduleError(f"unknown override {key!r} (use a search key such as lr, beta, "
                                "lambda, epochs, steps, warmup_ratio, modules, lora_r, dpo.beta)")
        field, losses = parsed
        touched = [s for s in updated if s.loss in losses and _overridable(s, field)]
        if not touched:
            raise ScheduleError(f"override {key}={value!r} applies to no stage of the schedule "
                                f"(losses {[s.loss for s in updated]})")
        try:
            for stage in touched:
                _set(stage, field, value)
                with warnings.catch_warnings():  # pydantic warns dumping the unchecked value
                    warnings.simplefilter("ignore", UserWarning)
                    StageSpec.model_validate(stage.model_dump(by_alias=True))
        except (ValueError, TypeError) as err:  # pydantic's ValidationError is a ValueError
            reason = err.errors()[0]["msg"] if isinstance(err, ValidationError) else str(err)
            raise ScheduleError(f"override {key}={value!r}: {reason}") from None
    return [StageSpec.model_validate(s.model_dump(by_alias=True)) for s in updated]


def preference_beta(stages: Sequence[StageSpec]) -> float:
    """The beta a run's implicit reward is measured with: that of its last clo / dpo stage
    (after search overrides, so a searched ``beta`` or ``dpo.beta`` counts), else the spec's
    default (0.1) for runs without a preference stage (SFT: its held-out reward margin is
    still measured, against the base model)."""
    betas = [stage.beta for stage in stages if stage.loss in REFERENCE_LOSSES and stage.beta]
    return float(betas[-1]) if betas else float(LOSS_FIELDS["beta"][1])


def _overridable(stage: StageSpec, field: str) -> bool:
    return stage.lora is not None if field == "lora_r" else True


def _set(stage: StageSpec, field: str, value: Any) -> None:
    if field == "lora_r":
        stage.lora.r = int(value)  # type: ignore[union-attr]
    elif field == "modules":
        stage.modules = [value] if isinstance(value, str) else list(value)
    elif field in ("epochs", "steps"):  # a stage has one length: the override replaces both
        stage.epochs, stage.steps = (float(value), None) if field == "epochs" else (None,
                                                                                     int(value))
    else:
        setattr(stage, _OVERRIDE_ATTRS.get(field, field), value)


# ------------------------------------------------------------------------- trainable sets


def trainable_names(model: torch.nn.Module, stage: StageSpec) -> list[str]:
    """Parameter names the stage trains (before any LoRA wrapping)."""
    modules = stage.lora.targets or stage.modules if stage.lora else stage.modules
    return select_parameters(model, modules, layers=stage.layers)


def prepare_stage_model(model: torch.nn.Module, stage: StageSpec) -> torch.nn.Module:
    """Freeze everything but the stage's selection; returns the model to train.

    Without LoRA the same model comes back with ``requires_grad`` set. With LoRA a peft
    model wrapping it comes back, and only its adapter weights train; :func:`finish_stage`
    merges them at the stage end so the next stage starts from a plain model again.
    """
    names = trainable_names(model, stage)
    for param in model.parameters():
        param.requires_grad_(False)
    if stage.lora is None:
        chosen = set(names)
        for name, param in model.named_parameters():
            if name in chosen:
                param.requires_grad_(True)
        return model
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=stage.lora.r,
        lora_alpha=stage.lora.alpha,
        lora_dropout=stage.lora.dropout,
        target_modules=lora_target_modules(model, names),
        bias="none",
    )
    return get_peft_model(model, config)


def lora_target_modules(model: torch.nn.Module, names: Sequence[str]) -> list[str]:
    """Full module names owning the selected weights; LoRA only adapts Linear / Embedding."""
    modules = dict(model.named_modules())
    targets = list(dict.fromkeys(name.rsplit(".", 1)[0] for name in names))
    for target in targets:
        kind = type(modules.get(target)).__name__
        if not isinstance(modules.get(target), (torch.nn.Linear, torch.nn.Embedding)):
            raise ScheduleError(f"LoRA cannot adapt {target} ({kind}): choose lora.targets "
                                "among attention, mlp, embeddings, lm_head")
    return targets


def lora_config_dict(model: torch.nn.Module) -> dict[str, Any] | None:
    """The peft LoRA settings of a wrapped model (for the manifest), None for a plain one."""
    config = getattr(model, "peft_config", {}).get("default")
    if config is None:
        return None
    return {"r": config.r, "alpha": config.lora_alpha, "dropout": config.lora_dropout,
            "target_modules": sorted(config.target_modules)}


def finish_stage(model: Any) -> torch.nn.Module:
    """The plain model after a stage: LoRA adapters merged into their weights, else as is."""
    if hasattr(model, "merge_and_unload"):
        return model.merge_and_unload()
    return model


def trainable_parameters(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """``(name, parameter)`` of everything that trains, in model order."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


# ------------------------------------------------------------------ optimizer and schedule


def build_optimizer(model: torch.nn.Module, lr: float, weight_decay: float = 0.0
                    ) -> torch.optim.AdamW:
    """AdamW over the trainable parameters only (frozen ones get no state, no update).

    Plain torch AdamW: DeepSpeed wraps it for ZeRO; its own Adam variants would JIT-compile.
    """
    params = [p for _, p in trainable_parameters(model)]
    if not params:
        raise ScheduleError("the stage has no trainable parameter")
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def build_lr_scheduler(optimizer: torch.optim.Optimizer, name: str, total_steps: int,
                       warmup_ratio: float) -> torch.optim.lr_scheduler.LRScheduler:
    """transformers' schedule ``name`` with ``round(warmup_ratio x total_steps)`` warmup steps."""
    from transformers import get_scheduler

    warmup = round(warmup_ratio * total_steps)
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)


# ------------------------------------------------------------------------------ sample order


class SampleStream:
    """A stage's sample order: ``epoch_order(n, seed, epoch)`` for epoch 0, 1, ... end to end.

    Step ``s`` trains on stream positions ``[s x batch, (s + 1) x batch)``, so the pairs of
    any step follow from the step number alone: a resumed run continues the exact order
    without replaying anything, and the manifest's (epoch, position) is just ``divmod``.
    """

    def __init__(self, n_pairs: int, seed: int) -> None:
        if n_pairs <= 0:
            raise ScheduleError("no training pairs")
        self.n_pairs, self.seed = n_pairs, seed
        self._epoch, self._order = -1, list[int]()

    def indices(self, start: int, count: int) -> list[int]:
        """Pair indices at stream positions ``start .. start + count - 1``."""
        from clo_ray.train.batches import epoch_order

        out = []
        for position in range(start, start + count):
            epoch, offset = divmod(position, self.n_pairs)
            if epoch != self._epoch:
                self._epoch, self._order = epoch, epoch_order(self.n_pairs, seed=self.seed,
                                                              epoch=epoch)
            out.append(self._order[offset])
        return out


def rank_indices(step_indices: Sequence[int], *, rank: int, world: int, micro: int
                 ) -> list[int]:
    """This worker's share of one global batch, in micro-batch order.

    The batch is cut into micro-batches of ``micro`` pairs; micro-batch ``k`` goes to rank
    ``k % world`` as its micro-step ``k // world`` (gradient accumulation).
    """
    chunks = [step_indices[i:i + micro] for i in range(0, len(step_indices), micro)]
    return [index for chunk in chunks[rank::world] for index in chunk]
