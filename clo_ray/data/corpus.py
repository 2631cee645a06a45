"""Load an English corpus into rows ``{id, prompt, response, source}`` (SFT), or
``{id, prompt, response, rejected, source}`` (preferences: ``response`` is the chosen answer).

The first stage of a sweep: everything after it (translation, pairs, training) is expensive
and content-addressed, so this module validates the whole file before returning, names the
file, line/row and field of the first bad row, and gives every row an id that is a hash of its
content. Row formats live in ``corpus_formats``; this module knows files, ids and duplicates.

Files: ``.jsonl`` (one object per line), ``.json`` (a list of objects, or an object with one
list value such as ``{"data": [...]}``), ``.parquet``; ``.gz`` on the JSON ones. Locations are
1-based line numbers for jsonl and 0-based row indices for json and parquet (the index a JSON
array or a parquet reader shows), both in error messages and in the ``source`` column.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import itertools
import json
import logging
import os
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from clo_ray import storage
from clo_ray.assets import PARALLEL_SAMPLE_REF, PREFERENCE_SAMPLE_REF, builtin_corpus_path
from clo_ray.data import corpus_formats as formats
from clo_ray.data.row_fields import Pair, Preference, RowProblem, Skip
from clo_ray.errors import CorpusError

if TYPE_CHECKING:
    import ray.data

logger = logging.getLogger(__name__)
# A readable binary file: pyarrow's NativeFile, or a GzipFile around one.
Stream = Any

SCHEMA = pa.schema([("id", pa.string()), ("prompt", pa.string()),
                    ("response", pa.string()), ("source", pa.string())])
# A preference corpus: the chosen answer is ``response`` (so SFT and CLO read it unchanged)
PREFERENCE_SCHEMA = SCHEMA.insert(3, pa.field("rejected", pa.string()))
FILE_TYPES = {".jsonl": "jsonl", ".jsonl.gz": "jsonl", ".json": "json", ".json.gz": "json",
              ".parquet": "parquet"}
_LISTED = 5  # locations of further bad rows named in an error message


@dataclass(frozen=True)
class CorpusStats:
    """What loading did to the file's rows (logged, and kept for the sweep's report)."""

    rows_read: int  # jsonl lines with content / json or parquet rows (oasst1 flat: messages)
    duplicates_removed: int  # exact duplicates after normalisation; the first one is kept
    dropped_by_max_rows: int
    oasst1_other_language: int = 0  # root prompts whose lang is not source_language
    oasst1_prompt_removed: int = 0  # root prompts deleted or rejected by review
    oasst1_no_ranked_reply: int = 0  # root prompts without a ranked, kept assistant reply
    same_answers: int = 0  # preference rows whose chosen and rejected texts are equal

    def summary(self) -> str:
        """``250 read`` plus every count that is not zero (``3 duplicates_removed``, ...)."""
        counts = [f"{value} {name}" for name, value in vars(self).items()
                  if name != "rows_read" and value]
        return ", ".join([f"{self.rows_read} read", *counts])


@dataclass(frozen=True)
class Corpus:
    """A validated corpus: ``table`` has columns id, prompt, response, source (all strings)."""

    table: pa.Table
    stats: CorpusStats
    format: str  # the format it was read as (never "auto")
    path: str

    def __len__(self) -> int:
        return self.table.num_rows

    @property
    def preferences(self) -> bool:
        """Whether rows hold a rejected answer too (a preference corpus)."""
        return "rejected" in self.table.column_names

    @property
    def fingerprint(self) -> str:
        return corpus_fingerprint(self.table)


# ---------------------------------------------------------------- ids


def normalise_text(text: str) -> str:
    """Strip and turn CRLF/CR into LF: the same text typed on two systems is one row."""
    return text.replace("\r\n", "\n").replace("\r", "\n").strip()


def content_id(prompt: str, response: str, rejected: str | None = None) -> str:
    """``c-`` + 16 hex chars of sha256 over the normalised pair, or the normalised preference
    with its ``rejected`` answer (JSON-encoded: unambiguous)."""
    texts = [prompt, response] if rejected is None else [prompt, response, rejected]
    payload = json.dumps([normalise_text(t) for t in texts], ensure_ascii=False)
    return "c-" + hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]


def corpus_fingerprint(table: pa.Table) -> str:
    """16 hex chars of sha256 over the ``id`` column in order: a cache key for the content.

    Ids are content hashes, so two tables with the same rows in the same order share a
    fingerprint whatever file or format they came from.
    """
    if "id" not in table.column_names:
        raise ValueError(f"corpus_fingerprint needs an 'id' column, got {table.column_names}")
    digest = hashlib.sha256()
    for chunk in table.column("id").chunks:
        for row_id in chunk.to_pylist():
            digest.update(row_id.encode("utf-8") + b"\n")
    return digest.hexdigest()[:16]


def to_ray_dataset(corpus: Corpus) -> ray.data.Dataset:
    """The corpus as a ``ray.data.Dataset`` (Ray is imported here: loading needs no cluster)."""
    import ray.data

    return ray.data.from_arrow(corpus.table)


# ---------------------------------------------------------------- locating and reading


@dataclass(frozen=True, order=True)
class Where:
    """A row's location: 1-based line (jsonl) or 0-based row index (json, parquet)."""

    number: int
    kind: str  # "line" or "row"

    def __str__(self) -> str:
        return f"{self.kind} {self.number}"


