"""One CLO training step, four ways, on SmolLM2-135M (prints numbers; not a test).

    .venv/bin/python bench/train_step.py            # all 30 layers
    .venv/bin/python bench/train_step.py --quick    # the first 6 layers

Same 4 Swahili/English pairs from the bundled sample for every variant (16 sequences per step:
CLO's 4 per pair, or TRL's 8 preference rows x chosen/rejected), same max length, fp32, each
variant in its own process, one after the other:

(a) clo-ray as the engine runs it: ``run_training`` -> a Ray Train worker -> DeepSpeed
    (1 worker, ZeRO-0 by default), attention-only, reference log-probs from the cache
    (computed before the loop), no gradient checkpointing; s/step from the loop's reports;
(b) TRL ``DPOTrainer`` with its defaults (full model, a reference model forward every step,
    gradient checkpointing on), on the equivalent preference rows;
(c) TRL with ``precompute_ref_log_probs=True``, attention-only, gradient checkpointing off;
(d) a bare single-process PyTorch step: one padded batch, precomputed reference, CLO loss,
    attention-only AdamW with clipping, the same response-only LM head as (a)
    (:mod:`clo_ray.train.logprobs`): the floor our machinery adds to.

TRL is not a clo-ray dependency: (b)/(c) run in a separate venv (``$CLO_RAY_TRL_VENV``, default
``~/.cache/clo-ray/venv-trl``) that sees the project venv's packages and adds
``trl==1.16.0`` with torch pinned (see environment.md); if that cannot be built, (b)/(c) are
skipped with a message. Printed: s/step (median after warm-up; with ``--rounds N`` the best of N
interleaved rounds, for a shared machine), CPU seconds per step (all threads of the training
process: less sensitive to other load), tokens/s (non-pad tokens of the batch / s/step), peak
RSS of the training process, and the speed ratios a/b, a/c, a/d.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

PAIRS, LANGUAGE, LR = 4, "sw", 1e-5
TEMPLATE = "### Instruction:\n{prompt}\n\n### Response:\n"  # unused: SmolLM2 has a chat template
TRL_VERSION = "1.16.0"


# ------------------------------------------------------------------------- shared inputs


def model_dir(quick: bool) -> Path:
    """SmolLM2-135M (builtin), or a cached copy of its first 6 layers for --quick."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from clo_ray.models.resolve import default_cache_dir, resolve_model

    full = resolve_model("builtin:smollm2-135m")
    if not quick:
        return full
    out = default_cache_dir() / f"bench-{full.name}-6layers"
    if not (out / "config.json").is_file():
        model = AutoModelForCausalLM.from_pretrained(full, dtype=torch.float32)
        model.model.layers = model.model.layers[:6]
        model.config.num_hidden_layers = 6
        if getattr(model.config, "layer_types", None):
            model.config.layer_types = model.config.layer_types[:6]
        model.save_pretrained(out)
        AutoTokenizer.from_pretrained(full).save_pretrained(out)
    return out


def sample_rows(n: int):
    """The first ``n`` pairs of the bundled sample in the translate stage's schema."""
    import pyarrow as pa

    from clo_ray.assets import parallel_sample_path
    from clo_ray.data.corpus import content_id

    rows = []
    for line in parallel_sample_path().read_text(encoding="utf-8").splitlines()[:n]:
        text = json.loads(line)["text"]
        en, tr = text["en"], text[LANGUAGE]
        rows.append({"id": content_id(en["prompt"], en["response"]), "language": LANGUAGE,
                     "prompt_en": en["prompt"], "response_en": en["response"],
                     "prompt": tr["prompt"], "response": tr["response"], "reasons": []})
    return pa.Table.from_pylist(rows)


def pairs_table():
    """The PAIRS training pairs every variant uses: those the engine's own split (seed 0,
    one pair held out) takes from the first PAIRS + 1 sample rows, which (a) is given."""
    from clo_ray.data.pairs import split_pairs

    return split_pairs(sample_rows(PAIRS + 1), budget=PAIRS, holdout=1, seed=0).train


