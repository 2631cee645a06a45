"""Row formats of English preference corpora: one row -> (prompt, chosen, rejected).

CRPO (and SFT+DPO as CRPO defines it) trains on preferences, not on single answers. Three
layouts are read:

- ``ultrafeedback``: UltraFeedback binarized (``HuggingFaceH4/ultrafeedback_binarized``):
  ``prompt`` plus ``chosen`` and ``rejected`` as chat turns (a user turn, then the
  assistant's answer); the user turn must be the prompt, so a shifted or mixed-up row is
  caught rather than trained on.
- ``preference``: plain ``{"prompt", "chosen", "rejected"}`` strings.
- a parallel preference row's side (``text.<lang>.prompt/chosen/rejected``), read through
  the ``parallel`` format.

A row whose two answers are the same text is skipped and counted (it prefers nothing).
"""

from __future__ import annotations

from clo_ray.data.row_fields import (
    ChatSchema,
    Preference,
    Row,
    RowProblem,
    Skip,
    text,
)

CHOSEN = ChatSchema("chosen", "role", "content", "system", "user", "assistant")
REJECTED = ChatSchema("rejected", "role", "content", "system", "user", "assistant")


def _preference(prompt: str, chosen: str, rejected: str) -> Preference | Skip:
    if chosen.strip() == rejected.strip():
        return Skip.SAME_ANSWERS
    return prompt, chosen, rejected


def ultrafeedback(row: Row, _lang: str) -> Preference | Skip:
    """``prompt`` and the assistant answers of the ``chosen`` and ``rejected`` conversations."""
    prompt = text(row, "prompt", "prompt")
    answers = []
    for schema in (CHOSEN, REJECTED):
        user, answer = schema.pair(row, _lang)
        if user.strip() != prompt.strip():
            raise RowProblem(f"{schema.turns}[0].content",
                             f"the user turn is not the row's prompt (prompt starts "
                             f"{prompt.strip()[:40]!r}, the turn {user.strip()[:40]!r})")
        answers.append(answer)
    return _preference(prompt, *answers)


def plain_preference(row: Row, _lang: str) -> Preference | Skip:
    return _preference(text(row, "prompt", "prompt"), text(row, "chosen", "chosen"),
                       text(row, "rejected", "rejected"))


def parallel_preference(side: Row, path: str) -> Preference | Skip:
    """One language's side of a parallel preference row; ``path`` is ``text.<lang>.``."""
    return _preference(*(text(side, key, f"{path}{key}")
                         for key in ("prompt", "chosen", "rejected")))