@dataclass(frozen=True)
class _Source:
    uri: str  # what storage opens
    display: str  # what error messages call it: the path as the user wrote it
    name: str  # the file name, for the source column
    kind: str  # jsonl | json | parquet
    gzipped: bool
    storage_options: dict | None = None


def _locate(path: str, fmt: str, storage_options: dict | None) -> tuple[_Source, str]:
    """Check the reference, suffix and existence before reading a byte."""
    if fmt != "auto" and fmt not in formats.FORMATS:
        raise CorpusError(f"{path}: unknown corpus format {fmt!r}; use 'auto' or one of: "
                          f"{', '.join(formats.FORMATS)}")
    local = builtin_corpus_path(path)
    if local is not None:
        if fmt not in ("auto", "parallel"):
            raise CorpusError(f"{path} is a 'parallel' corpus, not {fmt!r}")
        return _Source(str(local), path, local.name, "jsonl", False), "parallel"
    if path.startswith("builtin:"):
        raise CorpusError(f"unknown built-in corpus {path!r}; known: {PARALLEL_SAMPLE_REF}, "
                          f"{PREFERENCE_SAMPLE_REF}")
    lower = path.lower()
    suffix = next((s for s in sorted(FILE_TYPES, key=len, reverse=True) if lower.endswith(s)), "")
    if not suffix:
        raise CorpusError(f"{path}: unsupported file type; expected one of "
                          f"{', '.join(FILE_TYPES)}")
    try:
        fs, resolved = storage.resolve(path, storage_options)
        info = fs.get_file_info(resolved)
    except (ValueError, OSError) as exc:
        raise CorpusError(f"{path}: {exc}") from None
    if info.type == pafs.FileType.NotFound:
        raise CorpusError(f"{path}: file not found")
    if info.type != pafs.FileType.File:
        raise CorpusError(f"{path}: not a file (a directory?); pass one corpus file")
    name = resolved.replace("\\", "/").rsplit("/", 1)[-1]
    kind = FILE_TYPES[suffix]
    return _Source(path, path, name, kind, suffix.endswith(".gz"), storage_options), fmt


def _read(src: _Source) -> Iterator[tuple[Where, Any]]:
    """Parsed rows in file order; a broken jsonl line comes through as a RowProblem."""
    readers = {"jsonl": _jsonl_rows, "json": _json_rows, "parquet": _parquet_rows}
    try:
        with storage.open_input(src.uri, src.storage_options) as raw:
            stream: Stream = gzip.GzipFile(fileobj=raw) if src.gzipped else raw
            yield from readers[src.kind](stream, src)
    except (OSError, EOFError, zlib.error) as exc:
        what = "corrupt gzip file" if src.gzipped else "cannot read the file"
        raise CorpusError(f"{src.display}: {what} ({exc})") from None


def _jsonl_rows(stream: Stream, src: _Source) -> Iterator[tuple[Where, Any]]:
    for number, raw in enumerate(io.BufferedReader(stream), start=1):
        if raw.strip():  # blank lines (a trailing newline, say) are not rows
            yield Where(number, "line"), _parse_line(raw, "utf-8-sig" if number == 1 else "utf-8")


def _parse_line(raw: bytes, encoding: str) -> Any:
    """A parsed jsonl line, or a RowProblem so the scan can go on and count the others."""
    try:
        return json.loads(raw.decode(encoding))
    except UnicodeDecodeError as exc:
        return RowProblem(None, f"not UTF-8 text ({exc.reason} at byte {exc.start})")
    except json.JSONDecodeError as exc:
        return RowProblem(None, f"broken JSON: {exc.msg} (column {exc.colno})")


