"""Quality checks on one translation, and the per-language report of their outcomes.

A bad translation that slips into training teaches the model the very failure CLO fixes
(answering in English, or in the wrong language), so every check names a reason and a failing
row goes to the rejects table with it; nothing is dropped silently. The checks look at the
*prose*: code, URLs, e-mail addresses and numbers with units are removed first
(``segment.prose``), since they are the same in every language.

Measured on the bundled parallel sample (250 rows x prompt/response, en -> 6 languages), which
the defaults must pass with margin:

- length: characters of prose, with one Han character counted as 3.5 and one Hangul syllable
  as 2.5 (the sample's median English characters per zh/ko character: 3.46 and 2.62). Raw zh
  ratios run 0.20-0.58, which sits on the default lower bound 0.15; weighted, every language
  runs ~0.7-2.0, so the same bounds catch a 4x-too-short Chinese output as well as a German
  one.
- language id: py3langid among every registered language and its confusables (wider than the
  target's own set: a Swahili output for a Yoruba request must come out as Swahili, not as a
  low-confidence Yoruba). Sample confidences: min 0.55 (Indonesian vs Malay), others >= 0.82.
  Prose under ``MIN_CHECKED_CHARS`` (weighted) is too short to identify reliably and is not
  language-checked; neither is its length ratio judged.
- repetition: the fraction of word 3-grams (character 4-grams for CJK text, which has no
  spaces) that repeat an earlier one. Sample max: 0.17 (Korean), English 0.09; a "the the
  the" loop is ~1.0. A source that is itself repetitive (a song, a list) raises the bar to
  its own fraction + 0.1, so a faithful translation of it is not a "loop".
- dropped sentence: seq2seq translators (NLLB, M2M100) are known to end a multi-sentence
  input early, silently (fairseq #5108, #4167; CTranslate2 #1040): the output is fluent, in
  the right language, and often within the length bounds. A translation with fewer sentences
  (``segment``'s sentence ends, CJK ones included, counted line by line so that a list item
  or a sentence ending in ":" counts) than a source of two or more fails. On the sample, 7 of
  the 1,542 multi-sentence texts x languages have fewer (4 zh, 3 de: two short questions
  joined by a comma): 0.45% would be flagged wrongly, so the check applies to a model's
  translations only (the stage passes ``sentences=True`` unless the backend is a parallel
  file), and the ``retry`` policy translates a flagged row again one sentence per segment,
  which a faithful merge passes too.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from clo_ray.data.langid import detect
from clo_ray.languages import LANGUAGES, langid_candidates
from clo_ray.translate.segment import SENTENCE_END, prose

REASONS = ("translator_error", "empty", "wrong_language", "length_ratio", "repetition",
           "dropped_sentence", "protected_lost")
MIN_CHECKED_CHARS = 20  # weighted prose characters below which language and length are not judged
SCRIPT_WEIGHT = {"han": 3.5, "hangul": 2.5}  # English characters per character of the script
REPEAT_MARGIN = 0.1  # a translation may repeat as much as its source plus this

_HAN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
_HANGUL = re.compile(r"[\uac00-\ud7af\u1100-\u11ff\u3130-\u318f]")
_CJK_CHAR = r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af]"
_TOKEN = re.compile(rf"{_CJK_CHAR}|[^\W_]+")


@dataclass(frozen=True)
class QualityConfig:
    langid_threshold: float = 0.5  # minimum language-id confidence for the target
    length_ratio: tuple[float, float] = (0.15, 4.0)  # weighted prose chars, translation/source
    max_repeat_fraction: float = 0.3  # repeated n-grams above this: a degenerate loop

    @classmethod
    def from_section(cls, section: Any) -> QualityConfig:
        """From the spec's ``QualitySection`` (or anything with the same attributes)."""
        low, high = section.length_ratio
        return cls(float(section.langid_threshold), (float(low), float(high)),
                   float(section.max_repeat_fraction))


def weighted_length(text: str) -> float:
    """Characters of ``text`` (stripped) in English-equivalent units (see SCRIPT_WEIGHT)."""
    text = text.strip()
    han, hangul = len(_HAN.findall(text)), len(_HANGUL.findall(text))
    return (len(text) - han - hangul + han * SCRIPT_WEIGHT["han"]
            + hangul * SCRIPT_WEIGHT["hangul"])


def repetition(text: str) -> float:
    """Fraction of n-grams that repeat an earlier one: word 3-grams, or character 4-grams
    when most tokens are CJK characters. 0 for texts with fewer than 8 n-grams."""
    tokens = [t.lower() for t in _TOKEN.findall(text)]
    cjk = sum(len(t) == 1 and re.fullmatch(_CJK_CHAR, t) is not None for t in tokens)
    n = 4 if 2 * cjk > len(tokens) else 3
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    return 0.0 if len(grams) < 8 else 1 - len(set(grams)) / len(grams)


