"""Language fidelity: the share of answers written in the language they should be in.

The CLO paper's central failure is an English-centric model that understands a target-language
prompt and still answers in English; the same measure on English prompts is English retention.
Each answer is identified offline (:func:`clo_ray.data.langid.detect`) among the candidates
of :func:`clo_ray.languages.langid_candidates` (every registered language, English included,
plus confusables such as Malay), so an English or Malay answer to an Indonesian prompt is
caught as wrong instead of being forced onto the only candidate. An answer counts only with
``confidence >= threshold``: garbage text always gets *some* label.

Empty (or whitespace-only) answers count as failures: a model that answers nothing did not
answer in the target language, and dropping them would reward a model that stops at once.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from clo_ray.data.langid import detect
from clo_ray.languages import get_language, langid_candidates

EMPTY = "empty"  # ``detected`` key of empty answers
UNDETERMINED = "und"  # ``detected`` key of answers below the confidence threshold (ISO 639-2)


@dataclass(frozen=True)
class Fidelity:
    """``rate`` = ``detected[language] / n``; ``detected`` counts every answer once: by its
    confident label, under :data:`UNDETERMINED` when below the threshold, :data:`EMPTY`."""

    rate: float
    detected: dict[str, int] = field(default_factory=dict)
    n: int = 0


def language_fidelity(answers: Sequence[str], language: str, *, threshold: float) -> Fidelity:
    """Share of ``answers`` detected as ``language`` with at least ``threshold`` confidence.

    ``rate`` is 0.0 for no answers (nothing was answered in the language; never a division
    by zero that would turn a whole trial's metric into NaN).
    """
    get_language(language)  # an unknown code is an error here, not a silent 0.0
    candidates = tuple(langid_candidates([language]))
    detected: Counter[str] = Counter()
    for answer in answers:
        if not answer.strip():
            detected[EMPTY] += 1
            continue
        found = detect(answer, candidates)
        detected[found.code if found.confidence >= threshold else UNDETERMINED] += 1
    n = len(answers)
    return Fidelity(rate=detected[language] / n if n else 0.0, detected=dict(detected), n=n)
