"""Translated pairs -> token ids -> padded batches: one forward pass per micro-batch.

An :class:`Example` is everything the loss needs about one pair, so the sequences of a pair
can never be split across micro-batches. Sequences per example (:data:`SEQUENCES`):

- clo, dpo: 4, in the row order of :mod:`clo_ray.train.losses`:
  ``(x_en, y_en)`` EN_CHOSEN, ``(x_en, y_l)`` EN_REJECTED, ``(x_l, y_l)`` TGT_CHOSEN,
  ``(x_l, y_en)`` TGT_REJECTED. DPO uses the same cross-lingual pairs (the paper's SFT+DPO).
- dpo with ``dpo_pairs: monolingual`` (CRPO's SFT+DPO baseline, preference data): 4, the same
  rows with each language's own rejected answer: ``(x_en, y_w^e)``, ``(x_en, y_l^e)``,
  ``(x_l, y_w^t)``, ``(x_l, y_l^t)``.
- crpo: 4 answers to the target prompt, CRPO's hierarchy order (``CRPO_*`` rows):
  ``(x_l, y_w^t)``, ``(x_l, y_w^e)``, ``(x_l, y_l^t)``, ``(x_l, y_l^e)``.
- sft: 1 for ``sft_data`` "target" ``(x_l, y_l)`` or "english" ``(x_en, y_en)``; 2 for
  "both" (target first, then English) -- see :data:`SFT_SEQUENCES`.

Each layout is data (:data:`LAYOUTS`: (prompt column, response column) per sequence). On
preference data ``response_en`` / ``response`` hold the chosen answers and
``rejected_en`` / ``rejected`` the rejected ones, so clo and sft read it unchanged (CRPO's
CLO baseline: the chosen answers).

Encoding: the prompt goes through the tokenizer's chat template (one user turn plus the
generation prompt) when it has one, else through the spec's plain template (base models);
the response is its text plus eos, tokenized on its own, so the prompt/response boundary is
exact. Chat-rendered text already holds its special tokens (``add_special_tokens=False``);
plain-template text gets whatever the tokenizer adds (Llama-2's bos, nothing for Qwen).

Truncation to ``max_length`` keeps the *end* of the prompt (the question's end and the
assistant marker sit there; bos and any system text go first) and the *start* of the
response. The prompt keeps at most ``max(max_length - len(response), max_length // 2)``
tokens, so both sides keep at least one token: every example has response tokens (none is
dropped, so example ``i`` is row ``i``, which the loop's sample order relies on), and each
response token has a token before it to be predicted from. A prompt that encodes to no tokens
at all is an error.

:func:`collate` stacks sequence-major ([S * P, T], all pairs' sequence 0 first), so summed
log-probs ``.view(S, P)`` line up with the losses' ``[4, P]`` tensors. Padding is on the
right: position ids then equal those of the unpadded sequence, so log-probs do not change.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import torch

from clo_ray.errors import CloRayError
from clo_ray.spec.training import stage_encoding

SEQUENCES: dict[str, int] = {"clo": 4, "dpo": 4, "crpo": 4, "sft": 1}  # sft "both": 2
SFT_SEQUENCES: dict[str, int] = {"target": 1, "english": 1, "both": 2}
DPO_PAIRS = ("cross_lingual", "monolingual")
# encoding name -> (prompt column, response column) of each sequence, in loss row order
LAYOUTS: dict[str, tuple[tuple[str, str], ...]] = {
    "pairs": (("prompt_en", "response_en"), ("prompt_en", "response"),
              ("prompt", "response"), ("prompt", "response_en")),
    "monolingual": (("prompt_en", "response_en"), ("prompt_en", "rejected_en"),
                    ("prompt", "response"), ("prompt", "rejected")),
    "ranked": (("prompt", "response"), ("prompt", "response_en"),
               ("prompt", "rejected"), ("prompt", "rejected_en")),
    "sft-target": (("prompt", "response"),),
    "sft-english": (("prompt_en", "response_en"),),
    "sft-both": (("prompt", "response"), ("prompt_en", "response_en")),
}
PREFERENCE_COLUMNS = ("rejected_en", "rejected")


class EncodingError(CloRayError, ValueError):
    """Rows cannot be encoded as asked (unknown loss, tokenizer without eos, tiny max_length)."""


@dataclass(frozen=True)
class Example:
    """One pair (or SFT row) as token ids: one entry per sequence in :data:`SEQUENCES` order.

    ``response_starts[s]`` is the index of the first response token of sequence ``s``.
    """

    id: str
    language: str
    input_ids: tuple[tuple[int, ...], ...]
    response_starts: tuple[int, ...]

    @property
    def key(self) -> str:
        """Unique per example: a multi-target trial holds the same English-pair id per language."""
        return f"{self.language}:{self.id}"


def n_sequences(loss: str, sft_data: str = "target") -> int:
    """Sequences per example for a stage's loss (and ``sft_data`` for sft)."""
    if loss == "sft":
        if sft_data not in SFT_SEQUENCES:
            raise EncodingError(f"unknown sft_data {sft_data!r}; use {sorted(SFT_SEQUENCES)}")
        return SFT_SEQUENCES[sft_data]
    if loss not in SEQUENCES:
        raise EncodingError(f"unknown loss {loss!r}; use {sorted(SEQUENCES)}")
    return SEQUENCES[loss]


