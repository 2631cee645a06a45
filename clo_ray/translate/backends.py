"""Translator backends: what turns English segments into target-language text.

Every backend is a Ray Data stage with one contract: it receives *job* rows ``{job, id,
field, language, text}`` (one per translatable segment; ``id``/``field`` say which corpus row
and side it belongs to) and returns ``{job, translation, tokens}`` rows in any order. The
translate stage (:mod:`clo_ray.translate.stage`) segments, reassembles and checks; backends
only translate, so adding one is a class here and a line in :func:`translator_stage`.

- ``parallel``: :class:`ParallelTranslator` looks each row up in a parallel file (no model).
- ``seq2seq``: :class:`Seq2SeqTranslator`, M2M100 or NLLB through transformers.
- ``causal``: :class:`CausalTranslator`, a decoder LLM prompted with the spec's template.
- ``vllm``: the same prompts through ``ray.data.llm`` (:mod:`clo_ray.translate.vllm_backend`).

Causal and vLLM share :func:`encode_prompt` (:mod:`clo_ray.translate.decoding`, with
the :class:`Decoding` settings; re-exported here), so on the same model and prompts their
greedy outputs can be compared token for token (a test does). Actors are named for their role
so the Ray dashboard reads ``MapBatches(Seq2SeqTranslator)``.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from clo_ray import storage
from clo_ray.assets import builtin_corpus_path
from clo_ray.data.corpus import content_id, normalise_text
from clo_ray.errors import CloRayError, LanguageError
from clo_ray.languages import get_language
from clo_ray.translate.decoding import (
    Decoding,
    decode_output,
    encode_prompt,
    generated_length,
    log_call,
)

if TYPE_CHECKING:
    import ray.data

    from clo_ray.spec.sections import TranslatorSection

logger = logging.getLogger(__name__)

FIELDS = ("prompt", "response")  # the texts of a corpus row that are translated
PREFERENCE_FIELDS = (*FIELDS, "rejected")  # a preference row's: response is the chosen one


class TranslationError(CloRayError):
    """The translate stage cannot run: a missing parallel row, an unusable backend setting."""


# ---------------------------------------------------------------- seq2seq language codes


def seq2seq_family(tokenizer: Any, ref: str) -> str:
    """'m2m100' or 'nllb', from the tokenizer class (both models share ``model_type``
    m2m_100, and their language codes differ: ``sw`` vs ``swh_Latn``)."""
    name = type(tokenizer).__name__.lower()
    for family in ("nllb", "m2m100"):
        if family in name:
            return family
    raise TranslationError(
        f"translator.model {ref!r}: the seq2seq backend runs M2M100 and NLLB models, but its "
        f"tokenizer is {type(tokenizer).__name__}; use backend causal or vllm for other models")


def seq2seq_code(family: str, code: str) -> str:
    """The translator's code for language ``code`` (``languages.py`` holds both dialects)."""
    lang = get_language(code)
    found = lang.m2m100 if family == "m2m100" else lang.flores
    if not found:
        raise LanguageError(f"{lang.name} ({code}) has no {family.upper()} language code, so "
                            f"a {family.upper()} translator cannot translate it; use another "
                            f"translator (backend causal or vllm) for {code}")
    return found


def seq2seq_token_id(tokenizer: Any, family: str, code: str) -> int | None:
    """Id of the language token that starts the output, or None if the vocabulary lacks it."""
    translator_code = seq2seq_code(family, code)
    if family == "m2m100":
        return getattr(tokenizer, "lang_code_to_id", {}).get(translator_code)
    found = tokenizer.convert_tokens_to_ids(translator_code)
    return None if found in (None, tokenizer.unk_token_id) else found


def check_seq2seq_languages(tokenizer: Any, ref: str, codes: Sequence[str]) -> None:
    """Raise a LanguageError naming each language the model's vocabulary cannot produce."""
    family = seq2seq_family(tokenizer, ref)
    missing = [c for c in codes if seq2seq_token_id(tokenizer, family, c) is None]
    if missing:
        raise LanguageError(f"translator.model {ref!r} ({family.upper()}) has no language "
                            f"token for {', '.join(missing)}; remove them from languages or "
                            "use another translator")


# ---------------------------------------------------------------- parallel files

Lookup = dict[str, dict[str, dict[str, str]]]  # English content id -> language -> field -> text
# A parallel side's keys for each corpus text field: a preference side has chosen/rejected
PREFERENCE_SIDE = {"prompt": "prompt", "response": "chosen", "rejected": "rejected"}


