"""Row formats of English SFT corpora: turn one parsed row into a (prompt, response) pair.

Kept apart from ``corpus.py`` (files, ids, dedup) so each format is a small function that can
be read on its own. A format never sees files: it raises ``RowProblem`` naming the field, and
the loader adds the file and line. oasst1 is the one format that needs more than one row at a
time (a flat export spreads a conversation over rows), so it has its own selection function.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any, TypeVar

Pair = tuple[str, str]
Row = Mapping[str, Any]
W = TypeVar("W")  # a row locator; only the loader knows what it is

FORMATS = ("alpaca", "sharegpt", "messages", "prompt_response", "oasst1", "parallel")
FORMAT_KEYS = {  # what auto-detection looks for, also shown in its error message
    "alpaca": "instruction, input, output",
    "sharegpt": "conversations[].from/value",
    "messages": "messages[].role/content",
    "prompt_response": "prompt, response",
    "oasst1": "message_id, parent_id, role, lang, rank, text (flat) or prompt.replies (trees)",
    "parallel": "text.<language>.prompt/response, e.g. text.en.prompt",
}


class RowProblem(Exception):
    """One malformed row: which field (a path like ``conversations[1].from``) and what is wrong."""

    def __init__(self, field: str | None, message: str):
        super().__init__(f"field {field!r}: {message}" if field else message)
        self.field = field


class Skip(Enum):
    """Why a well-formed oasst1 root prompt gave no pair (counted in the corpus stats)."""

    OTHER_LANGUAGE = "oasst1 root prompt not in the source language"
    PROMPT_REMOVED = "oasst1 root prompt deleted or rejected by review"
    NO_RANKED_REPLY = "oasst1 root prompt without a ranked, kept assistant reply"


Outcome = Pair | Skip | RowProblem  # what one row (or flat-oasst1 root) turns into


# ---------------------------------------------------------------- field checks


def describe(value: Any, limit: int = 60) -> str:
    """Type and (truncated) value for an error message, e.g. ``int 5`` or ``null``."""
    if value is None:
        return "null"
    if isinstance(value, str):
        if not value:
            return "empty string"
        kind = "whitespace-only string" if not value.strip() else "string"
    else:
        kind = {bool: "bool", int: "int", float: "float", list: "list", dict: "object"}.get(
            type(value), type(value).__name__
        )
    try:
        text = json.dumps(value, ensure_ascii=False, default=str)
    except ValueError:  # circular; cannot happen for parsed JSON
        text = repr(value)
    return f"{kind} {text if len(text) <= limit else text[: limit - 3] + '...'}"


def field(row: Row, key: str, path: str) -> Any:
    """``row[key]``; a missing key is a RowProblem that lists the keys the row does have."""
    if key not in row:
        keys = ", ".join(map(str, row)) or "none"
        raise RowProblem(path, f"missing (the object has keys: {keys})")
    return row[key]


def text(row: Row, key: str, path: str) -> str:
    """A required non-empty string field."""
    value = field(row, key, path)
    if not isinstance(value, str) or not value.strip():
        raise RowProblem(path, f"expected a non-empty string, got {describe(value)}")
    return value


def obj(row: Row, key: str, path: str) -> Row:
    value = field(row, key, path)
    if not isinstance(value, dict):
        raise RowProblem(path, f"expected an object, got {describe(value)}")
    return value


def seq(row: Row, key: str, path: str) -> list[Any]:
    value = field(row, key, path)
    if not isinstance(value, list):
        raise RowProblem(path, f"expected a list, got {describe(value)}")
    return value


def choice(row: Row, key: str, path: str, allowed: tuple[str, ...]) -> str:
    value = field(row, key, path)
    if value not in allowed:
        options = ", ".join(repr(a) for a in allowed)
        raise RowProblem(path, f"expected one of {options}, got {describe(value)}")
    return value


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


def parallel(row: Row, lang: str) -> Pair:
    """The source-language side of a parallel row ``{"text": {"en": {"prompt", "response"}}}``.

    Languages sit under ``text`` rather than at the top level because a language code can
    collide with a row key (Indonesian is ``id``).
    """
    side = obj(obj(row, "text", "text"), lang, f"text.{lang}")
    return (text(side, "prompt", f"text.{lang}.prompt"),
            text(side, "response", f"text.{lang}.response"))


@dataclass(frozen=True)
class ChatSchema:
    """Key and role names of one chat layout (ShareGPT and OpenAI-style messages differ)."""

    turns: str
    role: str
    content: str
    system: str
    user: str
    assistant: str

    def pair(self, row: Row, _lang: str) -> Pair:
        """The first user -> assistant exchange after optional leading system turns.

        Later turns are not read: single-turn pairs are what CLO trains on, and a stray field
        in a turn we drop should not reject the row. The system prompt is dropped.
        """
        turns = seq(row, self.turns, self.turns)
        if not turns:
            raise RowProblem(self.turns, "expected a non-empty list of turns, got empty list")
        roles = (self.system, self.user, self.assistant)
        start = 0
        while start < len(turns) and self._role(turns, start, roles) == self.system:
            start += 1
        for offset, want in enumerate((self.user, self.assistant)):
            index = start + offset
            if index >= len(turns):
                where = "a system turn" if offset == 0 else f"the {self.user!r} turn"
                raise RowProblem(self.turns, f"wrong role order: expected a {want!r} turn "
                                 f"after {where}, got end of conversation")
            role = self._role(turns, index, roles)
            if role != want:
                place = "the first non-system turn" if offset == 0 else f"after {self.user!r}"
                raise RowProblem(f"{self.turns}[{index}].{self.role}",
                                 f"wrong role order: expected {want!r} as {place}, got {role!r}")
        prompt, response = (
            text(turns[i], self.content, f"{self.turns}[{i}].{self.content}")
            for i in (start, start + 1)
        )
        return prompt, response

    def _role(self, turns: list[Any], index: int, roles: tuple[str, ...]) -> str:
        turn = turns[index]
        path = f"{self.turns}[{index}]"
        if not isinstance(turn, dict):
            raise RowProblem(path, f"expected an object with {self.role!r} and "
                             f"{self.content!r}, got {describe(turn)}")
        return choice(turn, self.role, f"{path}.{self.role}", roles)


SHAREGPT = ChatSchema("conversations", "from", "value", "system", "human", "gpt")
MESSAGES = ChatSchema("messages", "role", "content", "system", "user", "assistant")

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

Extractor = Callable[[Row, str], Pair | Skip]
ROW_FORMATS: dict[str, Extractor] = {
    "alpaca": alpaca,
    "sharegpt": SHAREGPT.pair,
    "messages": MESSAGES.pair,
    "prompt_response": prompt_response,
    "oasst1-trees": oasst1_tree,
    "parallel": parallel,
}


def detect(row: Row, lang: str) -> str | None:
    """The format a row's keys point to, or None. A distinctive key is enough: a row that
    then misses another field gets that field's error, which says more than "unknown"."""
    prompt = row.get("prompt")
    texts = row.get("text")
    checks = (
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
