"""The per-worker training loop: one Ray Train worker, DeepSpeed, a schedule of stages.

``train_loop_per_worker(config)`` runs on every worker of a TorchTrainer; ``config["loop"]`` is
the :class:`~clo_ray.train.loop_config.LoopConfig` built by
:func:`clo_ray.train.trainer.loop_config`. It reads top to bottom:

1. process set-up: DeepSpeed on CPU without compiling (``DS_ACCELERATOR=cpu``, gloo);
2. model reference and tokenizer; the training pairs from storage;
3. where to start: fresh, or the last checkpoint Ray hands back after a failure or to a
   re-run of the same run name (stage, step, trained tensors, optimizer/LR state);
4. for each stage of the schedule:
   a. encode the pairs (4 sequences per CLO/DPO pair, 1-2 per SFT row);
   b. the model at the stage start: base weights + what earlier stages trained;
   c. reference log-probs of that model (clo, dpo), computed once, sharded across the
      workers and cached in storage by content key; no reference model stays in memory;
   d. the stage's trainable set (before DeepSpeed: ZeRO-3 partitions parameters), the
      client AdamW over it, transformers' LR schedule, ``deepspeed.initialize`` around a
      module whose forward returns summed response log-probs (only response positions go
      through the LM head: :mod:`clo_ray.train.logprobs`);
   e. the loop: per optimizer step, this worker's micro-batches of the global batch (the
      deterministic sample stream), one forward per micro-batch over its padded sequences,
      the stage's objective, backward, step; metrics via ``ray.train.report`` every
      ``report_every`` steps, a progress line from rank 0, checkpoints every
      ``checkpoint_every`` steps and at the stage end;
5. done: the last report carries the final checkpoint.

The set-up steps it calls (process, tokenizer, pairs, stage-start model, sample log) are the
small functions at the end of this module; checkpoints and the run's position are
:mod:`clo_ray.train.checkpoint`, the reference cache :mod:`clo_ray.train.reference`.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch
import torch

from clo_ray.data.pairs import read_pairs
from clo_ray.models.resolve import resolve_model
from clo_ray.train import checkpoint as ckpt
from clo_ray.train.batches import batches, collate, encode_examples
from clo_ray.train.deepspeed_config import deepspeed_config, prepare_cpu_deepspeed
from clo_ray.train.logprobs import ResponseLogps
from clo_ray.train.loop_config import LoopConfig
from clo_ray.train.metrics import MetricWindow, Progress
from clo_ray.train.objectives import OBJECTIVES, language_metrics
from clo_ray.train.reference import Shard, lookup, stage_reference, stage_reference_uri
from clo_ray.train.schedule import (
    SampleStream,
    build_lr_scheduler,
    build_optimizer,
    needs_reference,
    prepare_stage_model,
    rank_indices,
    stage_steps,
)

logger = logging.getLogger("clo_ray.train")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Train every stage of the loop config on this worker (see the module docstring)."""
    # ---- 1. process set-up
    cfg: LoopConfig = config["loop"]
    train = cfg.train
    setup_worker_process(cfg.resources.cpus_per_worker)
    prepare_cpu_deepspeed()
    import deepspeed

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    stages = list(cfg.stages)
    dtype = DTYPES[cfg.resources.precision]

    # ---- 2. model, tokenizer, pairs
    model_dir = resolve_model(cfg.model)
    tokenizer = load_tokenizer(model_dir)
    rows = read_pairs(cfg.pairs_uri, cfg.storage_options)
    totals = [stage_steps(stage, rows.num_rows, train.batch_pairs) for stage in stages]

    # ---- 3. where to start: fresh, or the last checkpoint
    run = ckpt.resume_point(ray.train.get_checkpoint(), cfg, totals, world)
    progress = Progress(totals, [s.name or s.loss for s in stages], run.global_step)
    # tokens_total: non-pad tokens trained since this run (or its last resume) started
    counters = {"reference_computed": 0, "resumed_from_step": run.global_step,
                "tokens_total": 0.0}
    if run.global_step and rank == 0:
        logger.info("resuming at stage %d step %d (global step %d)", run.stage, run.step,
                    run.global_step)
    if run.stage == len(stages):  # a finished run started again under its name
        ray.train.report({"step": run.global_step, **counters})
        return

    # ---- 4. the stages
    for index, stage in enumerate(stages):
        if index < run.stage:
            continue
        start = run.step if index == run.stage else 0

        # 4a. encode the pairs for this stage's loss
        examples = encode_examples(rows, tokenizer, loss=stage.loss,
                                   template=train.prompt_template,
                                   max_length=train.max_length,
                                   sft_data=stage.sft_data or "target",
                                   dpo_pairs=stage.dpo_pairs or "cross_lingual")

        # 4b. the model at the stage start
        model: Any = stage_start_model(model_dir, dtype, run.finished)  # a transformers model

        # 4c. reference log-probs of that model (cached in storage by content key)
        reference = None
        if needs_reference(stage):
            uri = stage_reference_uri(cfg, stage, index, run.finished)
            shard = Shard(rank, world, ray.train.torch.get_device())
            reference, computed = stage_reference(model, examples, uri, shard, config=cfg,
                                                  pad_id=tokenizer.pad_token_id)
            counters["reference_computed"] += computed

        # 4d. trainable set, optimizer, schedule, DeepSpeed
        model = prepare_stage_model(model, stage)
        if start:
            assert run.current is not None
            ckpt.assign_tensors(model, run.current.tensors)  # before ZeRO partitions them
        if train.gradient_checkpointing:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False})
        optimizer = build_optimizer(model, stage.lr, train.weight_decay)
        scheduler = build_lr_scheduler(optimizer, train.lr_scheduler, totals[index],
                                       stage.warmup_ratio)
        engine, _, _, _ = deepspeed.initialize(
            model=ResponseLogps(model), optimizer=optimizer, lr_scheduler=scheduler,
            config=deepspeed_config(train, cfg.resources, world))
        if start:
            engine.load_checkpoint(run.optimizer_dir, tag=ckpt.DS_TAG, load_module_strict=False)
            shutil.rmtree(run.checkpoint_dir or "", ignore_errors=True)  # all read now

        # 4e. the loop
        objective = OBJECTIVES[stage.loss]
        stream = SampleStream(rows.num_rows, seed=cfg.seed + index)
        window = MetricWindow()
        engine.train()
        for step in range(start, totals[index]):
            torch.manual_seed(cfg.seed * 1_000_000 + index * 100_000 + step)  # dropout
            global_indices = stream.indices(step * train.batch_pairs, train.batch_pairs)
            mine = rank_indices(global_indices, rank=rank, world=world,
                                micro=train.micro_batch_pairs)
            log_samples(cfg.sample_log, rank, index, step, [examples[i].key for i in mine])
            for micro_batch in batches(examples, mine, train.micro_batch_pairs):
                batch = {k: v.to(engine.device) for k, v in
                         collate(micro_batch, tokenizer.pad_token_id).items()}
                logps, n_tokens = engine(batch["input_ids"], batch["attention_mask"],
                                         batch["response_mask"])  # one forward, [S * P]
                shape = (len(micro_batch[0].input_ids), len(micro_batch))  # [S, P]
                policy, n_tokens = logps.view(shape), n_tokens.view(shape)
                ref = (lookup(reference, micro_batch, engine.device)
                       if reference is not None else None)
                result = objective(stage, policy, ref, n_tokens)
                engine.backward(result.loss)
                engine.step()
                window.add(result.metrics, len(micro_batch))
                if len(cfg.languages) > 1:
                    window.add_languages(language_metrics(
                        objective, stage, policy, ref, n_tokens,
                        [e.language for e in micro_batch]))
                window.tokens += int(batch["attention_mask"].sum())
            window.steps += 1
            if cfg.step_sleep_s:
                time.sleep(cfg.step_sleep_s)

            # metrics, progress line and checkpoint at this step
            at = ckpt.StagePosition(index, step + 1, totals, rows.num_rows)
            global_step = sum(totals[:index]) + at.done
            stop = global_step == cfg.stop_after_steps
            save = at.stage_end or stop or bool(
                train.checkpoint_every and at.done % train.checkpoint_every == 0)
            if not (save or at.done % train.report_every == 0):
                continue
            reduced = window.reduce()
            counters["tokens_total"] += reduced["tokens"]
            metrics = {**reduced, **counters, "stage": index, "stage_step": at.done,
                       "stage_steps": totals[index], "step": global_step,
                       "epoch": at.done * train.batch_pairs / rows.num_rows,
                       "lr": float(engine.lr_scheduler.get_last_lr()[0]),
                       "steps_total": sum(totals), "eta_s": progress.eta_s(global_step)}
            if rank == 0:
                logger.info(progress.line(index, at.done, global_step, metrics))
            if not save:
                ray.train.report(metrics)
                continue
            run.current = ckpt.trained_state(engine)  # gathered on every rank (ZeRO-3)
            with tempfile.TemporaryDirectory(prefix="clo-ckpt-") as directory:
                ckpt.save_checkpoint(Path(directory), engine, run, at, cfg)
                ray.train.report(metrics, checkpoint=ckpt.checkpoint_or_none(directory))
            if stop:
                engine.destroy()
                return

        # the stage is over: keep what it trained for the next stages, free DeepSpeed
        assert run.current is not None
        run.finished.append(run.current)
        engine.destroy()  # frees DeepSpeed's buffers and hooks before the next stage
        del engine, model, optimizer, scheduler, reference
        gc.collect()


# ------------------------------------------------------------------------ set-up steps


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


def load_tokenizer(model_dir: Path) -> Any:
    """The model's tokenizer, with a pad token (eos when it has none: pads are masked)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def stage_start_model(model_dir: Path, dtype: torch.dtype, finished: list[ckpt.StageState]
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


def log_samples(path: str | None, rank: int, stage: int, step: int, ids: list) -> None:
    """Append the pair ids this worker trains on at a step to ``<path>.rank<R>``.

    Off unless set (LoopConfig.sample_log): how the resume tests see the sample order a run
    really used.
    """
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with open(f"{path}.rank{rank}", "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"stage": stage, "step": step, "ids": ids}) + "\n")
