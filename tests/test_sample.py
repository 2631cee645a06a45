"""The bundled parallel sample is data the whole project leans on: check it like code."""

import json
import re
from collections import Counter

import pytest

from clo_ray.assets import parallel_sample_path
from clo_ray.data.langid import detect

LANGS = ["en", "zh", "de", "ko", "id", "sw", "yo"]
FENCED = re.compile(r"```.*?```", re.S)
INLINE = re.compile(r"`[^`\n]+`")
URL = re.compile(r"https?://\S+?(?=[\s)\]）。,，]|$)")
LIST_ITEM = re.compile(r"^\s*(?:[-*]|\d+[.)])\s", re.M)


def rows() -> list[dict]:
    with open(parallel_sample_path(), encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


SAMPLE = rows()


def code_spans(text: str) -> list[str]:
    fenced = FENCED.findall(text)
    return sorted(fenced + INLINE.findall(FENCED.sub(" ", text)))


def prose(text: str) -> str:
    return INLINE.sub(" ", FENCED.sub(" ", text))


def test_size_ids_and_languages():
    assert len(SAMPLE) >= 240
    ids = [row["id"] for row in SAMPLE]
    assert len(set(ids)) == len(ids)
    prompts = Counter(row["text"]["en"]["prompt"].strip().lower() for row in SAMPLE)
    assert prompts.most_common(1)[0][1] == 1, prompts.most_common(3)
    for row in SAMPLE:
        assert sorted(row["text"]) == sorted(LANGS), row["id"]
        for lang in LANGS:
            side = row["text"][lang]
            assert side["prompt"].strip() and side["response"].strip(), (row["id"], lang)


def test_some_rows_have_lists_and_code():
    with_list = sum(bool(LIST_ITEM.search(r["text"]["en"]["response"])) for r in SAMPLE)
    with_code = sum(bool(code_spans(r["text"]["en"]["response"])) for r in SAMPLE)
    assert with_list >= 20 and with_code >= 10, (with_list, with_code)


@pytest.mark.parametrize("lang", LANGS)
def test_every_text_is_detected_as_its_language(lang):
    wrong = []
    for row in SAMPLE:
        for field in ("prompt", "response"):
            found = detect(prose(row["text"][lang][field]))
            if found.code != lang or found.confidence < 0.5:
                wrong.append(f"{row['id']}.{field}: {found.code} {found.confidence:.2f}")
    assert not wrong, wrong


@pytest.mark.parametrize("lang", LANGS[1:])
def test_code_urls_and_list_structure_survive_translation(lang):
    for row in SAMPLE:
        for field in ("prompt", "response"):
            en, tr = row["text"]["en"][field], row["text"][lang][field]
            where = f"{row['id']} {lang}.{field}"
            assert code_spans(tr) == code_spans(en), where
            assert sorted(URL.findall(tr)) == sorted(URL.findall(en)), where
            assert len(LIST_ITEM.findall(tr)) == len(LIST_ITEM.findall(en)), where
