"""Offline language identification (py3langid ships its model inside the wheel).

Garbage text always gets *some* label, so callers compare the confidence with a threshold;
the candidate set includes confusable languages (see ``languages.langid_candidates``).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from py3langid.langid import MODEL_FILE, LanguageIdentifier

from clo_ray.languages import LANGUAGES, langid_candidates

_LABEL_TO_CODE = {lang.langid: code for code, lang in LANGUAGES.items()}


@dataclass(frozen=True)
class Detection:
    code: str  # registry code when the label is a registered language, else the raw label
    confidence: float  # normalised probability among the candidate labels


@lru_cache(maxsize=16)
def _identifier(candidates: tuple[str, ...]) -> LanguageIdentifier:
    ident = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
    ident.set_languages(list(candidates))
    return ident


def detect(text: str, candidates: tuple[str, ...] | None = None) -> Detection:
    """Most likely language of ``text`` among ``candidates`` (default: every registered
    language plus its confusables)."""
    labels = tuple(candidates or langid_candidates())
    label, confidence = _identifier(labels).classify(text)
    return Detection(_LABEL_TO_CODE.get(label, label), float(confidence))


def is_language(text: str, code: str, threshold: float = 0.5,
                candidates: tuple[str, ...] | None = None) -> bool:
    """True when ``text`` is detected as ``code`` with at least ``threshold`` confidence."""
    found = detect(text, candidates)
    return found.code == code and found.confidence >= threshold
