"""The cost of a CRPO step next to a CLO step on the same model (prints numbers; not a test).

    .venv/bin/python bench/crpo_step.py --quick      # SmolLM2-135M's first 6 layers (~4 min)
    .venv/bin/python bench/crpo_step.py              # all 30 layers (~50 s a step on 2 cores)

One process, the engine's own pieces without Ray or DeepSpeed: the same 4 Swahili preference
rows of the built-in preference sample, encoded by :func:`clo_ray.train.batches.encode_examples`
for each loss (4 sequences per row either way: CLO's cross-lingual rows, CRPO's four answers to
the target prompt, CRPO's monolingual DPO pairs), one forward of the 16 sequences through
:class:`~clo_ray.train.logprobs.ResponseLogps`, the stage objective
(:data:`clo_ray.train.objectives.OBJECTIVES`) against precomputed reference log-probs, backward,
AdamW with clipping. Every variant trains the same parameters (all of them, so only the
loss and the batch layout differ; ``--modules attention`` for CLO's paper setting), fp32.
Variants run interleaved for ``--rounds`` rounds (a shared box drifts); printed per variant:
s/step (the median of each round's median, after warm-up), tokens per step, and the ratio to
CLO. The loss arithmetic itself is microseconds: what differs is the sequences' lengths.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from train_step import TEMPLATE, model_dir  # noqa: E402  (bench/ is on the path above)

ROWS, LANGUAGE, LR = 4, "sw", 1e-5
VARIANTS = {  # name -> stage
    "clo": {"loss": "clo"},
    "crpo": {"loss": "crpo"},
    "dpo_mono": {"loss": "dpo", "dpo_pairs": "monolingual"},
}


def preference_rows():
    """The first ROWS preference rows in the translate stage's schema (chosen = response)."""
    import pyarrow as pa

    from clo_ray.assets import preference_sample_rows
    from clo_ray.data.corpus import content_id

    rows = []
    for row in preference_sample_rows()[:ROWS]:
        en, tr = row["text"]["en"], row["text"][LANGUAGE]
        rows.append({"id": content_id(en["prompt"], en["chosen"], en["rejected"]),
                     "language": LANGUAGE, "prompt_en": en["prompt"],
                     "response_en": en["chosen"], "rejected_en": en["rejected"],
                     "prompt": tr["prompt"], "response": tr["chosen"],
                     "rejected": tr["rejected"]})
    return pa.Table.from_pylist(rows)


def setup(path: Path, name: str, modules: str, max_length: int):
    """(model, optimizer, objective, stage, batch, reference, n_tokens) for one variant."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from clo_ray.models.selectors import select_parameters
    from clo_ray.spec.training import StageSpec
    from clo_ray.train.batches import collate, encode_examples
    from clo_ray.train.logprobs import ResponseLogps
    from clo_ray.train.objectives import OBJECTIVES

    stage = StageSpec.model_validate({**VARIANTS[name], "modules": [modules], "steps": 1})
    tokenizer = AutoTokenizer.from_pretrained(path)
    examples = encode_examples(preference_rows(), tokenizer, loss=stage.loss, template=TEMPLATE,
                               max_length=max_length, dpo_pairs=stage.dpo_pairs or "cross_lingual")
    batch = collate(examples, tokenizer.pad_token_id)
    model = ResponseLogps(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32))
    with torch.no_grad():
        reference, n_tokens = model(**batch)
    names = set(select_parameters(model.model, [modules]))
    trainable = [p for n, p in model.model.named_parameters() if n in names]
    for p in model.parameters():
        p.requires_grad_(False)
    for p in trainable:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(trainable, lr=LR)
    count = len(examples[0].input_ids)
    return (model, optimizer, OBJECTIVES[stage.loss], stage, batch,
            reference.view(count, -1), n_tokens.view(count, -1))


def step(model, optimizer, objective, stage, batch, reference, n_tokens) -> float:
    import torch

    started = time.perf_counter()
    logps, _ = model(**batch)
    out = objective(stage, logps.view(reference.shape), reference, n_tokens)
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="the first 6 layers only")
    parser.add_argument("--modules", default="all", help="module set every variant trains")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    import torch

    torch.manual_seed(0)
    path = model_dir(args.quick)
    state = {name: setup(path, name, args.modules, args.max_length) for name in VARIANTS}
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for _ in range(args.rounds):
        for name, parts in state.items():
            for _ in range(args.warmup):
                step(*parts)
            times[name].append(statistics.median(step(*parts) for _ in range(args.steps)))
    clo = statistics.median(times["clo"])
    print(f"model {path.name}, {ROWS} rows x 4 sequences, modules {args.modules}, "
          f"max_length {args.max_length}, {args.rounds} rounds x {args.steps} steps")
    print(f"{'variant':<10} {'s/step':>8} {'tokens':>7} {'vs clo':>7}")
    for name, parts in state.items():
        median = statistics.median(times[name])
        tokens = int(parts[4]["attention_mask"].sum())
        print(f"{name:<10} {median:8.3f} {tokens:7d} {median / clo:7.2f}x")


if __name__ == "__main__":
    main()
