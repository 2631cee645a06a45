"""The train loop's set-up and bookkeeping steps, one small function each (see loop.py).

Kept out of :mod:`clo_ray.train.loop` so the loop itself reads as the method: these are the
parts that deal with processes, storage, DeepSpeed's partitioned parameters and checkpoints.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from clo_ray import storage
from clo_ray.spec.training import StageSpec
from clo_ray.train import checkpoint as ckpt
from clo_ray.train.schedule import lora_config_dict, needs_reference, trainable_parameters

logger = logging.getLogger("clo_ray.train")
DS_TAG = "ds"  # DeepSpeed's checkpoint tag inside <checkpoint>/optimizer/


# ------------------------------------------------------------------------------ process


def setup_worker_process(cpus: float) -> None:
    """Env, threads, logging and warnings of a train worker process (idempotent).

    DeepSpeed's CPU accelerator when there is no GPU; as many torch threads as the worker
    has CPUs (Ray starts a train worker with OMP_NUM_THREADS=1: on a CPU box that alone made
    steps ~2x slower); our INFO lines (the progress line) on; DeepSpeed's INFO and the
    deprecation warnings of the collectives ZeRO-3 calls every step off.
    """
    torch.set_num_threads(max(1, int(cpus)))
    for key, value in {"DS_ACCELERATOR": "cpu" if not torch.cuda.is_available() else "",
                       "TOKENIZERS_PARALLELISM": "false"}.items():
        if value:
            os.environ.setdefault(key, value)
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    warnings.filterwarnings("ignore", message=".*torch.distributed.*deprecated.*")
    package = logging.getLogger("clo_ray")
    package.setLevel(logging.INFO)
    if not package.handlers and not logging.getLogger().handlers:  # Ray usually has one
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s", "%H:%M:%S"))
        package.addHandler(handler)
    for noisy in ("DeepSpeed", "deepspeed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


# ------------------------------------------------------------------------- model and data


def load_tokenizer(model_dir: Path) -> Any:
    """The model's tokenizer, with a pad token (eos when it has none: pads are masked)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def read_pairs(uri: str, storage_options: dict | None) -> Any:
    """The trial's training pairs (the parquet the trainer wrote), a pyarrow Table."""
    import pyarrow.parquet as pq

    with storage.open_input(uri, storage_options) as fh:
        return pq.read_table(fh)


def stage_start_model(model_dir: Path, dtype: torch.dtype, finished: list[StageState]
                      ) -> torch.nn.Module:
    """Base weights with every finished stage applied: the stage's start and its reference.

    Built afresh for each stage (and identically on resume), so the next stage's DeepSpeed
    engine wraps a plain, unpartitioned model.
    """
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    for done in finished:
        model = ckpt.apply_stage(model, done.tensors, done.lora)
    model.config.use_cache = False
    return model


# ---------------------------------------------------------------------- reference log-probs


