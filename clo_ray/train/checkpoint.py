"""Checkpoints that hold only what was trained, and the export to a full HF model directory.

Layout of one checkpoint directory (what ``ray.train.report(checkpoint=...)`` persists)::

    manifest.json            base model reference, schedule position, trainable names, data order
    stage-0.safetensors      the tensors stage 0 trained (gathered, full shapes even on ZeRO-3)
    stage-1.safetensors      ... one file per stage started so far (the last may be mid-stage)
    optimizer/               DeepSpeed's optimizer + LR-scheduler state (mid-stage only), one
                             ``zero_pp_rank_R`` file per worker under ZeRO 1-3

The run's own position (:class:`RunState`: stage, step, what each stage trained) is written
into a checkpoint by :func:`save_checkpoint` on every worker and read back by
:func:`resume_point` when Ray hands a checkpoint to a restarted or re-run worker group.

A model is rebuilt by loading the base model and applying the stage files in order: a plain
stage's tensors replace those weights, a LoRA stage's adapters (its peft settings are in the
manifest) are merged into theirs. Attention-only CLO on SmolLM2-135M is ~9 MB instead of
540 MB. :func:`export_model` writes that rebuilt model as a normal directory that
transformers and vLLM load.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from clo_ray.errors import CloRayError
from clo_ray.train.loop_config import LoopConfig
from clo_ray.train.schedule import lora_config_dict, trainable_parameters

logger = logging.getLogger(__name__)

FORMAT = "clo-ray-checkpoint/1"
MANIFEST = "manifest.json"
OPTIMIZER_DIR = "optimizer"
DS_TAG = "ds"  # DeepSpeed's checkpoint tag inside <checkpoint>/optimizer/


class CheckpointError(CloRayError):
    """A checkpoint directory is missing files or does not fit the model it is applied to."""


def stage_file(index: int) -> str:
    return f"stage-{index}.safetensors"


# ---------------------------------------------------------------------------- writing


def save_trained(directory: str | Path, index: int, tensors: dict[str, torch.Tensor]) -> Path:
    """Write one stage's trained tensors (already gathered to full shape) as safetensors."""
    path = Path(directory) / stage_file(index)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(path))
    return path


def write_manifest(directory: str | Path, manifest: dict[str, Any]) -> Path:
    """Write ``manifest.json`` (sorted keys, so two checkpoints diff cleanly)."""
    path = Path(directory) / MANIFEST
    path.write_text(json.dumps({"format": FORMAT, **manifest}, indent=2, sort_keys=True))
    return path


# ---------------------------------------------------------------------------- reading


def read_manifest(directory: str | Path) -> dict[str, Any]:
    """The manifest of a checkpoint directory; CheckpointError when absent or foreign."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"{directory} is not a clo-ray checkpoint (no {MANIFEST})")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path}: unknown format {manifest.get('format')!r} "
                              f"(this clo-ray reads {FORMAT})")
    return manifest


def load_trained(directory: str | Path, index: int) -> dict[str, torch.Tensor]:
    """One stage's trained tensors."""
    path = Path(directory) / stage_file(index)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {directory} has no {stage_file(index)}")
    return load_file(str(path))


def assign_tensors(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy ``tensors`` into the model's parameters of those names (dtype of the model).

    Every name must exist with the same shape: a checkpoint applied to the wrong base model
    must fail here, not produce a silently half-loaded model.
    """
    params = dict(model.named_parameters())
    missing = [n for n in tensors if n not in params]
    if missing:
        raise CheckpointError(f"{len(missing)} checkpoint tensors are not parameters of the "
                              f"model, e.g. {missing[:3]}; is it the same base model?")
    with torch.no_grad():
        for name, value in tensors.items():
            if params[name].shape != value.shape:
                raise CheckpointError(f"{name}: checkpoint shape {tuple(value.shape)} != model "
                                      f"shape {tuple(params[name].shape)}")
            params[name].copy_(value.to(params[name].dtype))


def apply_stage(model: torch.nn.Module, tensors: dict[str, torch.Tensor],
                lora: dict[str, Any] | None) -> torch.nn.Module:
    """Apply one stage's tensors: replace weights, or wrap with LoRA, load and merge."""
    if lora is None:
        assign_tensors(model, tensors)
        return model
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                        target_modules=lora["target_modules"], bias="none")
    wrapped = get_peft_model(model, config)
    assign_tensors(wrapped, tensors)
    return wrapped.merge_and_unload()