def encoded(path: Path, max_length: int):
    """(tokenizer, CLO examples of the pairs, non-pad tokens of one step)."""
    from transformers import AutoTokenizer

    from clo_ray.train.batches import encode_examples

    tokenizer = AutoTokenizer.from_pretrained(path)
    examples = encode_examples(pairs_table(), tokenizer, loss="clo", template=TEMPLATE,
                               max_length=max_length)
    return tokenizer, examples, sum(len(s) for e in examples for s in e.input_ids)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ------------------------------------------------------------------------------ variants


def variant_a(path: Path, args: argparse.Namespace) -> dict:
    """clo-ray: run_training on one Ray Train worker with DeepSpeed."""
    import ray

    from clo_ray.data.pairs import prepare_pairs
    from clo_ray.ray_env import ray_runtime_env
    from clo_ray.spec.schema import load_spec
    from clo_ray.train.trainer import TrainRun, read_history, run_training

    storage = Path(tempfile.mkdtemp(prefix="bench-a-"))
    steps = args.warmup + args.steps
    spec = load_spec({
        "run": {"name": "bench", "storage": str(storage)},
        "corpus": {"path": "builtin:parallel-sample"},
        "translator": {"backend": "parallel"},
        "languages": [LANGUAGE],
        "models": [{"name": str(path)}],
        "schedules": {"clo": [{"loss": "clo", "modules": "attention", "steps": steps,
                               "lr": LR, "warmup_ratio": 0.0}]},
        "methods": ["clo"],
        "budgets": [PAIRS],
        "resources": {"workers_per_trial": 1, "cpus_per_worker": os.cpu_count(),
                      "zero_stage": args.zero_stage, "precision": "fp32"},
        "train": {"batch_pairs": PAIRS, "micro_batch_pairs": PAIRS,
                  "max_length": args.max_length, "report_every": 1,
                  "gradient_checkpointing": False},
        "evaluation": {"holdout": 1},
    })
    # Ray starts its workers at nice 15; the other variants run at 0. On a box shared with
    # other work that alone starves (a), so level it (a dedicated cluster does not care).
    os.environ.setdefault("RAY_worker_niceness", "0")
    ray.init(num_cpus=os.cpu_count(), runtime_env=ray_runtime_env())  # with its dashboard
    try:
        pairs = prepare_pairs(spec, {LANGUAGE: sample_rows(PAIRS + 1)}, [LANGUAGE], PAIRS)
        result = run_training(spec, pairs, model=str(path), method="clo",
                              run=TrainRun(name="bench"))
    finally:
        ray.shutdown()
    history = read_history(str(storage / "bench" / "train" / "bench" / "history.jsonl"))
    times = [row["step_time_s"] for row in history][args.warmup:]
    cpu = [row["cpu_s_per_step"] for row in history][args.warmup:]
    return {"times": times, "cpu": cpu, "peak_rss_mb": max(row["peak_rss_mb"] for row in history),
            "note": f"1 Ray Train worker, DeepSpeed ZeRO-{args.zero_stage}, reference "
                    f"computed={result.metrics['reference_computed']} before the loop"}


def variant_d(path: Path, args: argparse.Namespace) -> dict:
    """Bare PyTorch: one padded batch, precomputed reference, attention-only AdamW."""
    import torch
    from transformers import AutoModelForCausalLM

    from clo_ray.models.selectors import select_parameters
    from clo_ray.train.batches import collate
    from clo_ray.train.logprobs import response_logps
    from clo_ray.train.losses import clo_loss
    from clo_ray.train.reference import compute_reference_logps

    tokenizer, examples, _ = encoded(path, args.max_length)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.config.use_cache = False
    reference = compute_reference_logps(model, examples, micro_batch=PAIRS,
                                        pad_id=tokenizer.pad_token_id).T.contiguous()
    trainable = set(select_parameters(model, ["attention"]))
    for name, param in model.named_parameters():
        param.requires_grad_(name in trainable)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR)
    batch = collate(examples, tokenizer.pad_token_id)
    model.train()
    times, cpu = [], []
    for _ in range(args.warmup + args.steps):
        start, cpu_start = time.perf_counter(), time.process_time()
        logps, n_tokens = response_logps(model, batch["input_ids"], batch["attention_mask"],
                                         batch["response_mask"])
        out = clo_loss(logps.view(4, PAIRS), reference, n_tokens.view(4, PAIRS))
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - cpu_start)
    return {"times": times[args.warmup:], "cpu": cpu[args.warmup:], "peak_rss_mb": peak_rss_mb(),
            "note": "single process, torch AdamW, grad clip 1.0, response-only head"}