def read_parallel(path: str, source: str, languages: Sequence[str],
                  storage_options: dict | None = None) -> tuple[Lookup, str]:
    """Rows of a parallel file ``{"text": {"en": {prompt, response}, "sw": {...}}}`` (jsonl,
    optionally gzipped; preference rows hold ``chosen`` and ``rejected`` in place of
    ``response``), keyed by the content id of their ``source`` side, with the fingerprint of
    the file's bytes (part of the cache key: edited translations re-run)."""
    local = builtin_corpus_path(path)
    uri = str(local) if local is not None else path
    try:
        with storage.open_input(uri, storage_options) as raw:
            data = raw.read()
    except (OSError, ValueError) as exc:
        raise TranslationError(f"translator.path {path}: cannot read the parallel file "
                               f"({exc})") from None
    fingerprint = hashlib.sha256(data).hexdigest()[:16]
    lines = (gzip.decompress(data) if path.endswith(".gz") else data).decode("utf-8-sig")
    lookup: Lookup = {}
    for number, line in enumerate(lines.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            text = json.loads(line)["text"]
            en = text[source]
            keys = _side_keys(en)
            key = content_id(*(en[k] for k in keys.values())) if len(keys) > 1 else \
                content_id(en["prompt"], "")
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise TranslationError(f"translator.path {path} line {number}: not a parallel row "
                                   f"with text.{source}.prompt/response ({exc!r})") from None
        sides = {lang: text.get(lang) for lang in languages}
        lookup.setdefault(key, {
            lang: {"response": "", **{f: normalise_text(side[k]) for f, k in keys.items()}}
            for lang, side in sides.items() if _complete(side, keys.values())})
    return lookup, fingerprint


def _side_keys(en: dict) -> dict[str, str]:
    """Corpus field -> key of a side: a preference row, an SFT pair, or an instruction only
    (a prompt set's row, e.g. the bundled eval prompts: its "response" is empty everywhere)."""
    if "chosen" in en:
        return PREFERENCE_SIDE
    return {"prompt": "prompt", "response": "response"} if "response" in en else \
        {"prompt": "prompt"}


def _complete(side: Any, keys: Iterable[str]) -> bool:
    return isinstance(side, dict) and all(isinstance(side.get(k), str) and side[k].strip()
                                          for k in keys)


def check_parallel(lookup: Lookup, ids: Sequence[str], sources: Sequence[str],
                   languages: Sequence[str], path: str) -> None:
    """Raise before any work when a corpus row, or one of its languages, is not in the file."""
    problems = []
    for row_id, where in zip(ids, sources, strict=True):
        found = lookup.get(row_id)
        if found is None:
            problems.append(f"corpus row {row_id} ({where}) is not in the file")
        else:
            problems += [f"corpus row {row_id} ({where}) has no {lang!r} translation"
                         for lang in languages if lang not in found]
    if problems:
        more = f" ... and {len(problems) - 5} more" if len(problems) > 5 else ""
        raise TranslationError(f"parallel file {path}: {len(problems)} missing "
                               f"translation(s): " + "; ".join(problems[:5]) + more)


# ---------------------------------------------------------------- actors


def _device(gpus: float) -> str:
    import torch

    return "cuda" if gpus > 0 and torch.cuda.is_available() else "cpu"



class _Translator:
    """Ray Data actor: groups a batch of jobs by target language and translates each group."""

    backend = ""

    def __init__(self, *, source: str, call_log: str | None = None) -> None:
        self.source, self.call_log = source, call_log

    def translate(self, texts: list[str], keys: list[tuple[str, str]],
                  target: str) -> tuple[list[str], list[int]]:
        raise NotImplementedError

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["job"])
        out, tokens = [""] * n, [0] * n
        languages = [str(x) for x in batch["language"]]
        for target in dict.fromkeys(languages):
            idx = [i for i in range(n) if languages[i] == target]
            texts = [str(batch["text"][i]) for i in idx]
            keys = [(str(batch["id"][i]), str(batch["field"][i])) for i in idx]
            translated, counts = self.translate(texts, keys, target)
            for i, text, count in zip(idx, translated, counts, strict=True):
                out[i], tokens[i] = text, count
        log_call(self.call_log, self.backend, [str(x) for x in batch["id"]], n)
        return {"job": np.asarray(batch["job"], dtype=np.int64),
                "translation": np.asarray(out, dtype=object),
                "tokens": np.asarray(tokens, dtype=np.int64)}


