"""Checkpoints that hold only what was trained, and the export to a full HF model directory.

Layout of one checkpoint directory (what ``ray.train.report(checkpoint=...)`` persists)::

    manifest.json            base model reference, schedule position, trainable names, data order
    stage-0.safetensors      the tensors stage 0 trained (gathered, full shapes even on ZeRO-3)
    stage-1.safetensors      ... one file per stage started so far (the last may be mid-stage)
    optimizer/               DeepSpeed's optimizer + LR-scheduler state (mid-stage only), one
                             ``zero_pp_rank_R`` file per worker under ZeRO 1-3

A model is rebuilt by loading the base model and applying the stage files in order: a plain
stage's tensors replace those weights, a LoRA stage's adapters (its peft settings are in the
manifest) are merged into theirs. Attention-only CLO on SmolLM2-135M is ~9 MB instead of
540 MB. :func:`export_model` writes that rebuilt model as a normal directory that
transformers and vLLM load.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from clo_ray.errors import CloRayError

logger = logging.getLogger(__name__)

FORMAT = "clo-ray-checkpoint/1"
MANIFEST = "manifest.json"
OPTIMIZER_DIR = "optimizer"


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


def apply_checkpoint(model: torch.nn.Module, directory: str | Path,
                     stages: range | None = None) -> torch.nn.Module:
    """Apply the checkpoint's stage files (default: all it holds) to a base model, in order."""
    manifest = read_manifest(directory)
    entries = manifest["stages"]
    for index in stages if stages is not None else range(len(entries)):
        model = apply_stage(model, load_trained(directory, index), entries[index].get("lora"))
    return model


def load_model(directory: str | Path, *, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
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