def encoding_name(loss: str, sft_data: str = "target", dpo_pairs: str = "cross_lingual") -> str:
    """The :data:`LAYOUTS` entry a stage encodes its rows with (also part of the reference
    cache key: clo and cross-lingual dpo share "pairs")."""
    n_sequences(loss, sft_data)  # validates loss and sft_data
    if loss == "dpo" and dpo_pairs not in DPO_PAIRS:
        raise EncodingError(f"unknown dpo_pairs {dpo_pairs!r}; use {list(DPO_PAIRS)}")
    return stage_encoding(loss, sft_data, dpo_pairs)


def format_prompt(tokenizer: Any, prompt: str, template: str) -> str:
    """The prompt as the model sees it before the response (see the module docstring)."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                             tokenize=False, add_generation_prompt=True)
    return template.format(prompt=prompt)


def encode_examples(rows: pa.Table, tokenizer: Any, *, loss: str, template: str,
                    max_length: int, sft_data: str = "target",
                    dpo_pairs: str = "cross_lingual") -> list[Example]:
    """One :class:`Example` per row of ``rows`` (the translate stage's columns), in row order."""
    layout = LAYOUTS[encoding_name(loss, sft_data, dpo_pairs)]
    if max_length < 2:
        raise EncodingError(f"max_length {max_length} leaves no room for a prompt token and a "
                            f"response token; use at least 2 (typical: 1024-4096)")
    if tokenizer.eos_token_id is None:
        raise EncodingError("the tokenizer has no eos token: responses must end with one so "
                            "the model learns to stop")
    if rows.num_rows == 0:
        return []
    missing = sorted({c for pair in layout for c in pair} - set(rows.column_names))
    if missing:
        hint = (" (a preference corpus gives them: data.format ultrafeedback or preference)"
                if set(missing) & set(PREFERENCE_COLUMNS) else "")
        raise EncodingError(f"a {loss!r} stage reads columns {missing} that the training "
                            f"rows lack{hint}")
    chat = bool(getattr(tokenizer, "chat_template", None))
    prompt_columns = list(dict.fromkeys(p for p, _ in layout))
    response_columns = list(dict.fromkeys(r for _, r in layout))
    prompt_ids = _encode_columns(rows, prompt_columns, tokenizer, add_special_tokens=not chat,
                                 render=lambda text: format_prompt(tokenizer, text, template))
    response_ids = _encode_columns(rows, response_columns, tokenizer, add_special_tokens=False,
                                   render=None)
    eos = [tokenizer.eos_token_id]
    parts = [(prompt_ids[p], [[*ids, *eos] for ids in response_ids[r]]) for p, r in layout]
    column = {name: rows.column(name).to_pylist() for name in ("id", "language")}
    n = rows.num_rows
    examples = []
    for i in range(n):
        sequences = [_truncate(prompt[i], response[i], max_length, column["id"][i])
                     for prompt, response in parts]
        examples.append(Example(id=column["id"][i], language=column["language"][i],
                                input_ids=tuple(ids for ids, _ in sequences),
                                response_starts=tuple(start for _, start in sequences)))
    return examples


def _encode_columns(rows: pa.Table, names: Sequence[str], tokenizer: Any, *,
                    add_special_tokens: bool, render: Callable[[str], str] | None
                    ) -> dict[str, list[list[int]]]:
    """Token ids of every row of each text column in ``names``, one tokenizer call for all."""
    texts = [text for name in names for text in rows.column(name).to_pylist()]
    if render is not None:
        texts = [render(text) for text in texts]
    ids = tokenizer(texts, add_special_tokens=add_special_tokens)["input_ids"]
    n = rows.num_rows
    return {name: ids[k * n:(k + 1) * n] for k, name in enumerate(names)}


def _truncate(prompt: list[int], response: list[int], max_length: int,
              row_id: str) -> tuple[tuple[int, ...], int]:
    """Prompt end + response start within ``max_length`` (rule in the module docstring)."""
    if not prompt:
        raise EncodingError(f"row {row_id!r}: the prompt encodes to no tokens, so the first "
                            f"response token could not be predicted; use a prompt template "
                            f"with text around {{prompt}}")
    keep = min(len(prompt), max(max_length - len(response), max_length // 2))
    kept = prompt[len(prompt) - keep:]
    return tuple(kept + response[:max_length - keep]), keep


def collate(examples: Sequence[Example], pad_id: int | None) -> dict[str, torch.Tensor]:
    """input_ids, attention_mask, response_mask: [S * P, T] long, sequence-major, right-padded.

    Row ``s * P + p`` is sequence ``s`` of ``examples[p]``. ``response_mask`` is 1 on response
    tokens only; both masks are 0 on padding. ``pad_id`` None (tokenizers without a pad
    token) pads with 0: padded positions are masked, so the id never matters.
    """
    if not examples:
        raise EncodingError("collate needs at least one example")
    count = len(examples[0].input_ids)
    if any(len(e.input_ids) != count for e in examples):
        raise EncodingError("examples of one batch must have the same number of sequences "
                            "(encoded for the same loss)")
    rows = [(e.input_ids[s], e.response_starts[s]) for s in range(count) for e in examples]
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), 0 if pad_id is None else pad_id,
                           dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    response_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for row, (ids, start) in enumerate(rows):
        input_ids[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, :len(ids)] = 1
        response_mask[row, start:len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask,
            "response_mask": response_mask}


def epoch_order(n: int, *, seed: int, epoch: int) -> list[int]:
    """A permutation of ``range(n)`` that depends only on (n, seed, epoch).

    Sorted by sha256 rather than ``random.shuffle``: a resumed run (another process, maybe
    another Python) must replay exactly the same order, and hashes never change.
    """
    return sorted(range(n), key=lambda i: hashlib.sha256(f"{seed}:{epoch}:{i}".encode())
                  .digest())


def batches(examples: Sequence[Example], indices: Sequence[int],
            micro_batch: int) -> Iterator[list[Example]]:
    """``examples[i]`` for ``indices`` in order, ``micro_batch`` examples at a time (last may
    be shorter). A pair's sequences travel together because they are one Example."""
    if micro_batch <= 0:
        raise EncodingError(f"micro_batch must be positive, got {micro_batch}")
    for begin in range(0, len(indices), micro_batch):
        yield [examples[i] for i in indices[begin:begin + micro_batch]]
