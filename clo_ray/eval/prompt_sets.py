"""Prompt sets: the instructions every trial answers besides its held-out pairs (AlpacaEval's).

The paper judges each model on AlpacaEval's 805 instructions, translated into the target
language, and on the English originals (retention). A prompt set here is a file of
instructions (:class:`~clo_ray.spec.evaluation.PromptSetSpec`); the driver prepares it once
per sweep, before any trial starts (:func:`prepare_prompt_sets`):

1. read and check the file (:func:`load_prompt_set`): every problem names the file, row and
   field, before anything expensive runs;
2. languages the file lacks are translated by the spec's translator through the translate
   stage and its cache (:func:`clo_ray.translate.stage.translate_corpus`), the same code
   path as the training data; a translation the quality checks reject leaves that
   instruction out of that language (counted in the log);
3. one table per (set, language) lands in ``<storage>/cache/prompt_sets/<key>/<lang>.parquet``
   (``id``, ``instruction_en``, ``instruction``, ``dataset``), content-addressed, so a re-run
   or another sweep over the same set reads it.

Trials receive the tables' locations (set name -> language -> URI) and never read the file.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq

from clo_ray import checked, storage
from clo_ray.assets import ASSETS_DIR
from clo_ray.data.corpus import normalise_text
from clo_ray.errors import CloRayError
from clo_ray.layout import RunLayout
from clo_ray.spec.evaluation import BUILTIN_PROMPTS, PromptSetSpec

if TYPE_CHECKING:
    from clo_ray.spec.schema import SweepSpec

logger = logging.getLogger(__name__)

PROMPT_SET_FORMAT = 1  # bump when the prepared tables change meaning
COLUMNS = ("id", "instruction_en", "instruction", "dataset")
PreparedSets = dict[str, dict[str, str]]  # set name -> language -> prepared table URI


class PromptSetError(CloRayError, ValueError):
    """A prompt-set file that cannot be read as instructions (names file, row and field)."""


@dataclass(frozen=True)
class PromptSet:
    """A checked prompt set: ``table`` has ``id``, ``dataset``, ``instruction_en`` and an
    ``instruction_<lang>`` column per other language the file holds (``languages``)."""

    name: str
    path: str
    table: pa.Table
    languages: tuple[str, ...]

    @property
    def fingerprint(self) -> str:
        text = json.dumps(self.table.to_pydict(), sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def builtin_prompts_path() -> Path:
    """The bundled prompt set (see clo_ray/assets/PROVENANCE.md)."""
    return ASSETS_DIR / "eval_prompts.jsonl"


def load_prompt_set(section: PromptSetSpec, storage_options: dict | None = None) -> PromptSet:
    """Read ``section.path`` as instructions (module docstring); ``max_prompts`` keeps the
    first N. Raises PromptSetError naming the file, row and field of the first problem."""
    path = str(builtin_prompts_path()) if section.path == BUILTIN_PROMPTS else section.path
    where = f"prompt set {section.name!r} ({section.path})"
    fmt = "parquet" if section.format == "parquet" or (
        section.format == "auto" and path.endswith(".parquet")) else "json"
    try:
        with storage.open_input(path, storage_options) as handle:
            raw = handle.read()
    except (OSError, ValueError) as err:
        raise PromptSetError(f"{where}: cannot read the file ({err})") from None
    records = _records(raw, fmt, where)
    rows: list[dict[str, Any]] = []
    languages: list[str] = []
    for number, record in enumerate(records, start=1):
        row, found = _row(record, number, where, section.format)
        if row is None:
            continue
        if not rows:
            languages = found
        elif found != languages:
            raise PromptSetError(f"{where}: row {number} has languages {found}, the first row "
                                 f"{languages}: every row needs the same languages")
        rows.append(row)
    if not rows:
        raise PromptSetError(f"{where}: no instructions in the file")
    ids = [r["id"] for r in rows]
    for number, row_id in enumerate(ids, start=1):
        if row_id in ids[:number - 1]:
            raise PromptSetError(f"{where}: row {number}: id {row_id!r} is used twice")
    rows = rows[:section.max_prompts] if section.max_prompts else rows
    columns = ["id", "dataset", "instruction_en", *(f"instruction_{c}" for c in languages)]
    table = pa.table({c: pa.array([r[c] for r in rows], pa.string()) for c in columns})
    return PromptSet(section.name, section.path, table, tuple(languages))


def _records(raw: bytes, fmt: str, where: str) -> list[Any]:
    if fmt == "parquet":
        try:
            return pq.read_table(pa.BufferReader(raw)).to_pylist()
        except (pa.ArrowInvalid, OSError) as err:
            raise PromptSetError(f"{where}: not a readable parquet file ({err})") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise PromptSetError(f"{where}: not UTF-8 text (byte {err.start})") from None
    if text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise PromptSetError(f"{where}: not valid JSON at line {err.lineno} "
                                 f"({err.msg})") from None
        return list(data)
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise PromptSetError(f"{where}: line {number} is not valid JSON "
                                     f"({err.msg})") from None
    return records


def _row(record: Any, number: int, where: str, fmt: str
         ) -> tuple[dict[str, Any] | None, list[str]]:
    """One record as a row, and the non-English languages it holds."""
    if not isinstance(record, dict):
        raise PromptSetError(f"{where}: row {number} is a {type(record).__name__}, not an "
                             "object with an instruction")
    texts = record.get("text")
    if fmt == "parallel" or (fmt == "auto" and isinstance(texts, dict)):
        if not isinstance(texts, dict) or not isinstance(texts.get("en"), dict):
            raise PromptSetError(f"{where}: row {number}: field 'text.en.prompt' missing "
                                 "(a parallel row is {\"text\": {\"en\": {\"prompt\": ...}}})")
        found = {lang: _text(side.get("prompt") if isinstance(side, dict) else None,
                             number, where, f"text.{lang}.prompt")
                 for lang, side in texts.items()}
    else:
        found = {"en": _text(record.get("instruction"), number, where, "instruction")}
    english = found.pop("en")
    row_id = record.get("id")
    if row_id is not None and not isinstance(row_id, (str, int)):
        raise PromptSetError(f"{where}: row {number}: field 'id' must be text or a number")
    dataset = record.get("dataset")
    row = {"id": str(row_id) if row_id is not None else _item_id(english),
           "dataset": dataset if isinstance(dataset, str) else "",
           "instruction_en": english,
           **{f"instruction_{lang}": text for lang, text in sorted(found.items())}}
    return row, sorted(found)


def _text(value: Any, number: int, where: str, field: str) -> str:
    if not isinstance(value, str) or not value.strip():
        got = "missing" if value is None else "empty" if isinstance(value, str) else \
            f"a {type(value).__name__}"
        raise PromptSetError(f"{where}: row {number}: field {field!r} is {got} (an "
                             "instruction is non-empty text)")
    return normalise_text(value)


def _item_id(instruction: str) -> str:
    return "i-" + hashlib.sha256(instruction.encode("utf-8")).hexdigest()[:16]


# ------------------------------------------------------------------------------ preparing


def load_sweep_prompt_sets(spec: SweepSpec) -> list[PromptSet]:
    """Every prompt set of the spec, read and checked (cheap: the sweep does this first)."""
    options = spec.run.storage_options or None
    return [load_prompt_set(s, options) for s in spec.evaluation.prompt_sets]


def prepare_prompt_sets(spec: SweepSpec, sets: list[PromptSet]) -> PreparedSets:
    """One table per (set, target language, and English) in storage; what a set lacks is
    translated first (module docstring). Returns set name -> language -> URI."""
    options = spec.run.storage_options or None
    out: PreparedSets = {}
    for prompt_set in sets:
        missing = [lang for lang in spec.languages if lang not in prompt_set.languages]
        translated = _translate(spec, prompt_set, missing) if missing else {}
        root = RunLayout.of(spec).cache("prompt_sets", _key(spec, prompt_set, missing))
        out[prompt_set.name] = {}
        for lang in ["en", *spec.languages]:
            uri = storage.join(root, f"{lang}.parquet")
            if not storage.exists(uri, options):
                table = _language_table(prompt_set, lang, translated.get(lang))
                checked.write_parquet(uri, table, options)
            out[prompt_set.name][lang] = uri
        logger.info("prompt set %s: %d instructions, %s translated by the spec's translator "
                    "(%s)", prompt_set.name, prompt_set.table.num_rows, missing or "nothing",
                    root)
    return out


def read_prompts(uri: str, storage_options: dict | None = None) -> pa.Table:
    """A prepared (set, language) table: id, instruction_en, instruction, dataset."""
    return checked.read_parquet(uri, storage_options, fix="re-run the sweep: the driver "
                                "prepares prompt sets again when their table is removed")


def _key(spec: SweepSpec, prompt_set: PromptSet, translated: list[str]) -> str:
    from clo_ray.translate.preflight import translator_identity

    payload = {"format": PROMPT_SET_FORMAT, "set": prompt_set.fingerprint,
               "translated": sorted(translated),
               "translator": translator_identity(spec) if translated else None,
               "translator_settings": spec.translator.model_dump(mode="json")
               if translated else None}
    text = json.dumps(payload, sort_keys=True, ensure_ascii=False)
    return f"{prompt_set.name}-" + hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _translate(spec: SweepSpec, prompt_set: PromptSet, languages: list[str]
               ) -> dict[str, dict[str, str]]:
    """language -> item id -> translated instruction, through the translate stage."""
    from clo_ray.data.corpus import Corpus, CorpusStats, content_id
    from clo_ray.translate.cache import read_table
    from clo_ray.translate.stage import translate_corpus

    english = prompt_set.table.column("instruction_en").to_pylist()
    item_ids = prompt_set.table.column("id").to_pylist()
    corpus_ids = [content_id(text, "") for text in english]
    table = pa.table({"id": corpus_ids, "prompt": english, "response": [""] * len(english),
                      "source": [f"{prompt_set.path}:{i + 1}" for i in range(len(english))]})
    corpus = Corpus(table, CorpusStats(len(english), 0, 0), "prompt_set", prompt_set.path)
    results = translate_corpus(spec, corpus=corpus, languages=languages)
    options = spec.run.storage_options or None
    by_corpus_id = dict(zip(corpus_ids, item_ids, strict=True))
    out: dict[str, dict[str, str]] = {}
    for lang, result in results.items():
        rows = read_table(result.translations, options).to_pylist()
        out[lang] = {by_corpus_id[r["id"]]: r["prompt"] for r in rows if r["id"] in by_corpus_id}
        if len(out[lang]) < len(english):
            logger.warning("prompt set %s: %d of %d instructions have no accepted %s "
                           "translation and are left out of that language (%s)",
                           prompt_set.name, len(english) - len(out[lang]), len(english), lang,
                           result.rejects)
    return out


def _language_table(prompt_set: PromptSet, lang: str,
                    translated: dict[str, str] | None) -> pa.Table:
    table = prompt_set.table
    ids = table.column("id").to_pylist()
    english = table.column("instruction_en").to_pylist()
    if lang == "en":
        texts: list[str | None] = list(english)
    elif lang in prompt_set.languages:
        texts = table.column(f"instruction_{lang}").to_pylist()
    else:
        texts = [(translated or {}).get(i) for i in ids]
    keep = [i for i, text in enumerate(texts) if text]
    return pa.table({"id": [ids[i] for i in keep], "instruction_en": [english[i] for i in keep],
                     "instruction": [texts[i] for i in keep],
                     "dataset": [table.column("dataset")[i].as_py() for i in keep]})