def _json_rows(stream: Stream, src: _Source) -> Iterator[tuple[Where, Any]]:
    try:
        data = json.loads(stream.read().decode("utf-8-sig"))
    except UnicodeDecodeError as exc:
        raise CorpusError(f"{src.display}: not UTF-8 text ({exc.reason} at byte "
                          f"{exc.start})") from None
    except json.JSONDecodeError as exc:
        hint = ("; one JSON object per line belongs in a .jsonl file"
                if exc.msg == "Extra data" else "")
        raise CorpusError(f"{src.display} line {exc.lineno} column {exc.colno}: broken JSON: "
                          f"{exc.msg}{hint}") from None
    yield from ((Where(i, "row"), row) for i, row in enumerate(_top_level_list(data, src)))


def _top_level_list(data: Any, src: _Source) -> list[Any]:
    """A list of rows, or the one list inside an object such as ``{"data": [...]}``."""
    if isinstance(data, list):
        return data
    lists = [v for v in data.values() if isinstance(v, list)] if isinstance(data, dict) else []
    if len(lists) == 1:
        return lists[0]
    got = (f"an object with keys {', '.join(data)}" if isinstance(data, dict)
           else formats.describe(data))
    raise CorpusError(f"{src.display}: top-level JSON must be a list of objects or an object "
                      f"with one list value (e.g. {{\"data\": [...]}}), got {got}")


def _parquet_rows(stream: Stream, src: _Source) -> Iterator[tuple[Where, Any]]:
    index = 0
    try:
        for batch in pq.ParquetFile(stream).iter_batches(batch_size=4096):
            for row in batch.to_pylist():
                yield Where(index, "row"), row
                index += 1
    except (pa.ArrowException, ValueError) as exc:
        where = f" row {index}" if index else ""
        raise CorpusError(f"{src.display}{where}: not a readable parquet file ({exc})") from None


# ---------------------------------------------------------------- one validating pass


@dataclass
class _Scan:
    """State of the pass over one file: counts, and the first bad row plus how many more.

    One clear error beats a flood; the count and a few more locations tell the user whether
    it is one typo or the wrong format for the whole file.
    """

    src: _Source
    rows_read: int = 0
    skips: Counter[Skip] = field(default_factory=Counter)
    problems: list[tuple[Where, RowProblem]] = field(default_factory=list)

    def objects(self, rows: Iterable[tuple[Where, Any]]) -> Iterator[tuple[Where, dict]]:
        for where, row in rows:
            self.rows_read += 1
            if isinstance(row, RowProblem):
                self.problems.append((where, row))
            elif not isinstance(row, dict):
                self.problems.append((where, RowProblem(
                    None, f"expected a JSON object, got {formats.describe(row)}")))
            else:
                yield where, row

    def raise_if_bad(self, note: str = "") -> None:
        if not self.problems:
            return
        self.problems.sort(key=lambda item: item[0])
        (where, problem), rest = self.problems[0], self.problems[1:]
        message = f"{self.src.display} {where}: {problem}"
        if rest:
            shown = ", ".join(str(w.number) for w, _ in rest[:_LISTED])
            more = ", ..." if len(rest) > _LISTED else ""
            plural = "s" if len(rest) > 1 else ""
            message += (f" ... and {len(rest)} more malformed row{plural} "
                        f"({where.kind}{plural} {shown}{more})")
        raise CorpusError(message + note)


def _detect(first: tuple[Where, dict], src: _Source, lang: str) -> str:
    where, row = first
    fmt = formats.detect(row, lang)
    if fmt is None:
        known = "; ".join(f"{name} ({keys})" for name, keys in formats.FORMAT_KEYS.items())
        raise CorpusError(f"{src.display}: cannot detect the corpus format from {where}'s keys "
                          f"({', '.join(map(str, row)) or 'none'}); pass format= one of: {known}")
    return fmt


def _check_columns(src: _Source, columns: Iterable[str], fmt: str, variant: str,
                   lang: str) -> None:
    """A parquet file missing a column fails once, not on every row."""
    present = list(columns)
    missing = [c for c in formats.required_columns(variant, lang) if c not in present]
    if missing:
        raise CorpusError(f"{src.display}: parquet file has no column {missing[0]!r}, needed by "
                          f"format {fmt!r} (columns: {', '.join(present)})")