def sentence_count(text: str) -> int:
    """Sentences in ``text``, line by line: each line's sentence ends, plus its last sentence
    when that has no end mark (a list item, a sentence ending in ":")."""
    count = 0
    for line in text.splitlines():
        padded = line.strip() + " "  # a final "." is followed by nothing: let it count
        ends = list(SENTENCE_END.finditer(padded))
        tail = padded[ends[-1].end():] if ends else padded
        count += len(ends) + (1 if _TOKEN.search(tail) else 0)
    return count


def check_translation(source: str, translation: str, target: str, config: QualityConfig,
                      *, lost_spans: Sequence[str] = (),
                      candidates: tuple[str, ...] | None = None,
                      sentences: bool = False) -> list[str]:
    """Reasons ``translation`` (of English ``source`` into ``target``) fails, in REASONS
    order; ``[]`` passes. ``lost_spans``: protected spans the translator dropped
    (``segment.missing_spans`` or ``segment.dropped_spans``). ``candidates``: language-id
    labels to choose among (default: every registered language and its confusables).
    ``sentences``: also check that no sentence was dropped (a model's translation; a parallel
    file's human translation may join two sentences and is not held to it)."""
    lost = ["protected_lost"] if lost_spans else []
    if not translation.strip():
        return ["empty", *lost]  # the other checks would only repeat it
    reasons: list[str] = []
    src, out = prose(source), prose(translation)
    src_len, out_len = weighted_length(src), weighted_length(out)
    if out_len >= MIN_CHECKED_CHARS:
        labels = candidates or tuple(langid_candidates([target, *LANGUAGES]))
        found = detect(out, labels)
        if found.code != target or found.confidence < config.langid_threshold:
            reasons.append("wrong_language")
    if src_len >= MIN_CHECKED_CHARS:
        low, high = config.length_ratio
        if not low <= out_len / src_len <= high:
            reasons.append("length_ratio")
    if repetition(out) > max(config.max_repeat_fraction, repetition(src) + REPEAT_MARGIN):
        reasons.append("repetition")
    if sentences and (count := sentence_count(src)) >= 2 and sentence_count(out) < count:
        reasons.append("dropped_sentence")
    return reasons + lost


# ---------------------------------------------------------------- report


def quality_report(rows: pa.Table) -> pa.Table:
    """One row per language (sorted): ``language, total, passed`` and a count per reason.
    ``rows`` needs columns ``language`` (string) and ``reasons`` (list<string>; null or
    empty = passed). A row failing two checks counts under both reasons."""
    totals: Counter[str] = Counter()
    passed: Counter[str] = Counter()
    counts: Counter[tuple[str, str]] = Counter()
    for language, reasons in zip(rows.column("language").to_pylist(),
                                 rows.column("reasons").to_pylist(), strict=True):
        totals[language] += 1
        passed[language] += not reasons
        counts.update((language, r) for r in set(reasons or ()))
    unknown = {r for _, r in counts} - set(REASONS)
    if unknown:
        raise ValueError(f"unknown reasons {sorted(unknown)}; known: {REASONS}")
    languages = sorted(totals)
    columns: dict[str, list[Any]] = {
        "language": languages,
        "total": [totals[lang] for lang in languages],
        "passed": [passed[lang] for lang in languages],
    }
    for reason in REASONS:
        columns[reason] = [counts[lang, reason] for lang in languages]
    schema = pa.schema([("language", pa.string())]
                       + [(name, pa.int64()) for name in list(columns)[1:]])
    return pa.table(columns, schema=schema)


def format_report(report: pa.Table) -> str:
    """``report`` as a fixed-width console table, with the pass rate per language."""
    names = report.column_names
    rows = [[str(v) for v in row.values()] for row in report.to_pylist()]
    header = [*names, "pass%"]
    for row, total, ok in zip(rows, report.column("total").to_pylist(),
                              report.column("passed").to_pylist(), strict=True):
        row.append(f"{100 * ok / total:.1f}" if total else "-")
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(header)]
    lines = ["  ".join(h.rjust(w) if i else h.ljust(w)
                       for i, (h, w) in enumerate(zip(header, widths, strict=True)))]
    for row in rows:
        lines.append("  ".join(v.rjust(w) if i else v.ljust(w)
                               for i, (v, w) in enumerate(zip(row, widths, strict=True))))
    return "\n".join(lines)