def apply_checkpoint(model: Any, directory: str | Path,
                     stages: range | None = None) -> torch.nn.Module:
    """Apply the checkpoint's stage files (default: all it holds) to a base model, in order."""
    manifest = read_manifest(directory)
    entries = manifest["stages"]
    for index in stages if stages is not None else range(len(entries)):
        model = apply_stage(model, load_trained(directory, index), entries[index].get("lora"))
    return model


def load_model(directory: str | Path, *, dtype: torch.dtype = torch.float32) -> Any:
    """The full trained model: the manifest's base model with every stage applied."""
    from transformers import AutoModelForCausalLM

    from clo_ray.models.resolve import resolve_model

    base = resolve_model(read_manifest(directory)["base_model"])
    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
    return apply_checkpoint(model, directory)


def export_model(checkpoint_dir: str | Path, out_dir: str | Path, *,
                 dtype: torch.dtype = torch.float32) -> Path:
    """Write base + trained weights (LoRA merged) as a full HF model directory with tokenizer.

    The result loads with ``AutoModelForCausalLM.from_pretrained`` and with vLLM. The
    checkpoint's manifest is copied beside the weights as ``clo_ray_manifest.json`` so an
    exported model still says where it came from.
    """
    from transformers import AutoTokenizer

    from clo_ray.models.resolve import resolve_model

    manifest = read_manifest(checkpoint_dir)
    model = load_model(checkpoint_dir, dtype=dtype)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(resolve_model(manifest["base_model"])).save_pretrained(out)
    (out / "clo_ray_manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
    logger.info("exported %s (base %s) to %s", checkpoint_dir, manifest["base_model"], out)
    return out


# ----------------------------------------------------------------- the run's own position


@dataclass
class StageState:
    """What one stage trained: gathered tensors by name, and its LoRA settings (or None)."""

    tensors: dict[str, torch.Tensor]
    lora: dict[str, Any] | None
    names: list[str]


@dataclass
class RunState:
    """Where this worker stands in the schedule; filled from a checkpoint on resume."""

    stage: int = 0
    step: int = 0  # optimizer steps already done in ``stage``
    global_step: int = 0
    finished: list[StageState] = field(default_factory=list)
    current: StageState | None = None  # the running (or interrupted) stage's tensors
    checkpoint_dir: str | None = None  # local copy of a mid-stage checkpoint (until loaded)
    optimizer_dir: str | None = None


@dataclass(frozen=True)
class StagePosition:
    """A point of the schedule: stage ``index`` after ``done`` of its ``totals[index]`` steps,
    over ``n_pairs`` training pairs."""

    index: int
    done: int
    totals: list[int]
    n_pairs: int

    @property
    def stage_end(self) -> bool:
        return self.done == self.totals[self.index]


def trained_state(engine: Any) -> StageState:
    """Gather the stage's trainable tensors to full shape on every rank (a collective).

    Under ZeRO-3 each parameter is a ``[0]``-shaped shard outside a gather; reading the
    names and values inside ``GatheredParameters`` gives what a checkpoint must store.
    """
    import deepspeed

    model = engine.module.model  # inside logprobs.ResponseLogps: the names of the HF model
    params = trainable_parameters(model)
    if engine.zero_optimization_partition_weights():  # ZeRO-3
        with deepspeed.zero.GatheredParameters([p for _, p in params], modifier_rank=None):
            tensors = {n: p.detach().to("cpu", copy=True) for n, p in params}
    else:
        tensors = {n: p.detach().to("cpu", copy=True) for n, p in params}
    return StageState(tensors, lora_config_dict(model), [n for n, _ in params])


def save_checkpoint(directory: Path, engine: Any, run: RunState, at: StagePosition,
                    config: LoopConfig) -> None:
    """Write this worker's part of a checkpoint into ``directory`` (all ranks call it).

    Rank 0 writes every stage's tensors (``run.current`` for the running one) and the
    manifest; mid-stage, every rank also writes its DeepSpeed optimizer/LR state (one ZeRO
    partition per rank) under ``optimizer/``; Ray merges the workers' directories into one
    checkpoint.
    """
    import ray.train

    assert run.current is not None
    context = ray.train.get_context()
    with_optimizer = not at.stage_end
    if with_optimizer:
        engine.save_checkpoint(str(directory / OPTIMIZER_DIR), tag=DS_TAG,
                               exclude_frozen_parameters=True, save_latest=False)
    if context.get_world_rank() != 0:
        return
    index, done, totals = at.index, at.done, at.totals
    stages = [*run.finished[:index], run.current]
    for i, state in enumerate(stages):
        save_trained(directory, i, state.tensors)
    position = done * config.train.batch_pairs
    write_manifest(directory, {
        "base_model": config.model,
        "training_fingerprint": config.training_fingerprint(),
        "stage": index,
        "step": done,
        "stage_steps": totals[index],
        "global_step": sum(totals[:index]) + done,
        "complete": index == len(totals) - 1 and done == totals[index],
        "stages": [{"index": i, "name": spec.name, "loss": spec.loss,
                    "modules": list(spec.modules),
                    "layers": list(spec.layers) if spec.layers is not None else None,
                    "lora": state.lora, "trainable": state.names,
                    "steps": totals[i], "finished": i < index or done == totals[index]}
                   for i, (spec, state) in enumerate(zip(config.stages, stages, strict=False))],
        "data": {"pairs_uri": config.pairs_uri, "fingerprint": config.pairs_fingerprint,
                 "languages": list(config.languages), "n_pairs": at.n_pairs,
                 "batch_pairs": config.train.batch_pairs, "seed": config.seed + index,
                 "epoch": position // at.n_pairs, "position": position % at.n_pairs},
        "optimizer": OPTIMIZER_DIR if with_optimizer else None,
        "world_size": context.get_world_size(),
        "zero_stage": config.resources.zero_stage,
        "precision": config.resources.precision,
    })


def checkpoint_or_none(directory: str) -> Any:
    """A Ray checkpoint of ``directory``, or None when this worker wrote nothing into it."""
    import ray.train

    return ray.train.Checkpoint.from_directory(directory) if any(Path(directory).iterdir()) \
        else None


def resume_point(checkpoint: Any, config: LoopConfig, totals: list[int], world: int
                 ) -> RunState:
    """The run state a checkpoint describes (a fresh RunState without one).

    Refuses a checkpoint of other data or another schedule length (a changed config reusing a
    run name must not continue silently), and a mid-stage ZeRO checkpoint written by another
    number of workers (its optimizer partitions would not fit).
    """
    if checkpoint is None:
        return RunState()
    local = tempfile.mkdtemp(prefix="clo-resume-")
    checkpoint.to_directory(local)
    manifest = read_manifest(local)
    data = manifest["data"]
    if data["fingerprint"] != config.pairs_fingerprint or \
            [s["steps"] for s in manifest["stages"]] != totals[:len(manifest["stages"])]:
        raise CheckpointError(f"checkpoint {checkpoint.path} is of other data or another "
                              "schedule; use a new run name")
    recorded = manifest.get("training_fingerprint")  # absent in checkpoints before 2026-12
    if recorded is not None and recorded != config.training_fingerprint():
        raise CheckpointError(
            f"checkpoint {checkpoint.path} was trained with another configuration (model, "
            f"schedule values, train section or seed: fingerprint {recorded}, this run "
            f"{config.training_fingerprint()}); a run folder belongs to one configuration: "
            "use a new run name")
    index, done = manifest["stage"], manifest["step"]
    if manifest["optimizer"] and manifest["world_size"] != world and manifest["zero_stage"]:
        raise CheckpointError(f"checkpoint {checkpoint.path} holds ZeRO optimizer "
                              f"partitions of {manifest['world_size']} workers, not {world}")
    states = [StageState(load_trained(local, i), entry["lora"], entry["trainable"])
              for i, entry in enumerate(manifest["stages"])]
    finished_current = done == manifest["stage_steps"]
    run = RunState(global_step=manifest["global_step"], checkpoint_dir=local,
                   finished=states if finished_current else states[:-1])
    if finished_current:  # a stage boundary: no optimizer state to restore
        run.stage, run.step, run.checkpoint_dir = index + 1, 0, None
        shutil.rmtree(local, ignore_errors=True)
    else:
        run.stage, run.step, run.current = index, done, states[-1]
        run.optimizer_dir = str(Path(local) / OPTIMIZER_DIR)
    return run
