"""The bundled prompt set (clo_ray/assets/eval_prompts.jsonl): at least 100 instructions in
English and the six paper languages, disjoint from the training sample, every text detected
as its own language (the check the parallel sample passes too)."""

from __future__ import annotations

import json
import re

import pytest

from clo_ray.assets import ASSETS_DIR, parallel_sample_path
from clo_ray.data.langid import detect
from clo_ray.translate.segment import prose

LANGS = ("en", "zh", "de", "ko", "id", "sw", "yo")
ROWS = [json.loads(line) for line in
        (ASSETS_DIR / "eval_prompts.jsonl").read_text("utf-8").splitlines()]


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().lower()


def test_size_ids_and_languages() -> None:
    assert len(ROWS) >= 100
    assert len({r["id"] for r in ROWS}) == len(ROWS)
    for row in ROWS:
        assert set(row["text"]) == set(LANGS), row["id"]
        assert all(row["text"][lang]["prompt"].strip() for lang in LANGS), row["id"]
    assert len({r["category"] for r in ROWS}) >= 8


def test_disjoint_from_the_training_sample() -> None:
    training = {_norm(json.loads(line)["text"]["en"]["prompt"])
                for line in parallel_sample_path().read_text("utf-8").splitlines()}
    shared = [r["id"] for r in ROWS if _norm(r["text"]["en"]["prompt"]) in training]
    assert not shared, shared


@pytest.mark.parametrize("lang", LANGS)
def test_every_text_is_detected_as_its_language(lang: str) -> None:
    wrong = []
    for row in ROWS:
        found = detect(prose(row["text"][lang]["prompt"]))
        if found.code != lang or found.confidence < 0.5:
            wrong.append(f"{row['id']}: {found.code} {found.confidence:.2f}")
    assert not wrong, wrong
