"""Row formats of English corpora: turn one parsed row into a (prompt, response) pair, or a
(prompt, chosen, rejected) preference.

Kept apart from ``corpus.py`` (files, ids, dedup) so each format is a small function that can
be read on its own. A format never sees files: it raises ``RowProblem`` naming the field, and
the loader adds the file and line. oasst1 is the one format that needs more than one row at a
time (a flat export spreads a conversation over rows), so it has its own selection function.
Field checks live in :mod:`clo_ray.data.row_fields`, the preference formats in
:mod:`clo_ray.data.preference_formats`; this module holds the SFT formats and the registry.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TypeVar

from clo_ray.data.preference_formats import parallel_preference, plain_preference, ultrafeedback
from clo_ray.data.row_fields import (
    MESSAGES,
    SHAREGPT,
    Pair,
    Preference,
    Row,
    RowProblem,
    Skip,
    choice,
    describe,
    field,
    obj,
    text,
)

__all__ = ["FORMATS", "RowProblem", "Skip", "describe", "detect", "extract", "variant"]
W = TypeVar("W")  # a row locator; only the loader knows what it is

FORMATS = ("alpaca", "sharegpt", "messages", "prompt_response", "oasst1", "parallel",
           "ultrafeedback", "preference")
PREFERENCE_FORMATS = ("ultrafeedback", "preference")  # "parallel" may hold preferences too
FORMAT_KEYS = {  # what auto-detection looks for, also shown in its error message
    "alpaca": "instruction, input, output",
    "sharegpt": "conversations[].from/value",
    "messages": "messages[].role/content",
    "prompt_response": "prompt, response",
    "oasst1": "message_id, parent_id, role, lang, rank, text (flat) or prompt.replies (trees)",
    "parallel": "text.<language>.prompt/response (or chosen/rejected), e.g. text.en.prompt",
    "ultrafeedback": "prompt, chosen[]/rejected[] role/content (UltraFeedback binarized)",
    "preference": "prompt, chosen, rejected",
}


Outcome = Pair | Preference | Skip | RowProblem  # what one row (or flat-oasst1 root) gives


# ---------------------------------------------------------------- single-row formats


def alpaca(row: Row, _lang: str) -> Pair:
    """instruction (+ "\\n\\n" + input when non-empty) -> output."""
    prompt = text(row, "instruction", "instruction")
    extra = row.get("input")
    if extra is not None and not isinstance(extra, str):
        raise RowProblem("input", f"expected a string or null, got {describe(extra)}")
    if extra and extra.strip():
        prompt = f"{prompt.strip()}\n\n{extra.strip()}"
    return prompt, text(row, "output", "output")


def prompt_response(row: Row, _lang: str) -> Pair:
    return text(row, "prompt", "prompt"), text(row, "response", "response")


def parallel(row: Row, lang: str) -> Pair | Preference | Skip:
    """The source-language side of a parallel row ``{"text": {"en": {"prompt", "response"}}}``,
    or of a parallel preference row (``chosen`` and ``rejected`` in place of ``response``).

    Languages sit under ``text`` rather than at the top level because a language code can
    collide with a row key (Indonesian is ``id``).
    """
    side = obj(obj(row, "text", "text"), lang, f"text.{lang}")
    if "chosen" in side:
        return parallel_preference(side, f"text.{lang}.")
    return (text(side, "prompt", f"text.{lang}.prompt"),
            text(side, "response", f"text.{lang}.response"))



# ---------------------------------------------------------------- oasst1


@dataclass(frozen=True)
class Message:
    """The oasst1 message fields the selection needs (both exports share them)."""

    message_id: str
    parent_id: str | None
    role: str
    lang: str
    text: str
    rank: int | None
    kept: bool  # not deleted and not rejected by review


def _rank(row: Row, path: str) -> int | None:
    """rank: int or null (missing = null); integral floats and NaN come from pandas exports."""
    value = row.get("rank")
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if value is None or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    raise RowProblem(f"{path}rank", f"expected an integer or null, got {describe(value)}")


def _flag(row: Row, key: str, path: str) -> bool | None:
    value = row.get(key)
    if value is not None and not isinstance(value, bool):
        raise RowProblem(f"{path}{key}", f"expected true, false or null, got {describe(value)}")
    return value


def message(row: Row, path: str = "", *, flat: bool = True) -> Message:
    """Validate one oasst1 message; ``path`` prefixes field names (``prompt.replies[2].``)."""
    parent = field(row, "parent_id", "parent_id") if flat else None
    if parent is not None and not isinstance(parent, str):
        raise RowProblem("parent_id", f"expected a string or null, got {describe(parent)}")
    return Message(
        message_id=text(row, "message_id", f"{path}message_id"),
        parent_id=parent,
        role=choice(row, "role", f"{path}role", ("prompter", "assistant")),
        lang=text(row, "lang", f"{path}lang"),
        text=text(row, "text", f"{path}text"),
        rank=_rank(row, path),
        kept=not _flag(row, "deleted", path) and _flag(row, "review_result", path) is not False,
    )


def _best_reply(replies: Iterable[Message]) -> Message | None:
    """The kept assistant reply with the lowest rank (0 = best); the first one wins a tie."""
    ranked = [r for r in replies if r.kept and r.rank is not None]
    return min(ranked, key=lambda r: r.rank or 0) if ranked else None  # rank is set here


def _select(root: Message, replies: Iterable[Message], lang: str) -> Pair | Skip:
    if root.lang != lang:
        return Skip.OTHER_LANGUAGE
    if not root.kept:
        return Skip.PROMPT_REMOVED
    best = _best_reply(replies)
    return (root.text, best.text) if best else Skip.NO_RANKED_REPLY


def _wrong_role(path: str, want: str, what: str, got: str) -> RowProblem:
    return RowProblem(f"{path}role", f"wrong role order: expected {want!r} for {what}, "
                      f"got {got!r}")


def oasst1_tree(row: Row, lang: str) -> Pair | Skip:
    """One tree of the trees export: the root prompt and its best-ranked direct reply."""
    root = message(obj(row, "prompt", "prompt"), "prompt.", flat=False)
    if root.role != "prompter":
        raise _wrong_role("prompt.", "prompter", "the root message", root.role)
    raw = row["prompt"].get("replies")
    raw = [] if raw is None else raw
    if not isinstance(raw, list):
        raise RowProblem("prompt.replies", f"expected a list, got {describe(raw)}")
    replies = []
    for i, reply in enumerate(raw):
        path = f"prompt.replies[{i}]."
        if not isinstance(reply, dict):
            raise RowProblem(path[:-1], f"expected an object, got {describe(reply)}")
        replies.append(message(reply, path, flat=False))
        if replies[-1].role != "assistant":
            raise _wrong_role(path, "assistant", "a reply to the root prompt", replies[-1].role)
    return _select(root, replies, lang)


def oasst1_flat(rows: Iterable[tuple[W, Row]], lang: str) -> Iterator[tuple[W, Outcome]]:
    """The flat messages export: root prompts (parent_id null) with their best direct reply.

    Every row is validated first (problems are yielded at their row); then one outcome per
    root, at the root's row, in file order.
    """
    messages: list[tuple[W, Message]] = []
    for where, row in rows:
        try:
            messages.append((where, message(row)))
        except RowProblem as problem:
            yield where, problem
    roots = {m.message_id for _, m in messages if m.parent_id is None}
    replies: dict[str, list[Message]] = {}
    for where, m in messages:
        if m.parent_id is None and m.role != "prompter":
            yield where, _wrong_role("", "prompter", "a root message (parent_id null)", m.role)
        elif m.parent_id in roots and m.role != "assistant":
            yield where, _wrong_role("", "assistant", "a reply to a root prompt", m.role)
        elif m.parent_id in roots:
            replies.setdefault(m.parent_id, []).append(m)
    for where, m in messages:
        if m.parent_id is None and m.role == "prompter":
            yield where, _select(m, replies.get(m.message_id, []), lang)


def oasst1_empty_reason(skips: Counter[Skip], lang: str) -> str:
    """Why an oasst1 file gave no pair at all, in words a user can act on."""
    removed = skips[Skip.PROMPT_REMOVED]
    in_lang = removed + skips[Skip.NO_RANKED_REPLY]
    if not in_lang:
        return (f"oasst1: no root prompt has lang {lang!r} ({skips[Skip.OTHER_LANGUAGE]} in "
                "other languages); only root prompts in source_language are kept")
    note = f"; {removed} of those prompts are themselves deleted or rejected" if removed else ""
    return (f"oasst1: {in_lang} root prompt(s) with lang {lang!r}, but none has a ranked "
            f"assistant reply that is not deleted or rejected by review{note}")


# ---------------------------------------------------------------- detection and dispatch

Extractor = Callable[[Row, str], Pair | Preference | Skip]
ROW_FORMATS: dict[str, Extractor] = {
    "alpaca": alpaca,
    "sharegpt": SHAREGPT.pair,
    "messages": MESSAGES.pair,
    "prompt_response": prompt_response,
    "oasst1-trees": oasst1_tree,
    "parallel": parallel,
    "ultrafeedback": ultrafeedback,
    "preference": plain_preference,
}


def detect(row: Row, lang: str) -> str | None:
    """The format a row's keys point to, or None. A distinctive key is enough: a row that
    then misses another field gets that field's error, which says more than "unknown"."""
    prompt = row.get("prompt")
    texts = row.get("text")
    chosen = row.get("chosen")
    checks = (
        ("ultrafeedback", "rejected" in row and isinstance(chosen, list)),
        ("preference", "rejected" in row and "chosen" in row),
        ("oasst1", "message_id" in row or (isinstance(prompt, dict) and "replies" in prompt)),
        ("sharegpt", "conversations" in row),
        ("messages", "messages" in row),
        ("alpaca", "instruction" in row),
        ("prompt_response", "prompt" in row),
        ("parallel", isinstance(texts, dict) and isinstance(texts.get(lang), dict)),
    )
    return next((name for name, hit in checks if hit), None)


