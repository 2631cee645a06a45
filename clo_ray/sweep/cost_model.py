"""What a sweep costs in device time, phase by phase, for ``--plan``.

Training FLOPs alone (the plan's first model) leave out everything around them: starting a
trial's worker group, loading weights, checkpoints, exporting the trained model, the
evaluation's generations and benchmarks, the base models' evaluation, translation and a local
judge. On the paper grid those are most of the bill. Each phase here is a rate times an
amount the spec fixes, and every rate is printed with the plan, so a user who measured their
own cluster can see which number to change (``resources.assumed_tflops_per_worker`` for the
compute rate; the others are module constants).

The GPU rates are hardware figures at stated utilisations (an H100 SXM: 989 dense bf16
TFLOP/s, 3.35 TB/s HBM): no GPU run of this engine has been timed yet. The CPU rates were
fitted to the smoke sweep's measured trials (sweeps/smoke.yaml on 2 idle cores; the phases
the sweep logs), and tests/test_plan.py checks the plan against those measurements.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

from clo_ray.languages import LANGUAGES
from clo_ray.spec.schema import SweepSpec
from clo_ray.spec.training import REFERENCE_LOSSES
from clo_ray.sweep.eval_plan import EvalCounts

# Target-language tokens per English token for Llama-style (English-centric) tokenizers.
SCRIPT_EXPANSION = {"Latn": 1.5, "Hans": 1.4, "Kore": 2.5}
OTHER_SCRIPT_EXPANSION = 2.0
GPU_TFLOPS = 400.0  # sustained bf16 TFLOP/s per GPU: ~40% of an H100's 989 dense peak
CPU_TFLOPS_PER_CORE = 0.035  # fp32 TFLOP/s per core a worker uses (torch threads: >= 1)
# Fraction of a Llama-style model's parameters in each module set (attention 4d^2 of a
# layer's ~12d^2; the MLP the rest; embeddings and head small next to the layers at 7B).
MODULE_FRACTION = {"attention": 0.33, "mlp": 0.62, "embeddings": 0.02, "norms": 0.0,
                   "lm_head": 0.02, "all": 1.0}
LORA_FRACTION = 0.01
# lm-eval benchmarks: (questions per language, answer choices, English tokens per request
# at 0 shots). MMMLU: MMLU's 14,042 test questions; BELEBELE: 900 passages' questions.
BENCHMARK_SIZE = {"mmmlu": (14042, 4, 170), "belebele": (900, 4, 230)}
TEMPLATE_TOKENS = 40  # per sequence: the prompt template, role markers, BOS/EOS
JUDGE_PROMPT_TOKENS = 180  # the judge's instruction (~120) and the question, besides the answers


@dataclass(frozen=True)
class Rates:
    """Throughputs one trial sees (printed with the plan)."""

    device: str  # "GPU" or "CPU": the unit of device-hours
    train_flops: float  # FLOP/s of the trial's workers together
    train_devices: float  # GPUs (or CPU cores) the trial's workers hold
    eval_flops: float  # FLOP/s of the evaluation task (one GPU, or its cores)
    eval_devices: float
    decode_bytes: float  # weight bytes/s read per decoding step (memory bound)
    decode_batch: int  # sequences decoded together
    weight_bytes: float  # bytes per parameter of the evaluated model (bf16 GPU, fp32 CPU)
    read_bytes: float  # bytes/s reading weights (local cache / NVMe)
    write_bytes: float  # bytes/s writing checkpoints and exports (run storage, local disk)
    start_s: float  # per trial: Tune trial, Train worker group, DeepSpeed init, eval task
    translate_tokens: float  # target tokens/s per translator actor


GPU_START_S = 120.0  # CPU measured ~40 s; GPU adds CUDA contexts, NCCL and ZeRO-3 init
GPU_DECODE_BYTES = 2.0e12  # ~60% of an H100's 3.35 TB/s
GPU_VLLM_BATCH = 128  # vLLM's continuous batching keeps this many sequences in flight
GPU_READ_BYTES = 2.0e9  # safetensors from a warm local cache / NVMe
GPU_WRITE_BYTES = 1.0e9  # to object storage (s3:// / gs://) from one node
GPU_TRANSLATE_TOKENS = 2000.0  # M2M100-1.2B on one L4/L40S, batched generate (a guess)
# Fitted to the smoke sweep (2 idle cores; see the module docstring): a trial's start-up
# (Tune trial, Train worker group, DeepSpeed) ~30 s, the evaluation task's (a new process
# importing torch and transformers) ~20 s.
CPU_START_S = 50.0
CPU_DECODE_BYTES = 2.0e9
CPU_READ_BYTES = 0.5e9
CPU_WRITE_BYTES = 0.5e9
CPU_TRANSLATE_TOKENS = 50.0


def rates(spec: SweepSpec, train_flops_per_worker: float) -> Rates:
    """The rates of this spec's trials: GPU figures when workers hold GPUs, else CPU ones."""
    res, evaluation = spec.resources, spec.evaluation
    if res.gpus_per_worker > 0:
        per_gpu = train_flops_per_worker / res.gpus_per_worker
        batch = evaluation.batch_size if evaluation.backend == "transformers" else GPU_VLLM_BATCH
        return Rates("GPU", train_flops_per_worker * res.workers_per_trial,
                     res.workers_per_trial * res.gpus_per_worker, per_gpu, 1.0,
                     GPU_DECODE_BYTES, batch, 2.0, GPU_READ_BYTES, GPU_WRITE_BYTES,
                     GPU_START_S, GPU_TRANSLATE_TOKENS)
    cores = min(res.workers_per_trial * res.cpus_per_worker, max(res.cpus_per_worker, 1.0)) + 1
    return Rates("CPU", train_flops_per_worker * res.workers_per_trial,
                 res.workers_per_trial * max(1.0, res.cpus_per_worker),
                 CPU_TFLOPS_PER_CORE * 1e12 * cores, cores,
                 CPU_DECODE_BYTES, evaluation.batch_size, 4.0, CPU_READ_BYTES, CPU_WRITE_BYTES,
                 CPU_START_S, CPU_TRANSLATE_TOKENS)