def _trl(path: Path, args: argparse.Namespace, *, tuned: bool) -> dict:
    """TRL DPOTrainer on the pairs' 8 preference rows (both CLO directions)."""
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from clo_ray.models.selectors import select_parameters
    from clo_ray.train.batches import format_prompt

    tokenizer, _, _ = encoded(path, args.max_length)
    rows = []
    for row in pairs_table().to_pylist():
        x_en = format_prompt(tokenizer, row["prompt_en"], TEMPLATE)
        x_l = format_prompt(tokenizer, row["prompt"], TEMPLATE)
        rows.append({"prompt": x_en, "chosen": row["response_en"], "rejected": row["response"]})
        rows.append({"prompt": x_l, "chosen": row["response"], "rejected": row["response_en"]})
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    extra = {}
    if tuned:
        trainable = set(select_parameters(model, ["attention"]))
        for name, param in model.named_parameters():
            param.requires_grad_(name in trainable)
        extra = {"precompute_ref_log_probs": True, "gradient_checkpointing": False,
                 "learning_rate": LR}
    times: list[float] = []
    cpu: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *_, **__):
            self.start, self.cpu_start = time.perf_counter(), time.process_time()

        def on_step_end(self, *_, **__):
            times.append(time.perf_counter() - self.start)
            cpu.append(time.process_time() - self.cpu_start)

    config = DPOConfig(output_dir=tempfile.mkdtemp(prefix="bench-trl-"), bf16=False,
                       per_device_train_batch_size=2 * PAIRS, max_steps=args.warmup + args.steps,
                       max_length=args.max_length, report_to=[], save_strategy="no",
                       logging_steps=1, **extra)
    trainer = DPOTrainer(model=model, args=config, processing_class=tokenizer,
                         train_dataset=datasets.Dataset.from_list(rows), callbacks=[Timer()])
    trainer.train()
    settings = ", ".join(f"{k}={v}" for k, v in extra.items() if k != "learning_rate")
    return {"times": times[args.warmup:], "cpu": cpu[args.warmup:], "peak_rss_mb": peak_rss_mb(),
            "note": f"trl {__import__('trl').__version__}; "
                    + (f"attention-only, {settings}" if tuned else "defaults (full model, "
                       "reference model, gradient checkpointing)")}


VARIANTS = {
    "a": ("clo-ray (Ray Train + DeepSpeed)", variant_a),
    "b": ("TRL DPOTrainer, defaults", lambda p, a: _trl(p, a, tuned=False)),
    "c": ("TRL, precomputed ref, attention-only", lambda p, a: _trl(p, a, tuned=True)),
    "d": ("bare PyTorch step", variant_d),
}


# ------------------------------------------------------------------------------ the driver


def trl_python() -> str | None:
    """A python that imports trl: the bench venv, created on first use; None if impossible."""
    venv = Path(os.environ.get("CLO_RAY_TRL_VENV",
                               Path.home() / ".cache" / "clo-ray" / "venv-trl"))
    python = venv / "bin" / "python"
    check = [str(python), "-c", "import trl, torch"]
    if python.exists() and subprocess.run(check, capture_output=True).returncode == 0:
        return str(python)
    import torch
    import transformers

    try:
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        site = Path(torch.__file__).parent.parent  # the project venv's site-packages
        (venv / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" /
         "site-packages" / "_clo_ray_project.pth").write_text(
            f"import site; site.addsitedir({str(site)!r})\n")
        subprocess.run([str(python), "-m", "pip", "install", "-q", f"trl=={TRL_VERSION}",
                        f"torch=={torch.__version__.split('+')[0]}",
                        f"transformers=={transformers.__version__}"], check=True, timeout=900)
        subprocess.run(check, check=True, capture_output=True)
    except (subprocess.SubprocessError, OSError) as err:
        print(f"skipping TRL variants (b), (c): cannot build a venv with trl ({err})")
        return None
    return str(python)