def variant(fmt: str, first: Row) -> str:
    """oasst1 comes as a flat message table or as one tree per row; the first row says which."""
    if fmt != "oasst1":
        return fmt
    return "oasst1-flat" if "message_id" in first else "oasst1-trees"


def required_columns(fmt_variant: str, lang: str) -> tuple[str, ...]:
    """Top-level fields every row of a format has: a parquet file is checked for them upfront."""
    return {
        "alpaca": ("instruction", "output"),
        "sharegpt": ("conversations",),
        "messages": ("messages",),
        "prompt_response": ("prompt", "response"),
        "oasst1-flat": ("message_id", "parent_id", "role", "lang", "text"),
        "oasst1-trees": ("prompt",),
        "parallel": ("text",),
        "ultrafeedback": ("prompt", "chosen", "rejected"),
        "preference": ("prompt", "chosen", "rejected"),
    }[fmt_variant]


def extract(
    fmt_variant: str, rows: Iterable[tuple[W, Row]], lang: str
) -> Iterator[tuple[W, Outcome]]:
    """One outcome per row (or per root prompt, for flat oasst1): a pair, a skip or a problem."""
    if fmt_variant == "oasst1-flat":
        yield from oasst1_flat(rows, lang)
        return
    extractor = ROW_FORMATS[fmt_variant]
    for where, row in rows:
        try:
            yield where, extractor(row, lang)
        except RowProblem as problem:
            yield where, problem