def tensors_fingerprint(states: list[StageState]) -> str:
    """Content hash of what earlier stages trained (names, shapes and bytes)."""
    digest = hashlib.sha256()
    for state in states:
        digest.update(json.dumps(state.lora, sort_keys=True).encode())
        for name in sorted(state.tensors):
            tensor = state.tensors[name].detach().cpu().contiguous()
            digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
            digest.update(tensor.flatten().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def stage_reference(model: torch.nn.Module, examples: list, stage: StageSpec, index: int,
                    config: dict[str, Any], finished: list[StageState], pad_id: int
                    ) -> tuple[dict | None, int]:
    """Reference log-probs of the stage-start model for every example, and how many this
    worker computed (0 on a cache hit).

    The key names the model (the base reference and dtype, plus a hash of what earlier
    stages trained: SFT+DPO's reference is the SFT result), the data, the template, the
    max length and the encoding. Rank 0 decides whether the cache is complete and tells the
    others, so all workers agree; otherwise each computes its shard ``examples[rank::world]``
    and writes it, and all read the whole table after a barrier.
    """
    import ray.train
    import ray.train.torch
    import torch.distributed as dist

    from clo_ray.train import reference as ref

    if not needs_reference(stage):
        return None, 0
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    model_key = f"{config['model']}|{config['resources']['precision']}"
    if index and finished:
        model_key += f"+{tensors_fingerprint(finished)}"
    key = ref.reference_key(model_key, config["pairs_fingerprint"],
                            config["train"]["prompt_template"], config["train"]["max_length"],
                            stage.loss, stage.sft_data or "target")
    uri = ref.reference_uri(config["reference_root"], key)
    options = config.get("storage_options") or None
    flag = [ref.shard_complete(uri, world, options) if rank == 0 else None]
    if world > 1:
        dist.broadcast_object_list(flag, src=0)
    computed = 0
    if not flag[0]:
        mine = examples[rank::world]
        model.to(ray.train.torch.get_device())
        logps = ref.compute_reference_logps(model, mine, pad_id=pad_id,
                                            micro_batch=config["train"]["micro_batch_pairs"])
        ref.write_shard(uri, mine, logps, rank=rank, world=world, storage_options=options)
        computed = len(mine)
        logger.info("rank %d computed reference log-probs of %d examples -> %s", rank,
                    computed, uri)
    if world > 1:
        dist.barrier()
    return ref.read_reference(uri, options), computed


# ----------------------------------------------------------------------- checkpoints, state


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
    current: StageState | None = None  # the interrupted stage's tensors
    checkpoint_dir: str | None = None  # local copy of a mid-stage checkpoint (until loaded)
    optimizer_dir: str | None = None


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


def save_checkpoint(directory: Path, engine: Any, current: StageState, index: int,
                    done: int, totals: list[int], run: RunState, config: dict[str, Any], *,
                    with_optimizer: bool) -> None:
    """Write this worker's part of a checkpoint into ``directory`` (all ranks call it).

    Rank 0 writes every stage's tensors and the manifest; with ``with_optimizer`` (mid-stage)
    every rank also writes its DeepSpeed optimizer/LR state (one ZeRO partition per rank)
    under ``optimizer/``; Ray merges the workers' directories into one checkpoint.
    """
    import ray.train

    rank = ray.train.get_context().get_world_rank()
    if with_optimizer:
        engine.save_checkpoint(str(directory / ckpt.OPTIMIZER_DIR), tag=DS_TAG,
                               exclude_frozen_parameters=True, save_latest=False)
    if rank != 0:
        return
    stages = [*run.finished[:index], current]
    for i, state in enumerate(stages):
        ckpt.save_trained(directory, i, state.tensors)
    train = config["train"]
    position = done * train["batch_pairs"]
    n_pairs = config["n_pairs"]
    ckpt.write_manifest(directory, {
        "base_model": config["model"],
        "stage": index,
        "step": done,
        "stage_steps": totals[index],
        "global_step": sum(totals[:index]) + done,
        "complete": index == len(totals) - 1 and done == totals[index],
        "stages": [{"index": i, "name": spec.get("name"), "loss": spec["loss"],
                    "modules": spec["modules"], "layers": spec.get("layers"),
                    "lora": state.lora, "trainable": state.names,
                    "steps": totals[i], "finished": i < index or done == totals[index]}
                   for i, (spec, state) in enumerate(zip(config["stages"], stages, strict=False))],
        "data": {"pairs_uri": config["pairs_uri"], "fingerprint": config["pairs_fingerprint"],
                 "languages": config["languages"], "n_pairs": n_pairs,
                 "batch_pairs": train["batch_pairs"], "seed": config["seed"] + index,
                 "epoch": position // n_pairs, "position": position % n_pairs},
        "optimizer": ckpt.OPTIMIZER_DIR if with_optimizer else None,
        "world_size": ray.train.get_context().get_world_size(),
        "zero_stage": config["resources"]["zero_stage"],
        "precision": config["resources"]["precision"],
    })


def checkpoint_or_none(directory: str) -> Any:
    """A Ray checkpoint of ``directory``, or None when this worker wrote nothing into it."""
    import ray.train

    return ray.train.Checkpoint.from_directory(directory) if any(Path(directory).iterdir()) \
        else None


def resume_point(checkpoint: Any, config: dict[str, Any], totals: list[int], world: int
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
    manifest = ckpt.read_manifest(local)
    data = manifest["data"]
    if data["fingerprint"] != config["pairs_fingerprint"] or \
            [s["steps"] for s in manifest["stages"]] != totals[:len(manifest["stages"])]:
        raise ckpt.CheckpointError(f"checkpoint {checkpoint.path} is of other data or another "
                                   "schedule; use a new run name")
    index, done = manifest["stage"], manifest["step"]
    if manifest["optimizer"] and manifest["world_size"] != world and manifest["zero_stage"]:
        raise ckpt.CheckpointError(f"checkpoint {checkpoint.path} holds ZeRO optimizer "
                                   f"partitions of {manifest['world_size']} workers, not {world}")
    states = [StageState(ckpt.load_trained(local, i), entry["lora"], entry["trainable"])
              for i, entry in enumerate(manifest["stages"])]
    finished_current = done == manifest["stage_steps"]
    run = RunState(global_step=manifest["global_step"], checkpoint_dir=local,
                   finished=states if finished_current else states[:-1])
    if finished_current:  # a stage boundary: no optimizer state to restore
        run.stage, run.step, run.checkpoint_dir = index + 1, 0, None
        shutil.rmtree(local, ignore_errors=True)
    else:
        run.stage, run.step, run.current = index, done, states[-1]
        run.optimizer_dir = str(Path(local) / ckpt.OPTIMIZER_DIR)
    return run


def assign_current(model: torch.nn.Module, run: RunState) -> None:
    """Put the interrupted stage's trained tensors back (before DeepSpeed partitions them)."""
    assert run.current is not None
    ckpt.assign_tensors(model, run.current.tensors)


def log_samples(config: dict[str, Any], rank: int, stage: int, step: int, ids: list) -> None:
    """Append the pair ids this worker trains on at a step to ``config["sample_log"]``.

    Off unless set: it is how the resume tests see the sample order a run really used.
    """
    path = config.get("sample_log")
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with open(f"{path}.rank{rank}", "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"stage": stage, "step": step, "ids": ids}) + "\n")