def _table(outcomes: Iterable[tuple[Where, formats.Outcome]], scan: _Scan
           ) -> tuple[dict[str, list[str]], int]:
    """Columns of the kept rows (first of each duplicate) and the number of duplicates.

    The first kept row decides SFT or preference: a file mixing both is a problem at the
    first row of the other kind (one corpus trains one kind of loss).
    """
    columns: dict[str, list[str]] = {}
    seen: set[str] = set()
    duplicates = 0
    for where, outcome in outcomes:
        if isinstance(outcome, RowProblem):
            scan.problems.append((where, outcome))
        elif isinstance(outcome, Skip):
            scan.skips[outcome] += 1
        elif columns and (len(outcome) == 3) != ("rejected" in columns):
            kind = "a preference (prompt, chosen, rejected)" if len(outcome) == 3 else \
                "an SFT pair (prompt, response)"
            scan.problems.append((where, RowProblem(None, f"{kind}, but the file's first rows "
                                                    "are of the other kind; keep SFT and "
                                                    "preference data in separate corpora")))
        elif not scan.problems:  # once the file is bad, only keep counting problems
            if not columns:
                schema = PREFERENCE_SCHEMA if len(outcome) == 3 else SCHEMA
                columns = {name: [] for name in schema.names}
            duplicates += not _append(columns, seen, outcome, f"{scan.src.name}:{where.number}")
    return columns or {name: [] for name in SCHEMA.names}, duplicates


def _append(columns: dict[str, list[str]], seen: set[str], row: Pair | Preference,
            source: str) -> bool:
    texts = [normalise_text(t) for t in row]
    row_id = content_id(*texts)
    if row_id in seen:
        return False
    seen.add(row_id)
    values = {"id": row_id, "prompt": texts[0], "response": texts[1], "source": source}
    if len(texts) == 3:
        values["rejected"] = texts[2]
    for name, value in values.items():
        columns[name].append(value)
    return True


# ---------------------------------------------------------------- entry point


def load_corpus(
    path: str | os.PathLike[str],
    format: str = "auto",
    *,
    source_language: str = "en",
    max_rows: int | None = None,
    storage_options: dict | None = None,
) -> Corpus:
    """Read, validate, normalise and de-duplicate an English SFT corpus.

    ``path``: a local path, ``s3://`` / ``gs://`` URI (``storage_options`` go to pyarrow.fs),
    or ``builtin:parallel-sample``. ``format``: "auto" (from the first row's keys) or one of
    alpaca, sharegpt, messages, prompt_response, oasst1, parallel. ``source_language`` picks
    the oasst1 root prompts (the paper's selection: English roots, top-ranked reply) and the
    side of a parallel file; other formats are taken as already in that language.

    Ids are content hashes (``content_id``), never the file's own ids, so dedup and every
    downstream cache are content-addressed; ``source`` is "<file name>:<line or row>" (see
    the module docstring). The whole file is validated even with ``max_rows`` (applied after
    dedup, keeping file order): the caller starts expensive work on the result. Raises
    CorpusError naming file, line/row and field of the first bad row.
    """
    path = os.fspath(path)
    if max_rows is not None and max_rows < 1:
        raise ValueError(f"max_rows must be a positive integer or None, got {max_rows!r}")
    src, fmt = _locate(path, format, storage_options)
    scan = _Scan(src)
    rows = scan.objects(_read(src))
    first = next(rows, None)
    if first is None:
        scan.raise_if_bad()
        raise CorpusError(f"{src.display}: the file has no rows")
    detected = fmt == "auto"
    fmt = _detect(first, src, source_language) if detected else fmt
    variant = formats.variant(fmt, first[1])
    if src.kind == "parquet":
        _check_columns(src, first[1], fmt, variant, source_language)
    outcomes = formats.extract(variant, itertools.chain([first], rows), source_language)
    columns, duplicates = _table(outcomes, scan)
    scan.raise_if_bad(f" [read as format {fmt!r}"
                      f"{f', detected from {first[0]}' if detected else ''}]")
    kept = len(columns["id"])
    if not kept and scan.skips[Skip.SAME_ANSWERS]:
        raise CorpusError(f"{src.display}: all {scan.skips[Skip.SAME_ANSWERS]} preference "
                          "row(s) have the same chosen and rejected text")
    if not kept:  # oasst1 skips rows: every other row is a pair or a problem
        raise CorpusError(f"{src.display}: "
                          f"{formats.oasst1_empty_reason(scan.skips, source_language)}")
    if max_rows is not None:
        columns = {name: values[:max_rows] for name, values in columns.items()}
    stats = CorpusStats(
        rows_read=scan.rows_read,
        duplicates_removed=duplicates,
        dropped_by_max_rows=kept - len(columns["id"]),
        oasst1_other_language=scan.skips[Skip.OTHER_LANGUAGE],
        oasst1_prompt_removed=scan.skips[Skip.PROMPT_REMOVED],
        oasst1_no_ranked_reply=scan.skips[Skip.NO_RANKED_REPLY],
        same_answers=scan.skips[Skip.SAME_ANSWERS],
    )
    table = pa.table(columns, schema=PREFERENCE_SCHEMA if "rejected" in columns else SCHEMA)
    logger.info("corpus: %d rows from %s (%s; %s)", table.num_rows, src.display, fmt,
                stats.summary())
    return Corpus(table, stats, fmt, path)