@dataclass(frozen=True)
class TrialTime:
    """Seconds one trial spends in each phase (its device-hours: see :meth:`device_hours`)."""

    start: float = 0.0  # trial + worker group + evaluation task start-up
    load: float = 0.0  # base weights into the workers
    train: float = 0.0  # forward + backward (+ recomputation with gradient checkpointing)
    reference: float = 0.0  # reference log-probs of later stages (the first is shared)
    checkpoint: float = 0.0  # trained tensors (+ optimizer state mid-stage) to storage
    export: float = 0.0  # base + trained weights written as a full model, read back
    generate: float = 0.0  # held-out and prompt-set answers
    heldout: float = 0.0  # held-out log-probs (CLO's preference metrics, NLL)
    benchmarks: float = 0.0  # lm-eval tasks (target language + English)

    TRAINING = ("start", "load", "train", "reference", "checkpoint")

    def device_hours(self, rate: Rates) -> dict[str, float]:
        """Per phase: seconds x the devices held (the workers' while training, the
        evaluation task's after)."""
        return {f.name: getattr(self, f.name) / 3600 * (
            rate.train_devices if f.name in self.TRAINING else rate.eval_devices)
            for f in fields(self)}

    @property
    def seconds(self) -> float:
        return sum(getattr(self, f.name) for f in fields(self))


def trainable_fraction(modules: list[str], lora: bool) -> float:
    """Share of the parameters a stage trains (weight gradients and checkpoints scale with it)."""
    if lora:
        return LORA_FRACTION
    return min(1.0, sum(MODULE_FRACTION.get(m, 0.0) for m in modules))


def train_flops_per_token(params: float, trained: float, recompute: bool) -> float:
    """Forward (2P) + activation gradients (2P) + weight gradients of what is trained (2fP),
    + a second forward with gradient checkpointing."""
    return params * (4.0 + 2.0 * trained + (2.0 if recompute else 0.0))


