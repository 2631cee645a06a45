"""The translate stage: an English corpus -> per-language translated rows, checked, cached.

CLO needs every English pair (x_en, y_en) also in the target language. For each language::

    corpus rows -> segments (segment.segment: code, URLs, numbers protected; prompt and
    response both) -> translator actors (Ray Data map_batches over an actor pool, or
    ray.data.llm for vllm) -> back on the driver: reassemble -> quality checks -> parquet
    parts every N rows -> translations / rejects / report + manifest (translate_cache)

All target languages share one pipeline (one actor pool, one model load). Results stream
back with ``iter_batches``, so parts land while the model works and a killed run keeps
them. Failing rows follow ``translator.quality.policy``: ``drop`` (only in rejects),
``keep_flagged`` (in translations with their reasons, and in rejects), ``retry`` (translated
once more with another decoding setting, one sentence per segment when a sentence was
dropped, then dropped if they still fail). Everything that
can be wrong with the inputs is checked before Ray starts or a byte is written.

A translator actor that dies mid-batch (a crash, an OOM kill, a preempted node) is restarted
by Ray Data and its batch re-run: Ray Data gives actor pools ``max_restarts=-1`` and
``max_task_retries=-1`` unless told otherwise, and no stage here overrides them (passing
them is deprecated since Ray 2.60). A batch delivered twice counts once (``_Rows.put``), so
no row is lost or written twice (tests/test_faults.py kills an actor to check).

The sweep calls :func:`translate_corpus`; ``python -m clo_ray.translate SPEC`` runs it alone.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from clo_ray.data.corpus import Corpus, load_corpus
from clo_ray.layout import RunLayout
from clo_ray.ray_env import ray_address
from clo_ray.translate.backends import (
    FIELDS,
    PREFERENCE_FIELDS,
    translator_stage,
)
from clo_ray.translate.cache import (
    TranslationCache,
    TranslationResult,
    probe_storage,
    read_table,
    translation_key,
)
from clo_ray.translate.decoding import Decoding
from clo_ray.translate.preflight import (
    check_languages,
    check_translator,
    key_inputs,
    translator_identity,
)
from clo_ray.translate.quality import REASONS, QualityConfig, check_translation
from clo_ray.translate.segment import Segment, dropped_spans, missing_spans, reassemble, segment

if TYPE_CHECKING:
    import ray.data

    from clo_ray.spec.schema import SweepSpec

__all__ = ["load_translations", "translate_corpus"]

logger = logging.getLogger(__name__)

DEFAULT_PART_ROWS = 256  # finished rows per language per part file
_MAX_BLOCKS = 2000  # job blocks per pass; one block is one actor task, streamed back whole
CALL_LOG_ENV = "CLO_RAY_TRANSLATE_CALL_LOG"  # default for call_log (a CLI run in a test)

def translate_corpus(spec: SweepSpec, *, corpus: Corpus | None = None,
                     languages: list[str] | None = None, part_rows: int = DEFAULT_PART_ROWS,
                     call_log: str | None = None, actor: type | None = None
                     ) -> dict[str, TranslationResult]:
    """Translate the spec's corpus into each language (default ``spec.languages``), reusing
    whatever the cache already holds; returns one :class:`TranslationResult` per language.

    ``corpus``: an already loaded corpus (else ``spec.corpus`` is loaded). ``part_rows``:
    finished rows per part file (what a killed run keeps). ``call_log``: a local file each
    translator call appends one JSON line to (tests count model calls with it; default
    ``$CLO_RAY_TRANSLATE_CALL_LOG``). ``actor``: a Ray Data callable class run in place of
    the spec's backend class, like :class:`~clo_ray.translate.backends.ParallelTranslator`
    (job rows in, ``{job, translation, tokens}`` out), constructed with the keywords
    ``source``, ``call_log``, ``languages``, ``decoding``, ``storage_options`` and
    ``translator`` (the spec's section): a wrapper that instruments the backend or injects
    faults (tests kill it mid-batch). The cache key stays the spec's, so it must produce
    what the spec's backend produces.
    """
    started = time.perf_counter()
    call_log = call_log or os.environ.get(CALL_LOG_ENV) or None
    source, options = spec.corpus.source_language, spec.run.storage_options
    languages = check_languages(list(languages or spec.languages), source)
    if corpus is None:
        corpus = load_corpus(spec.corpus.path, spec.corpus.format, source_language=source,
                             max_rows=spec.corpus.max_rows, storage_options=options)
    root = RunLayout.of(spec).translations
    identity = translator_identity(spec)
    inputs = {lang: key_inputs(spec, corpus, lang, identity) for lang in languages}
    caches = {lang: TranslationCache(root, translation_key(inputs[lang]), lang, options,
                                     preferences=corpus.preferences)
              for lang in languages}
    results = {lang: cache.result(found) for lang, cache in caches.items()
               if (found := cache.manifest()) is not None}
    for lang in results:
        logger.info("translate %s: cached (%s)", lang, caches[lang].uri)
    todo = {lang: cache for lang, cache in caches.items() if lang not in results}
    if todo:
        check_translator(spec, corpus, list(todo))
        probe_storage(root, options)
        run = _TranslateRun(spec, corpus, todo, part_rows, call_log, actor)
        results.update(_translate(run, inputs, started))
    return {lang: results[lang] for lang in languages}


def load_translations(spec: SweepSpec, languages: list[str] | None = None, *,
                      corpus: Corpus | None = None) -> dict[str, pa.Table]:
    """Each language's translated table (default ``spec.languages``), translating what the
    cache lacks first: the pairs stage's input."""
    results = translate_corpus(spec, corpus=corpus, languages=languages)
    options = spec.run.storage_options or None
    return {lang: read_table(result.translations, options) for lang, result in results.items()}


# ---------------------------------------------------------------- passes


@dataclass(frozen=True)
class _TranslateRun:
    """What every pass of one :func:`translate_corpus` call shares: the languages still to
    translate (``caches``) and its options, so a pass takes only what differs between the
    first pass and the retry (its rows and decoding)."""

    spec: SweepSpec
    corpus: Corpus
    caches: dict[str, TranslationCache]
    part_rows: int
    call_log: str | None
    actor: type | None


def _translate(run: _TranslateRun, inputs: dict[str, dict[str, Any]],
               started: float) -> dict[str, TranslationResult]:
    """The passes over what the cache lacks, then each language's outputs + manifest."""
    spec, corpus, caches = run.spec, run.corpus, run.caches
    translator = spec.translator
    ids = corpus.table.column("id").to_pylist()
    decoding = Decoding.from_section(translator, spec.run.seed)
    for lang, cache in caches.items():
        cache.write_key(inputs[lang])
    first = {lang: _part_ids(cache)[0] for lang, cache in caches.items()}
    work = [(lang, i) for lang in caches for i, row_id in enumerate(ids)
            if row_id not in first[lang]]
    stats = _run_pass(run, work, decoding, "first")
    if translator.quality.policy == "retry" and translator.backend != "parallel":
        todo = {lang: _part_ids(cache) for lang, cache in caches.items()}
        work = [(lang, i) for lang, (_, failed, retried) in todo.items()
                for i, row_id in enumerate(ids) if row_id in set(failed) - retried]
        # a row that lost a sentence goes again one sentence per segment: a translator
        # that ends multi-sentence inputs early has nothing left to drop
        by_sentence = {k for k, (lang, i) in enumerate(work)
                       if "dropped_sentence" in todo[lang][1][ids[i]]}
        retry = decoding.retry(beams=translator.backend != "vllm")
        stats = stats.merge(_run_pass(run, work, retry, "retry", by_sentence))
    results = {}
    for lang, cache in caches.items():
        result = cache.result(cache.finalize(ids, translator.quality.policy, inputs[lang]),
                              translated=stats.rows["first", lang],
                              retried=stats.rows["retry", lang],
                              output_tokens=stats.tokens[lang],
                              seconds=time.perf_counter() - started,
                              startup_seconds=(stats.first_result or started) - started)
        reasons = ", ".join(f"{n} {r}" for r, n in result.reasons.items() if n)
        logger.info("translate %s: %d rows -> %d accepted, %d rejected%s (%s)", lang,
                    result.rows, result.accepted, result.rejected,
                    f" ({reasons})" if reasons else "", cache.uri)
        results[lang] = result
    return results


def _part_ids(cache: TranslationCache) -> tuple[set[str], dict[str, list[str]], set[str]]:
    """Ids in the cache's parts: translated by the first pass, failed in it (with the
    reasons), retried."""
    parts = cache.read_parts()
    first: set[str] = set()
    failed: dict[str, list[str]] = {}
    retried: set[str] = set()
    for row_id, pass_name, reasons in zip(parts.column("id").to_pylist(),
                                          parts.column("pass").to_pylist(),
                                          parts.column("reasons").to_pylist(), strict=True):
        if pass_name == "retry":
            retried.add(row_id)
        else:
            first.add(row_id)
            if reasons:
                failed[row_id] = list(reasons)
    return first, failed, retried


@dataclass
class _PassStats:
    rows: Counter[tuple[str, str]] = field(default_factory=Counter)  # (pass, language)
    tokens: Counter[str] = field(default_factory=Counter)
    first_result: float | None = None  # perf_counter() when the first batch came back

    def merge(self, other: _PassStats) -> _PassStats:
        self.rows.update(other.rows)
        self.tokens.update(other.tokens)
        self.first_result = self.first_result or other.first_result
        return self


def _run_pass(run: _TranslateRun, work: list[tuple[str, int]], decoding: Decoding,
              pass_name: str, by_sentence: set[int] | None = None) -> _PassStats:
    """Translate ``work`` ((language, corpus row) pairs) through one Ray Data pipeline,
    checking and writing rows as they complete; the rows at ``by_sentence`` (indexes in
    ``work``) are cut one sentence per segment."""
    stats = _PassStats()
    if not work:
        return stats
    import ray
    import ray.data

    if not ray.is_initialized():  # joins RAY_ADDRESS's cluster when set, else starts one
        ray.init(address=ray_address(), include_dashboard=False)

    translator, caches = run.spec.translator, run.caches
    rows = _Rows(run.corpus, work, translator.backend == "parallel", translator.segment_max_chars,
                 by_sentence or set())
    check = QualityConfig.from_section(translator.quality)
    pending = Counter(lang for lang, _ in work)
    buffers: dict[str, list[dict[str, Any]]] = {lang: [] for lang in pending}
    failed: Counter[str] = Counter()
    started = time.perf_counter()

    def finish(index: int) -> None:
        row = rows.checked(index, check)
        lang = row["language"]
        buffers[lang].append(row)
        failed[lang] += bool(row["reasons"])
        stats.rows[pass_name, lang] += 1
        pending[lang] -= 1
        if len(buffers[lang]) >= run.part_rows or not pending[lang]:
            caches[lang].write_part(buffers[lang], pass_name)
            buffers[lang] = []
        if not pending[lang]:
            rate = stats.rows[pass_name, lang] / max(time.perf_counter() - started, 1e-9)
            logger.info("translate %s (%s pass): %d rows done, %d failed checks, %.1f rows/s",
                        lang, pass_name, stats.rows[pass_name, lang], failed[lang], rate)

    for index in rows.without_jobs():
        finish(index)
    if rows.jobs.num_rows:
        per_block = translator.batch_size * max(1, math.ceil(
            rows.jobs.num_rows / translator.batch_size / _MAX_BLOCKS))
        blocks = [rows.jobs.slice(i, per_block)
                  for i in range(0, rows.jobs.num_rows, per_block)]
        logger.info("translate (%s pass): %d rows, %d segments, backend %s, %d actor(s)",
                    pass_name, len(work), rows.jobs.num_rows, translator.backend,
                    translator.actors)
        ds = _stage(ray.data.from_arrow(blocks), run, list(pending), decoding)
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            stats.first_result = stats.first_result or time.perf_counter()
            errors = batch.column("error").to_pylist() if "error" in batch.column_names \
                else [None] * batch.num_rows
            for job, text, tokens, error in zip(batch.column("job").to_pylist(),
                                                batch.column("translation").to_pylist(),
                                                batch.column("tokens").to_pylist(), errors,
                                                strict=True):
                stats.tokens[rows.language(job)] += tokens
                if error:
                    logger.warning("translate %s: the translator failed on row %s (%s): %s",
                                   rows.language(job), rows.row_id(job), pass_name, error)
                complete = rows.put(job, text or "", failed=bool(error))
                if complete is not None:
                    finish(complete)
    return stats


def _stage(ds: ray.data.Dataset, run: _TranslateRun, languages: list[str],
           decoding: Decoding) -> ray.data.Dataset:
    """Job rows -> translations: the spec's backend, or the ``actor`` standing in for it."""
    translator, source = run.spec.translator, run.spec.corpus.source_language
    options, call_log, actor = run.spec.run.storage_options, run.call_log, run.actor
    if actor is None:
        return translator_stage(ds, translator, source=source, languages=languages,
                                decoding=decoding, storage_options=options, call_log=call_log)
    import ray.data

    return ds.map_batches(actor, fn_constructor_kwargs={
        "source": source, "call_log": call_log, "languages": languages, "decoding": decoding,
        "storage_options": options, "translator": translator},
        batch_size=translator.batch_size, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=translator.actors), num_cpus=1,
        num_gpus=translator.gpus_per_actor or None)