class ParallelTranslator(_Translator):
    """Looks translations up in a parallel file; the driver checked every row is there."""

    backend = "parallel"

    def __init__(self, *, path: str, languages: list[str], storage_options: dict | None = None,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.lookup, _ = read_parallel(path, self.source, languages, storage_options)

    def translate(self, texts: list[str], keys: list[tuple[str, str]],
                  target: str) -> tuple[list[str], list[int]]:
        return [self.lookup[row_id][target][field] for row_id, field in keys], [0] * len(keys)


class Seq2SeqTranslator(_Translator):
    """An M2M100/NLLB model: source language set on the tokenizer, target forced as the
    first generated token (how both models are told what to produce)."""

    backend = "seq2seq"

    def __init__(self, *, model: str, decoding: Decoding, gpus: float = 0.0,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        import torch
        from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

        from clo_ray.models.resolve import resolve_model

        path = resolve_model(model)
        self.device, self.decoding = _device(gpus), decoding
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.family = seq2seq_family(self.tokenizer, model)
        self.tokenizer.src_lang = seq2seq_code(self.family, self.source)
        dtype = torch.bfloat16 if self.device == "cuda" else torch.float32
        self.model = AutoModelForSeq2SeqLM.from_pretrained(path, dtype=dtype).to(self.device)
        self.model.eval()

    def translate(self, texts: list[str], keys: list[tuple[str, str]],
                  target: str) -> tuple[list[str], list[int]]:
        import torch

        forced = seq2seq_token_id(self.tokenizer, self.family, target)
        inputs = self.tokenizer(texts, return_tensors="pt", padding=True,
                                truncation=True).to(self.device)
        if self.decoding.temperature > 0:
            torch.manual_seed(self.decoding.seed)
        with torch.inference_mode():
            out = self.model.generate(**inputs, forced_bos_token_id=forced,
                                      **self.decoding.generate_kwargs())
        # Drop decoder start + language token before decoding: transformers 5 does not mark
        # M2M100's language tokens special, so skip_special_tokens would keep "__sw__".
        generated = out[:, 2:]
        pad = self.model.generation_config.pad_token_id
        return (self.tokenizer.batch_decode(generated, skip_special_tokens=True),
                (generated != pad).sum(dim=1).tolist())


class CausalTranslator(_Translator):
    """A decoder LLM prompted per segment (:func:`encode_prompt`), left-padded batches, the
    prompt cut off the output; the CPU stand-in for the vllm backend."""

    backend = "causal"

    def __init__(self, *, model: str, decoding: Decoding, template: str, gpus: float = 0.0,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from clo_ray.models.resolve import resolve_model

        path = resolve_model(model)
        self.device, self.decoding, self.template = _device(gpus), decoding, template
        self.tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        dtype = torch.bfloat16 if self.device == "cuda" else torch.float32
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(self.device)
        self.model.eval()

    def translate(self, texts: list[str], keys: list[tuple[str, str]],
                  target: str) -> tuple[list[str], list[int]]:
        import torch

        ids = [encode_prompt(self.tokenizer, self.template, t, self.source, target)
               for t in texts]
        inputs = self.tokenizer.pad({"input_ids": ids}, padding=True,
                                    return_tensors="pt").to(self.device)
        if self.decoding.temperature > 0:
            torch.manual_seed(self.decoding.seed)
        with torch.inference_mode():
            out = self.model.generate(**inputs, pad_token_id=self.tokenizer.pad_token_id,
                                      **self.decoding.generate_kwargs())
        generated = out[:, inputs["input_ids"].shape[1]:]
        counts = [generated_length(row, self.model.generation_config.eos_token_id)
                  for row in generated.tolist()]
        rows = [row[:count] for row, count in zip(generated.tolist(), counts, strict=True)]
        return [decode_output(self.tokenizer, row) for row in rows], counts


# ---------------------------------------------------------------- the stage


def translator_stage(ds: ray.data.Dataset, translator: TranslatorSection, *, source: str,
                     languages: list[str], decoding: Decoding, storage_options: dict | None,
                     call_log: str | None = None) -> ray.data.Dataset:
    """``ds`` of job rows -> ``{job, translation, tokens}`` through the spec's backend."""
    import ray.data

    if translator.backend == "vllm":
        from clo_ray.translate.vllm_backend import vllm_stage

        return vllm_stage(ds, translator, source=source, decoding=decoding, call_log=call_log)
    common: dict[str, Any] = {"source": source, "call_log": call_log}
    kwargs: dict[str, Any]
    if translator.backend == "parallel":
        actor: type[_Translator] = ParallelTranslator
        kwargs = {"path": translator.path, "languages": languages,
                  "storage_options": storage_options}
    elif translator.backend == "seq2seq":
        actor, kwargs = Seq2SeqTranslator, {"model": translator.model, "decoding": decoding,
                                            "gpus": translator.gpus_per_actor}
    else:
        actor, kwargs = CausalTranslator, {"model": translator.model, "decoding": decoding,
                                           "template": translator.prompt_template,
                                           "gpus": translator.gpus_per_actor}
    resources = {"num_gpus": translator.gpus_per_actor} if translator.gpus_per_actor else {}
    return ds.map_batches(actor, fn_constructor_kwargs={**common, **kwargs},
                          batch_size=translator.batch_size, batch_format="numpy",
                          compute=ray.data.ActorPoolStrategy(size=translator.actors),
                          num_cpus=1, **resources)
