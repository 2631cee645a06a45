"""What every corpus row format reads rows with: field checks, row problems, chat turns.

A format never sees files: it raises :class:`RowProblem` naming the field (a path like
``conversations[1].from``), and the loader adds the file and line. Shared by the SFT formats
(:mod:`clo_ray.data.corpus_formats`) and the preference formats
(:mod:`clo_ray.data.preference_formats`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any

Pair = tuple[str, str]  # (prompt, response)
Preference = tuple[str, str, str]  # (prompt, chosen, rejected)
Row = Mapping[str, Any]

class RowProblem(Exception):
    """One malformed row: which field (a path like ``conversations[1].from``) and what is wrong."""

    def __init__(self, field: str | None, message: str):
        super().__init__(f"field {field!r}: {message}" if field else message)
        self.field = field


class Skip(Enum):
    """Why a well-formed row gave no pair (counted in the corpus stats)."""

    OTHER_LANGUAGE = "oasst1 root prompt not in the source language"
    PROMPT_REMOVED = "oasst1 root prompt deleted or rejected by review"
    NO_RANKED_REPLY = "oasst1 root prompt without a ranked, kept assistant reply"
    SAME_ANSWERS = "preference row whose chosen and rejected answers are the same text"


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


# ---------------------------------------------------------------- chat turns


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
