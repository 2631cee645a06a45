"""Split a text into translator-sized segments, protecting what must not be translated.

Translators (M2M100/NLLB, small LLMs) rewrite code, break URLs, turn "2.5 kg" into "2,5 kg"
or drop it, and lose markdown structure. So:

- fenced code blocks (``` or ~~~, any indentation, language tag, blank lines inside), blank
  lines, indentation, list / heading / blockquote markers, table pipes, the whitespace around
  each translated piece and pieces with no letters outside protected spans are segments with
  ``translate=False``, copied verbatim;
- in translated prose, inline code, URLs, e-mail addresses and numbers with a unit symbol
  become placeholders ``[[1]]``, ``[[2]]``, ... numbered from 1 within each segment;
- every line is its own unit, so a newline is never inside a translated segment and the
  output keeps the source's line structure exactly (answers often put a paragraph right after
  a list item with no blank line: 19 times in the bundled sample; a translator that merged
  the two lines would fold the paragraph into the item). A line longer than ``max_chars`` is
  split at sentence ends. Hard-wrapped prose is translated line by line (none in the sample).

Placeholder ``[[n]]``: ASCII, so it is in every translator's vocabulary (a rare symbol such as
"⟦" can be ``<unk>`` to an M2M100/NLLB sentencepiece model and vanish); brackets and digits
are what MT systems and LLMs copy unchanged (reference markers like "[1]" are everywhere in
their training data); doubled, it does not occur in prose, and it cannot collide by
construction: source text that looks like a placeholder is itself protected. Restoring
tolerates spaces inside, full-width "［［1］］", "【1】", "⟦1⟧" and full-width digits.

Round trip: ``reassemble(segs, [s.text for s in segs if s.translate]) == text`` byte for byte.
Not handled: 4-space indented code blocks (rare in chat data; translated as prose).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class Segment:
    text: str  # what the translator sees; protected inline spans replaced by placeholders
    translate: bool  # False: copied verbatim (code blocks, blank lines, markers, ...)
    spans: tuple[str, ...] = ()  # the protected inline spans, in placeholder order


# ---------------------------------------------------------------- patterns

_LINE = re.compile(r"[^\n]*\n|[^\n]+")  # lines with their endings ("\r\n" stays in the line)
_FENCE_OPEN = re.compile(r"[ \t]*(`{3,}|~{3,})(.*)")
# indentation, blockquote markers, then a heading or list marker (+ task box)
_PREFIX = re.compile(
    r"[ \t]*(?:>[ \t]?)*[ \t]*"
    r"(?:#{1,6}(?:[ \t]+|(?=\r?\n|$))|(?:[-*+]|\d{1,9}[.)])[ \t]+(?:\[[ xX]\][ \t]+)?)?"
)

_PLACEHOLDER = "[[{}]]"
_OURS = re.compile(r"\[\[(\d+)\]\]")  # exactly what we write
# what translators turn it into (also protected when it occurs in a source text)
_TOLERANT = re.compile(
    r"[\[［]\s*[\[［]\s*(\d+)\s*[\]］]\s*[\]］]|【\s*(\d+)\s*】|⟦\s*(\d+)\s*⟧"
)

# Unit symbols that read the same in every target language; words ("minutes", "cups") and
# word abbreviations that languages spell differently ("min" is "분" in Korean) are not here.
_UNITS = (
    "%", "‰", "°C", "°F", "° C", "° F", "°", "℃", "km/h", "m/s", "mph", "kg", "mg", "µg", "g",
    "lb", "lbs", "oz", "km", "cm", "mm", "µm", "nm", "m", "km²", "m²", "m³", "cm³", "ft",
    "ml", "mL", "dl", "cl", "l", "L", "kWh", "kW", "W", "V", "mAh", "Hz", "kHz", "MHz", "GHz",
    "KB", "kB", "MB", "GB", "TB", "ms", "px", "dpi", "fps", "rpm", "psi", "mmHg", "kcal",
)
_UNIT_ALT = "|".join(re.escape(u) for u in sorted(_UNITS, key=len, reverse=True))
_URL_CHARS = r"[A-Za-z0-9\-._~:/?#\[\]@!$&'()*+,;=%]"
_INLINE = re.compile(
    r"(?P<code>(`+)(?!`).*?[^`]\2(?!`))"
    rf"|(?P<url>(?:https?|ftp)://{_URL_CHARS}+|www\.{_URL_CHARS}+)"
    r"|(?P<mail>(?<![A-Za-z0-9._%+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*"
    r"\.[A-Za-z]{2,})"
    rf"|(?P<ph>{_TOLERANT.pattern})"
    rf"|(?P<unit>(?<![\w.,])\d+(?:[.,]\d+)*[ \u00a0\u202f]?(?:{_UNIT_ALT})(?![\w/²³]))"
)
_URL_TRAILING = ".,;:!?'\"*"
# sentence end: punctuation (+ closing quotes/brackets) then whitespace; CJK needs none
SENTENCE_END = re.compile(r"[.!?…]+[\"'”’»)\]]*(?=\s)|[。！？]+[\"'”’」』）]*")


def _trim_url(url: str) -> str:
    """Drop sentence punctuation after a URL and an unbalanced ")" or "]" (a URL in
    parentheses), but keep "https://en.wikipedia.org/wiki/Foo_(bar)"."""
    while url and (url[-1] in _URL_TRAILING
                   or url[-1] == ")" and url.count(")") > url.count("(")
                   or url[-1] == "]" and url.count("]") > url.count("[")):
        url = url[:-1]
    return url


def _inline_spans(text: str, units: bool = True) -> Iterator[tuple[int, int]]:
    """(start, end) of every protected inline span, left to right, non-overlapping."""
    pos = 0
    while (m := _INLINE.search(text, pos)) is not None:
        start, end = m.span()
        if m.group("url"):
            end = start + len(_trim_url(m.group("url")))
        if end > start and (units or not m.group("unit")):
            yield start, end
        pos = max(end, start + 1)


def _blocks(text: str) -> Iterator[tuple[bool, list[str]]]:
    """(is_fence, lines) runs: fenced code blocks (open to close, or to the end when the
    fence is never closed, as markdown renders it) and the lines between them."""
    lines = _LINE.findall(text)
    run: list[str] = []
    i = 0
    while i < len(lines):
        m = _FENCE_OPEN.fullmatch(lines[i].rstrip("\r\n"))
        if m is None or (m.group(1)[0] == "`" and "`" in m.group(2)):
            run.append(lines[i])
            i += 1
            continue
        if run:
            yield False, run
            run = []
        close = re.compile(rf"[ \t]*{re.escape(m.group(1)[0])}{{{len(m.group(1))},}}[ \t]*")
        j = i + 1
        while j < len(lines) and not close.fullmatch(lines[j].rstrip("\r\n")):
            j += 1
        yield True, lines[i : j + 1]
        i = j + 1
    if run:
        yield False, run


# ---------------------------------------------------------------- segment / reassemble


class _Builder:
    """Collects segments, merging neighbouring verbatim ones."""

    def __init__(self) -> None:
        self.segments: list[Segment] = []

    def verbatim(self, text: str) -> None:
        if not text:
            return
        if self.segments and not self.segments[-1].translate:
            text = self.segments.pop().text + text
        self.segments.append(Segment(text, False))

    def prose(self, masked: str, spans: list[str]) -> None:
        """One translated piece (already split to size): surrounding whitespace and pieces
        with no letters outside placeholders go verbatim; placeholders renumber from 1."""
        core = masked.strip()
        lead = masked[: len(masked) - len(masked.lstrip())]
        trail = masked[len(lead) + len(core) :]
        self.verbatim(_unmask(lead, spans))
        if any(ch.isalpha() for ch in _OURS.sub("", core)):
            local: list[str] = []

            def renumber(m: re.Match[str]) -> str:
                local.append(spans[int(m.group(1)) - 1])
                return _PLACEHOLDER.format(len(local))

            self.segments.append(Segment(_OURS.sub(renumber, core), True, tuple(local)))
        else:
            self.verbatim(_unmask(core, spans))
        self.verbatim(_unmask(trail, spans))


def _mask(text: str, units: bool) -> tuple[str, list[str]]:
    spans: list[str] = []
    out: list[str] = []
    pos = 0
    for start, end in _inline_spans(text, units):
        spans.append(text[start:end])
        out += [text[pos:start], _PLACEHOLDER.format(len(spans))]
        pos = end
    return "".join(out) + text[pos:], spans


def _unmask(text: str, spans: list[str]) -> str:
    return _OURS.sub(lambda m: spans[int(m.group(1)) - 1], text)


def _sentences(masked: str, max_chars: int) -> Iterator[str]:
    """Pieces of at most ``max_chars`` (stripped) cut at sentence ends; a single sentence
    longer than that is one piece (cutting mid-sentence ruins the translation)."""
    if len(masked.strip()) <= max_chars:
        yield masked
        return
    cuts = [m.end() for m in SENTENCE_END.finditer(masked)]
    start = chunk_end = 0
    for cut in [*cuts, len(masked)]:
        if len(masked[start:cut].strip()) > max_chars and chunk_end > start:
            yield masked[start:chunk_end]
            start = chunk_end
        chunk_end = cut
    if start < len(masked):
        yield masked[start:]


def segment(text: str, max_chars: int = 1000, *, units: bool = True) -> list[Segment]:
    """Segments of ``text`` in order; their texts, with placeholders restored, concatenate to
    ``text`` exactly. ``max_chars`` bounds a translated segment's text unless one sentence is
    longer (then that sentence is one segment). ``units=False`` lets the translator localise
    numbers with units ("5 km" is "km 5" in Swahili, "8 厘米" in Chinese) instead of keeping
    them verbatim."""
    out = _Builder()
    for is_fence, lines in _blocks(text):
        if is_fence:
            out.verbatim("".join(lines))
            continue
        for line in lines:
            prefix = _PREFIX.match(line).group()  # type: ignore[union-attr]
            out.verbatim(prefix)
            masked, spans = _mask(line[len(prefix) :], units)
            if line.lstrip().startswith("|"):  # table row: cells translate one by one
                for i, cell in enumerate(re.split(r"(\|)", masked)):
                    if i % 2:
                        out.verbatim(cell)
                    else:
                        out.prose(cell, spans)
                continue
            for piece in _sentences(masked, max_chars):
                out.prose(piece, spans)
    return out.segments


def _restore(segment: Segment, translation: str) -> tuple[str, set[int]]:
    found: set[int] = set()

    def put_back(m: re.Match[str]) -> str:
        index = int(next(g for g in m.groups() if g is not None))
        if not 1 <= index <= len(segment.spans):
            return m.group()  # not one of ours: leave the translator's text alone
        found.add(index)
        return segment.spans[index - 1]

    return _TOLERANT.sub(put_back, translation.strip()), found


def _translated(
    segments: list[Segment], translations: list[str]
) -> Iterator[tuple[Segment, str | None]]:
    wanted = sum(s.translate for s in segments)
    if len(translations) != wanted:
        raise ValueError(f"{len(translations)} translations for {wanted} translated segments")
    it = iter(translations)
    for seg in segments:
        yield seg, (next(it) if seg.translate else None)


def reassemble(segments: list[Segment], translations: list[str]) -> str:
    """The translated text: verbatim segments as they were, each translated one replaced by
    its translation (stripped: the whitespace around it is a verbatim segment) with the
    placeholders restored. A placeholder the translator lost is simply missing (see
    ``missing_spans``)."""
    return "".join(
        seg.text if tr is None else _restore(seg, tr)[0]
        for seg, tr in _translated(segments, translations)
    )


def missing_spans(segments: list[Segment], translations: list[str]) -> list[str]:
    """Protected spans whose placeholder is not in the translation (dropped or mangled
    beyond what restoring tolerates), in text order."""
    lost: list[str] = []
    for seg, tr in _translated(segments, translations):
        if tr is not None:
            found = _restore(seg, tr)[1]
            lost += [s for i, s in enumerate(seg.spans, 1) if i not in found]
    return lost


# ---------------------------------------------------------------- comparing texts


def _ranges(text: str, units: bool = True) -> Iterator[tuple[int, int]]:
    """(start, end) of every protected span: fenced blocks (without the whitespace around
    them) and inline spans."""
    pos = 0
    for is_fence, lines in _blocks(text):
        block = "".join(lines)
        if is_fence:
            yield pos + len(block) - len(block.lstrip()), pos + len(block.rstrip())
        else:
            yield from ((pos + a, pos + b) for a, b in _inline_spans(block, units))
        pos += len(block)


def protected_spans(text: str, *, units: bool = True) -> list[str]:
    """Fenced code blocks (fence lines included), inline code, URLs, e-mail addresses and
    (``units=True``) numbers with units, in text order."""
    return [text[a:b] for a, b in _ranges(text, units)]


def dropped_spans(source: str, translation: str) -> list[str]:
    """Protected spans of ``source`` that do not occur (as often) in ``translation``: the
    check for translations made without placeholders (a parallel file, a whole-text LLM).
    Numbers with units are not compared: good human translations localise them (the
    bundled sample has "8 厘米" for "8 cm" and "gramu 500" for "500 g")."""
    wanted = Counter(protected_spans(source, units=False))
    return [s for s, n in wanted.items() for _ in range(n - translation.count(s))]


def prose(text: str) -> str:
    """``text`` with every protected span replaced by a space: what language id, length
    ratio and repetition checks look at."""
    out: list[str] = []
    pos = 0
    for a, b in _ranges(text):
        out += [text[pos:a], " "]
        pos = b
    return "".join(out) + text[pos:]
