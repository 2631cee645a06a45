"""The per-worker training loop: one Ray Train worker, DeepSpeed, a schedule of stages.

``train_loop_per_worker(config)`` runs on every worker of a TorchTrainer (the config is
built by :func:`clo_ray.train.trainer.loop_config`). It reads top to bottom:

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

Config keys read only by this loop (testing / time-boxing): ``stop_after_steps`` (checkpoint
and return after that many global steps, as a preempted job would), ``sample_log`` (each
rank appends the pair keys of every step to ``<sample_log>.rank<R>``), ``step_sleep_s``.
"""

from __future__ import annotations

import gc
import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import ray.train
import torch

from clo_ray.models.resolve import resolve_model
from clo_ray.spec.training import StageSpec
from clo_ray.train import worker
from clo_ray.train.batches import batches, collate, encode_examples
from clo_ray.train.deepspeed_config import deepspeed_config, prepare_cpu_deepspeed
from clo_ray.train.logprobs import ResponseLogps
from clo_ray.train.metrics import MetricWindow, Progress
from clo_ray.train.objectives import OBJECTIVES, language_metrics
from clo_ray.train.reference import lookup
from clo_ray.train.schedule import (
    SampleStream,
    build_lr_scheduler,
    build_optimizer,
    prepare_stage_model,
    rank_indices,
    stage_steps,
)

logger = logging.getLogger("clo_ray.train")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Train every stage of ``config["stages"]`` on this worker (see the module docstring)."""
    # ---- 1. process set-up
    train, resources = config["train"], config["resources"]
    worker.setup_worker_process(resources["cpus_per_worker"])
    prepare_cpu_deepspeed()
    import deepspeed

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    stages = [StageSpec.model_validate(stage) for stage in config["stages"]]
    dtype = DTYPES[resources["precision"]]

    # ---- 2. model, tokenizer, pairs
    model_dir = resolve_model(config["model"])
    tokenizer = worker.load_tokenizer(model_dir)
    rows = worker.read_pairs(config["pairs_uri"], config.get("storage_options"))
    config = {**config, "n_pairs": rows.num_rows}
    totals = [stage_steps(stage, rows.num_rows, train["batch_pairs"]) for stage in stages]

    # ---- 3. where to start: fresh, or the last checkpoint
    run = worker.resume_point(ray.train.get_checkpoint(), config, totals, world)
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
                                   template=train["prompt_template"],
                                   max_length=train["max_length"],
                                   sft_data=stage.sft_data or "target")

        # 4b. the model at the stage start
        model = worker.stage_start_model(model_dir, dtype, run.finished)

        # 4c. reference log-probs of that model (cached in storage by content key)
        reference, computed = worker.stage_reference(model, examples, stage, index, config,
                                                 run.finished, tokenizer.pad_token_id)
        counters["reference_computed"] += computed

        # 4d. trainable set, optimizer, schedule, DeepSpeed
        model = prepare_stage_model(model, stage)
        if start:
            worker.assign_current(model, run)
        if train["gradient_checkpointing"]:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False})
        optimizer = build_optimizer(model, stage.lr, train["weight_decay"])
        scheduler = build_lr_scheduler(optimizer, train["lr_scheduler"], totals[index],
                                       stage.warmup_ratio)
        engine, _, _, _ = deepspeed.initialize(
            model=ResponseLogps(model), optimizer=optimizer, lr_scheduler=scheduler,
            config=deepspeed_config(train, resources, world))
        if start:
            engine.load_checkpoint(run.optimizer_dir, tag=worker.DS_TAG,
                                   load_module_strict=False)
            shutil.rmtree(run.checkpoint_dir, ignore_errors=True)  # all read now

        # 4e. the loop
        objective = OBJECTIVES[stage.loss]
        stream = SampleStream(rows.num_rows, seed=config["seed"] + index)
        window = MetricWindow()
        engine.train()
        for step in range(start, totals[index]):
            torch.manual_seed(config["seed"] * 1_000_000 + index * 100_000 + step)  # dropout
            global_indices = stream.indices(step * train["batch_pairs"], train["batch_pairs"])
            mine = rank_indices(global_indices, rank=rank, world=world,
                                micro=train["micro_batch_pairs"])
            worker.log_samples(config, rank, index, step, [examples[i].key for i in mine])
            for micro_batch in batches(examples, mine, train["micro_batch_pairs"]):
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
                if len(config["languages"]) > 1:
                    window.add_languages(language_metrics(
                        objective, stage, policy, ref, n_tokens,
                        [e.language for e in micro_batch]))
                window.tokens += int(batch["attention_mask"].sum())
            window.steps += 1
            if config.get("step_sleep_s"):
                time.sleep(config["step_sleep_s"])

            # metrics, progress line and checkpoint at this step
            done = step + 1
            global_step = sum(totals[:index]) + done
            stop = global_step == config.get("stop_after_steps")
            stage_end = done == totals[index]
            save = stage_end or stop or bool(
                train["checkpoint_every"] and done % train["checkpoint_every"] == 0)
            if not (save or done % train["report_every"] == 0):
                continue
            reduced = window.reduce()
            counters["tokens_total"] += reduced["tokens"]
            metrics = {**reduced, **counters, "stage": index, "stage_step": done,
                       "stage_steps": totals[index], "step": global_step,
                       "epoch": done * train["batch_pairs"] / rows.num_rows,
                       "lr": float(engine.lr_scheduler.get_last_lr()[0])}
            if rank == 0:
                logger.info(progress.line(index, done, global_step, metrics))
            if not save:
                ray.train.report(metrics)
                continue
            current = worker.trained_state(engine)  # gathered on every rank (ZeRO-3)
            with tempfile.TemporaryDirectory(prefix="clo-ckpt-") as directory:
                worker.save_checkpoint(Path(directory), engine, current, index, done, totals,
                                       run, config, with_optimizer=not stage_end)
                ray.train.report(metrics, checkpoint=worker.checkpoint_or_none(directory))
            if stop:
                engine.destroy()
                return

        # the stage is over: keep what it trained for the next stages, free DeepSpeed
        run.finished.append(current)
        engine.destroy()  # frees DeepSpeed's buffers and hooks before the next stage
        del engine, model, optimizer, scheduler, reference
        gc.collect()