class _Rows:
    """The rows of one pass: their segments, the job table sent to the translators, and
    the translations coming back, until each row is whole again."""

    def __init__(self, corpus: Corpus, work: list[tuple[str, int]], parallel: bool,
                 max_chars: int, by_sentence: set[int]) -> None:
        self.work, self.parallel = work, parallel
        table = corpus.table
        self.ids = table.column("id").to_pylist()
        # the texts each row translates: prompt and response, + rejected for preferences
        self.fields = PREFERENCE_FIELDS if corpus.preferences else FIELDS
        self.english = {f: table.column(f).to_pylist() for f in self.fields}
        self.segments: list[dict[str, list[Segment]]] = []
        self.slots: list[dict[str, list[str | None]]] = []
        self.remaining: list[int] = []
        self.where: list[tuple[int, str, int]] = []  # job -> (work index, field, slot)
        self.failed: set[int] = set()  # rows a segment of which the translator failed on
        columns: dict[str, list[Any]] = {k: [] for k in ("job", "id", "field", "language",
                                                         "text")}
        for index, (lang, row) in enumerate(work):
            cut = 1 if index in by_sentence else max_chars  # 1: every sentence alone
            segs = {f: [] if parallel else segment(self.english[f][row], cut)
                    for f in self.fields}
            texts = {f: [self.english[f][row]] if parallel else
                     [s.text for s in segs[f] if s.translate] for f in self.fields}
            self.segments.append(segs)
            self.slots.append({f: [None] * len(texts[f]) for f in self.fields})
            self.remaining.append(sum(len(t) for t in texts.values()))
            for f in self.fields:
                for slot, text in enumerate(texts[f]):
                    for name, value in zip(columns, (len(self.where), self.ids[row], f, lang,
                                                     text), strict=True):
                        columns[name].append(value)
                    self.where.append((index, f, slot))
        self.jobs = pa.table(columns, schema=pa.schema([
            ("job", pa.int64()), ("id", pa.string()), ("field", pa.string()),
            ("language", pa.string()), ("text", pa.string())]))

    def without_jobs(self) -> list[int]:
        """Rows with nothing to translate (code only, say): complete from the start."""
        return [i for i, left in enumerate(self.remaining) if not left]

    def language(self, job: int) -> str:
        return self.work[self.where[job][0]][0]

    def row_id(self, job: int) -> str:
        return self.ids[self.work[self.where[job][0]][1]]

    def put(self, job: int, translation: str, *, failed: bool = False) -> int | None:
        """Store one translated segment (``failed``: the translator reported an error for
        it); the row's index once all of its segments are in."""
        index, field_name, slot = self.where[job]
        if failed:
            self.failed.add(index)
        if self.slots[index][field_name][slot] is None:
            self.slots[index][field_name][slot] = translation
            self.remaining[index] -= 1
            return index if not self.remaining[index] else None
        return None  # a retried task delivered it twice

    def checked(self, index: int, config: QualityConfig) -> dict[str, Any]:
        """The whole row in the output schema, with the reasons it fails (REASONS order)."""
        lang, row = self.work[index]
        out: dict[str, Any] = {"id": self.ids[row], "language": lang}
        reasons: set[str] = {"translator_error"} if index in self.failed else set()
        for f in self.fields:
            source, parts = self.english[f][row], self.slots[index][f]
            if self.parallel:
                text, lost = parts[0] or "", dropped_spans(source, parts[0] or "")
            else:
                segs, done = self.segments[index][f], [p or "" for p in parts]
                text, lost = reassemble(segs, done), missing_spans(segs, done)
            out[f"{f}_en"], out[f] = source, text
            if source.strip():  # an instruction without a response (a prompt set's row)
                reasons.update(check_translation(source, text, lang, config, lost_spans=lost,
                                                 sentences=not self.parallel))
        out["reasons"] = [r for r in REASONS if r in reasons]
        return out