def stage_pairs(spec: SweepSpec, stage: Any, budget: int) -> float:
    """Pairs a stage trains on: epochs x budget, or steps x ``train.batch_pairs`` (one of
    the two is set)."""
    return stage.epochs * budget if stage.epochs else (stage.steps or 0) * spec.train.batch_pairs


def stage_times(spec: SweepSpec, schedule: str, budget: int, params: float,
                per_pair: list[float], rate: Rates) -> tuple[float, float, float]:
    """(training s, later-stage reference s, checkpoint s) of one trial's schedule;
    ``per_pair``: each stage's tokens per pair."""
    train = reference = checkpoint = 0.0
    for i, (stage, tokens) in enumerate(zip(spec.stages(schedule), per_pair, strict=True)):
        pairs = stage_pairs(spec, stage, budget)
        trained = trainable_fraction(stage.modules, stage.lora is not None)
        flops = train_flops_per_token(params, trained, spec.train.gradient_checkpointing)
        train += pairs * tokens * flops / rate.train_flops
        if i > 0 and tokens and stage.loss in REFERENCE_LOSSES:
            reference += budget * tokens * 2 * params / rate.train_flops
        steps = max(1, math.ceil(pairs / spec.train.batch_pairs))
        mid = (steps - 1) // spec.train.checkpoint_every if spec.train.checkpoint_every else 0
        tensors = trained * params * 2  # bf16 tensors, gathered
        checkpoint += (tensors + mid * (tensors + 12 * trained * params)) / rate.write_bytes
    return train, reference, checkpoint


def generation_seconds(generations: int, new_tokens: int, params: float, rate: Rates) -> float:
    """Decoding is memory bound: each step reads the weights once for a batch of sequences."""
    steps = math.ceil(generations / rate.decode_batch) * new_tokens
    return steps * params * rate.weight_bytes / rate.decode_bytes


def benchmark_seconds(spec: SweepSpec, language_expansion: float, params: float,
                      rate: Rates) -> tuple[float, list[str]]:
    """lm-eval's log-likelihood requests (target language and English) as forward passes;
    the names of benchmarks without a size here (not costed)."""
    from clo_ray.benchmarks import BENCHMARKS

    seconds, unknown = 0.0, []
    for name in spec.evaluation.benchmarks:
        if name not in BENCHMARK_SIZE:
            unknown.append(name)
            continue
        questions, choices, tokens = BENCHMARK_SIZE[name]
        shots = spec.evaluation.benchmark_shots.get(name, BENCHMARKS[name].shots)
        per_request = tokens * (shots + 1)
        requests = questions * choices
        total_tokens = requests * per_request * (1 + language_expansion)
        seconds += total_tokens * 2 * params / rate.eval_flops
    return seconds, unknown


def expansion(language: str) -> float:
    """Target tokens per English token for ``language`` (by its script)."""
    return SCRIPT_EXPANSION.get(LANGUAGES[language].script, OTHER_SCRIPT_EXPANSION)


def stage_tokens(loss: str, sft_data: str | None, english: float, target: float) -> float:
    """Tokens one pair contributes to a stage (all its sequences, each with the prompt
    template's tokens)."""
    english, target = english + TEMPLATE_TOKENS, target + TEMPLATE_TOKENS
    if loss in REFERENCE_LOSSES:
        return 2 * (english + target)
    return {"target": target, "english": english}.get(sft_data or "", english + target)


