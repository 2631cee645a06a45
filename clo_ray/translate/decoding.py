"""Decoding settings and prompt encoding shared by the model translator backends.

:class:`Decoding` is part of the translate cache key and configures every model backend
(seq2seq, causal, vllm). The causal (:mod:`clo_ray.translate.backends`) and vllm
(:mod:`clo_ray.translate.vllm_backend`) backends build their prompts with :func:`encode_prompt`,
decode with :func:`decode_output` and count with :func:`generated_length`, so on the same model
and prompts their greedy outputs compare token for token. A module of its own so that the vllm
backend depends on this contract, not on the transformers actors.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from clo_ray.languages import get_language

if TYPE_CHECKING:
    from clo_ray.spec.sections import TranslatorSection


@dataclass(frozen=True)
class Decoding:
    """Decoding settings, shared by every model backend (part of the cache key)."""

    max_new_tokens: int
    num_beams: int = 1
    temperature: float = 0.0  # 0 = greedy (or beam search when num_beams > 1)
    top_p: float = 1.0
    seed: int = 0  # used only when sampling

    @classmethod
    def from_section(cls, translator: TranslatorSection, seed: int) -> Decoding:
        return cls(translator.max_new_tokens, translator.num_beams, translator.temperature,
                   translator.top_p, seed)

    def retry(self, beams: bool) -> Decoding:
        """The other setting a failing row gets once (policy ``retry``): deterministic
        decoding that failed may loop or stop early where sampling does not, and a sampled
        output that failed is retried deterministically (beam search where ``beams``)."""
        if self.temperature == 0:
            return dataclasses.replace(self, num_beams=1, temperature=0.7, top_p=0.9,
                                       seed=self.seed + 1)
        return dataclasses.replace(self, num_beams=4 if beams else 1, temperature=0.0,
                                   top_p=1.0)

    def generate_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for transformers' ``generate``."""
        if self.temperature == 0:
            return {"max_new_tokens": self.max_new_tokens, "num_beams": self.num_beams,
                    "do_sample": False}
        return {"max_new_tokens": self.max_new_tokens, "num_beams": self.num_beams,
                "do_sample": True, "temperature": self.temperature, "top_p": self.top_p}

    def sampling_params(self) -> dict[str, Any]:
        """vLLM ``SamplingParams`` fields (vLLM has no beam search in SamplingParams)."""
        return {"max_tokens": self.max_new_tokens, "temperature": self.temperature,
                "top_p": self.top_p, "seed": self.seed, "detokenize": False}


def render_prompt(tokenizer: Any, template: str, text: str, source: str, target: str) -> str:
    """The instruction for one segment, in the model's chat format when it has one."""
    src, tgt = get_language(source), get_language(target)
    message = template.format(text=text, source_name=src.name, source_code=src.code,
                              target_name=tgt.name, target_code=tgt.code)
    if not getattr(tokenizer, "chat_template", None):
        return message
    return tokenizer.apply_chat_template([{"role": "user", "content": message}],
                                         add_generation_prompt=True, tokenize=False)


def encode_prompt(tokenizer: Any, template: str, text: str, source: str,
                  target: str) -> list[int]:
    """Token ids of :func:`render_prompt`: a chat template writes its own bos, so special
    tokens are added only to a plain prompt (else some tokenizers would add a second bos)."""
    chat = bool(getattr(tokenizer, "chat_template", None))
    prompt = render_prompt(tokenizer, template, text, source, target)
    return tokenizer(prompt, add_special_tokens=not chat)["input_ids"]


def decode_output(tokenizer: Any, token_ids: Sequence[int]) -> str:
    """Generated ids -> text, for causal and vLLM alike (vLLM's own incremental detokenizer
    drops an incomplete UTF-8 tail that ``decode`` shows as U+FFFD, so it is not used)."""
    return tokenizer.decode(list(token_ids), skip_special_tokens=True).strip()


def generated_length(tokens: list[int], eos: int | list[int] | None) -> int:
    """Generated tokens up to and including the first eos (what vLLM counts)."""
    stops = set(eos if isinstance(eos, list) else [eos])
    for i, token in enumerate(tokens):
        if token in stops:
            return i + 1
    return len(tokens)

def log_call(path: str | None, backend: str, ids: Sequence[str], segments: int) -> None:
    """Append one line per translator call to ``path`` (tests count model calls with it)."""
    if path:
        line = json.dumps({"backend": backend, "pid": os.getpid(), "segments": segments,
                           "ids": sorted(set(ids))})
        with open(path, "a", encoding="utf-8") as fh:  # a local debugging file, not storage
            fh.write(line + "\n")