def run_variant(key: str, python: str, args: argparse.Namespace) -> dict | None:
    """Run one variant in its own process; its JSON result, or None if it failed."""
    out = Path(tempfile.mkdtemp(prefix="bench-")) / "result.json"
    command = [python, __file__, "--variant", key, "--json", str(out),
               "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--max-length", str(args.max_length), "--zero-stage", str(args.zero_stage)]
    if args.quick:
        command.append("--quick")
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0 or not out.exists():
        print(f"({key}) failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
        return None
    result = json.loads(out.read_text())
    result["wall_s"] = time.perf_counter() - started
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="first 6 layers only")
    parser.add_argument("--steps", type=int, default=5, help="measured steps per variant")
    parser.add_argument("--warmup", type=int, default=1, help="steps not measured")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--zero-stage", type=int, default=0, help="(a)'s ZeRO stage")
    parser.add_argument("--variants", default="abcd")
    parser.add_argument("--rounds", type=int, default=1, help="interleaved repetitions")
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--json", help=argparse.SUPPRESS)
    args = parser.parse_args()

    path = model_dir(args.quick)
    if args.variant:  # a child process: measure one variant, write its JSON
        result = VARIANTS[args.variant][1](path, args)
        result["tokens_per_step"] = encoded(path, args.max_length)[2]
        Path(args.json).write_text(json.dumps(result))
        return

    trl = trl_python() if set(args.variants) & {"b", "c"} else None
    runs: dict[str, list[dict]] = {key: [] for key in args.variants}
    for _ in range(args.rounds):  # interleaved, so a busy spell hits every variant alike
        for key in args.variants:
            python = trl if key in "bc" else sys.executable
            result = run_variant(key, python, args) if python else None
            if result is not None:
                runs[key].append(result)
    report(runs, args)


def report(runs: dict[str, list[dict]], args: argparse.Namespace) -> None:
    """The table and the ratios: per variant, the best round's median (wall and CPU)."""
    layers = 6 if args.quick else 30
    print(f"\nSmolLM2-135M, {layers} layers, {PAIRS} pairs/step (16 sequences), max length "
          f"{args.max_length}, fp32, {os.cpu_count()} CPUs; per variant the best of "
          f"{args.rounds} round(s) of the median of {args.steps} steps after {args.warmup} "
          f"warm-up; load average now {os.getloadavg()[0]:.1f}")
    print(f"{'variant':44} {'s/step':>7} {'CPU s':>7} {'tokens/s':>9} {'peak RSS':>9}  notes")
    wall, cpu = {}, {}
    for key, results in runs.items():
        if not results:
            continue
        wall[key] = min(statistics.median(r["times"]) for r in results)
        cpu[key] = min(statistics.median(r["cpu"]) for r in results)
        tokens, rss = results[0]["tokens_per_step"], max(r["peak_rss_mb"] for r in results)
        print(f"({key}) {VARIANTS[key][0]:40} {wall[key]:7.2f} {cpu[key]:7.2f} "
              f"{tokens / wall[key]:9.0f} {rss:7.0f}MB  {results[0]['note']}")
    for other, target in (("b", 2.5), ("c", 1.5), ("d", 0.9)):
        if "a" in wall and other in wall:
            print(f"a/{other} speed ratio: {wall[other] / wall['a']:.2f} wall-clock, "
                  f"{cpu[other] / cpu['a']:.2f} by CPU time (target >= {target})")


if __name__ == "__main__":
    main()