def rates_note(spec: SweepSpec, rate: Rates, per_worker: float) -> str:
    res = spec.resources
    gpu = rate.device == "GPU"
    source = "" if res.assumed_tflops_per_worker else \
        f" ({GPU_TFLOPS:g} per GPU = ~40% of an H100's dense bf16 peak)" if gpu else \
        f" ({CPU_TFLOPS_PER_CORE:g} per CPU core)"
    return (f"rates: training {per_worker:g} TFLOP/s per worker{source} x "
            f"{res.workers_per_trial} workers; evaluation on {rate.eval_devices:g} "
            f"{rate.device}{'s' if rate.eval_devices != 1 else ''} at "
            f"{rate.eval_flops / 1e12:g} TFLOP/s, decoding {rate.decode_bytes / 1e9:g} GB/s of "
            f"weights for {rate.decode_batch} sequences at a time; weights read at "
            f"{rate.read_bytes / 1e9:g} GB/s, written at {rate.write_bytes / 1e9:g} GB/s; "
            f"{rate.start_s:g} s start-up per trial; translation {rate.translate_tokens:g} "
            f"tokens/s per actor; {rate.device}-hours = seconds x the {rate.device}s held "
            f"({rate.train_devices:g} while training, {rate.eval_devices:g} while evaluating)")


def evaluation_time(spec: SweepSpec, counts: EvalCounts, params: float, rate: Rates,
                     english: float, target: float, unpriced: set[str]) -> TrialTime:
    """The evaluation phases of one evaluated model (trial or base) in ``language``."""
    evaluation = spec.evaluation
    generate = generation_seconds(counts.generations, evaluation.max_new_tokens, params, rate)
    heldout = evaluation.holdout * stage_tokens("clo", None, english, target) * 2 * params \
        / rate.eval_flops
    benchmarks, unknown = benchmark_seconds(spec, target / english, params, rate)
    unpriced.update(unknown)
    load = params * rate.weight_bytes / rate.read_bytes
    return TrialTime(load=load, generate=generate, heldout=heldout, benchmarks=benchmarks)


def trial_time(spec: SweepSpec, schedule: str, budget: int, params: float, rate: Rates,
                english: float, target: float, evaluated: TrialTime) -> TrialTime:
    per_pair = [stage_tokens(st.loss, st.sft_data, english, target)
                for st in spec.stages(schedule)]
    train, reference, checkpoint = stage_times(spec, schedule, budget, params, per_pair, rate)
    load = params * 2 / rate.read_bytes
    # export: base weights read (bf16), the full model written in fp32 to a local temporary
    # folder and read back by the evaluation
    export = params * 2 / rate.read_bytes + params * 4 / rate.write_bytes + \
        params * 4 / rate.read_bytes
    return TrialTime(rate.start_s, load, train, reference, checkpoint, export,
                     evaluated.generate, evaluated.heldout, evaluated.benchmarks)


def translation_hours(spec: SweepSpec, counts: EvalCounts, rows: int | None,
                       english: float, rate: Rates) -> float:
    """Device-hours of translating the corpus rows the sweep uses (the largest budget plus
    the held-out pairs) and the prompt sets, once per language (cached afterwards)."""
    if spec.translator.backend == "parallel":
        return 0.0
    used = max(spec.budgets) + spec.evaluation.holdout
    used = min(used, rows) if rows is not None else used
    tokens = sum(used * english * expansion(lang) for lang in spec.languages)
    tokens += counts.translated * english / 2 * OTHER_SCRIPT_EXPANSION
    gpus = spec.translator.gpus_per_actor if rate.device == "GPU" else 1.0
    return tokens / rate.translate_tokens / 3600 * gpus


def judge_hours(spec: SweepSpec, counts: EvalCounts, rate: Rates) -> float:
    """A judge model on the sweep's own devices: prompt read (forward) + a short verdict."""
    judge = spec.evaluation.judge
    if not judge.enabled or judge.backend == "endpoint" or not counts.judge_calls:
        return 0.0
    from clo_ray.models.resolve import parameter_count

    params = parameter_count(judge.model) if judge.model else None
    if not params:
        return 0.0
    prompt = JUDGE_PROMPT_TOKENS + 2 * spec.evaluation.max_new_tokens
    read = counts.judge_calls * prompt * 2 * params / rate.eval_flops
    verdicts = generation_seconds(counts.judge_calls, judge.max_new_tokens, params, rate)
    return (read + verdicts) / 3600 * rate.eval_devices
