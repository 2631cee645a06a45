"""Segmentation and placeholder protection: the translate stage relies on a byte-exact round
trip and on code / URLs coming back untouched, so both are checked on every sample text."""

import json
import random
import re

import pytest

from clo_ray.assets import parallel_sample_path
from clo_ray.translate.segment import (
    Segment,
    dropped_spans,
    missing_spans,
    prose,
    protected_spans,
    reassemble,
    segment,
)

with open(parallel_sample_path(), encoding="utf-8") as fh:
    SAMPLE = [json.loads(line) for line in fh]
LANGS = ["en", "zh", "de", "ko", "id", "sw", "yo"]
TEXTS = [(f"{row['id']}.{lang}.{field}", row["text"][lang][field])
         for row in SAMPLE for lang in LANGS for field in ("prompt", "response")]

EDGE_CASES = {
    "empty": "",
    "whitespace only": "  \n\n",
    "nested lists": "Steps:\n- one\n  - one a\n    1. deep `x()` item\n  - one b\n- two\n",
    "fence with language tag": "Run this:\n```python\nprint('hi')  # not prose\n```\nDone.",
    "fence with blank lines": "Code:\n\n```\na = 1\n\n\nb = 2\n```\n\nAfter the code.\n",
    "indented and tilde fences": "1. Save:\n   ~~~bash\n   echo hi\n   ~~~\n2. Run it.",
    "unclosed fence": "Start here.\n```js\nlet x = 1;\n",
    "inline triple backticks": "Type ```ls -la``` in the shell.",
    "windows newlines": "First line here.\r\n\r\n- item one\r\n- item two\r\n",
    "trailing newline": "Just one sentence.\n",
    "leading spaces": "   Indented start of the text.\n  Continued line.",
    "url then period": "Read more at https://example.com/docs/intro.html.",
    "url in parentheses": "See the guide (https://en.wikipedia.org/wiki/Foo_(bar)) first.",
    "markdown link": "Use [the docs](https://docs.python.org/3/library/re.html), please.",
    "email and units": "Write to help@example.org. Bake at 180 °C; add 2.5 kg, 10% and 3 km/h.",
    "headings and quotes": "# Title\n\nSome text.\n## Sub heading\n> quoted *line*\n> more",
    "table": "| Name | Size |\n|------|-----:|\n| big box | 5 kg |\n",
    "placeholder lookalike": "Python prints [[1]] for a nested list, and [[ 2 ]] too.",
    "task list and rule": "- [ ] buy milk\n- [x] call mom\n\n---\n* * *\n",
    "cjk": "先用冷水淘洗大米。然后加水！再煮 15 分钟？好的。",
}


def untranslated(segments: list[Segment]) -> list[str]:
    return [s.text for s in segments if s.translate]


def check_round_trip(text: str, max_chars: int = 1000) -> list[Segment]:
    segments = segment(text, max_chars)
    assert reassemble(segments, untranslated(segments)) == text
    for s in segments:
        if s.translate:  # the translator never sees surrounding whitespace or bare code
            assert s.text == s.text.strip() and any(c.isalpha() for c in s.text)
            assert "\n" not in s.text  # line structure is kept verbatim
            assert re.findall(r"\[\[(\d+)\]\]", s.text) == [str(i + 1) for i in
                                                             range(len(s.spans))]
    return segments


def test_round_trip_on_every_sample_text():
    for where, text in TEXTS:
        try:
            check_round_trip(text)
            check_round_trip(text, max_chars=40)  # forces sentence splits
        except AssertionError:
            pytest.fail(where)


@pytest.mark.parametrize("name", sorted(EDGE_CASES))
def test_round_trip_on_edge_cases(name):
    for max_chars in (1000, 10):
        check_round_trip(EDGE_CASES[name], max_chars)


def test_structure_is_verbatim_and_code_is_not_translated():
    segments = segment(EDGE_CASES["nested lists"] + "\n" + EDGE_CASES["fence with blank lines"])
    assert untranslated(segments) == ["Steps:", "one", "one a", "deep [[1]] item", "one b",
                                      "two", "Code:", "After the code."]
    verbatim = "".join(s.text for s in segments if not s.translate)
    assert "\n  - " in verbatim and "    1. " in verbatim
    assert "```\na = 1\n\n\nb = 2\n```" in verbatim
    table = segment(EDGE_CASES["table"])
    assert untranslated(table) == ["Name", "Size", "big box"]  # "5 kg" cell: nothing to say
    assert untranslated(segment(EDGE_CASES["headings and quotes"]))[:3] == [
        "Title", "Some text.", "Sub heading"]
    assert untranslated(segment(EDGE_CASES["unclosed fence"])) == ["Start here."]
    # a paragraph right after a list item stays its own line, whatever the translator does
    item_then_text = segment("1. Stretch for 5 minutes.\nThis raises your heart rate.")
    assert untranslated(item_then_text) == ["Stretch for 5 minutes.",
                                            "This raises your heart rate."]
    assert reassemble(item_then_text, ["Dehnen.", "Das hebt den Puls."]) == (
        "1. Dehnen.\nDas hebt den Puls.")
    assert untranslated(segment(EDGE_CASES["inline triple backticks"])) == [
        "Type [[1]] in the shell."]


def test_spans_become_placeholders():
    cases = {
        "url then period": ("Read more at [[1]].", ("https://example.com/docs/intro.html",)),
        "url in parentheses": ("See the guide ([[1]]) first.",
                               ("https://en.wikipedia.org/wiki/Foo_(bar)",)),
        "markdown link": ("Use [the docs]([[1]]), please.",
                          ("https://docs.python.org/3/library/re.html",)),
        "email and units": ("Write to [[1]]. Bake at [[2]]; add [[3]], [[4]] and [[5]].",
                            ("help@example.org", "180 °C", "2.5 kg", "10%", "3 km/h")),
        "placeholder lookalike": ("Python prints [[1]] for a nested list, and [[2]] too.",
                                  ("[[1]]", "[[ 2 ]]")),
    }
    for name, (text, spans) in cases.items():
        (seg,) = [s for s in segment(EDGE_CASES[name]) if s.translate]
        assert (seg.text, seg.spans) == (text, spans), name
    (seg,) = segment("Run 5 km or 3 miles.", units=False)
    assert seg.spans == ()


def fake_translate(seg: Segment) -> str:
    """A translator that changes all the prose and keeps the placeholders."""
    return re.sub(r"\[\[\d+\]\]|[^\[\]]+", lambda m: m.group().upper(), seg.text)


def test_code_and_urls_come_back_byte_identical():
    checked = 0
    for where, text in [*TEXTS, *EDGE_CASES.items()]:
        segments = segment(text, max_chars=60)
        translations = [fake_translate(s) for s in segments if s.translate]
        out = reassemble(segments, translations)
        assert missing_spans(segments, translations) == [], where
        assert protected_spans(out, units=False) == protected_spans(text, units=False), where
        checked += bool(protected_spans(text, units=False))
    assert checked >= 15  # the sample really has code and URLs in it


def test_tolerant_restore():
    text = "Call `f(x)` then open https://example.com now."
    segments = segment(text)
    assert untranslated(segments) == ["Call [[1]] then open [[2]] now."]
    for translated in ["调用 ［［1］］ 然后打开 【２】 。", "调用 [[ 1 ]] 然后打开 [ [2] ]。",
                       "调用⟦1⟧然后打开[[2]]。"]:
        out = reassemble(segments, [translated])
        assert "`f(x)`" in out and "https://example.com" in out, translated
        assert missing_spans(segments, [translated]) == []
    assert reassemble(segments, ["  Rufe [[1]] auf, öffne [[2]].\n"]) == (
        "Rufe `f(x)` auf, öffne https://example.com.")


def test_dropped_or_mangled_placeholder_is_reported():
    segments = segment("Use `pip install x` and see https://pypi.org.\n\nThen `import x`.")
    assert untranslated(segments) == ["Use [[1]] and see [[2]].", "Then [[1]]."]
    translations = ["Benutze [[1]] und sieh [2].", "Dann [[7]]."]
    assert missing_spans(segments, translations) == ["https://pypi.org", "`import x`"]
    out = reassemble(segments, translations)  # keeps going; the quality check rejects it
    assert out == "Benutze `pip install x` und sieh [2].\n\nDann [[7]]."
    with pytest.raises(ValueError, match="1 translations for 2"):
        reassemble(segments, translations[:1])


def test_long_paragraphs_split_at_sentence_ends():
    plain = [row["text"] for row in SAMPLE[:12] if "\n" not in row["text"]["en"]["response"]]
    english = " ".join(text["en"]["response"] for text in plain)
    chinese = "".join(text["zh"]["response"] for text in plain)
    for text, max_chars in [(english, 200), (chinese, 80), (english, 1000)]:
        segments = check_round_trip(text, max_chars)
        pieces = untranslated(segments)
        assert len(pieces) >= len(text) // max_chars
        assert all(len(p) <= max_chars for p in pieces), max(map(len, pieces))
        assert all(p[-1] in ".!?。！？\"'”’)" for p in pieces[:-1])
    unsplittable = "word " * 80 + "end. Short one."
    lengths = [len(p) for p in untranslated(check_round_trip(unsplittable, 100))]
    assert lengths == [len("word " * 80 + "end."), len("Short one.")]


def test_protected_and_dropped_spans_on_sample():
    code_row = next(r for r in SAMPLE if r["id"] == "p1-002")["text"]["en"]["response"]
    spans = protected_spans(code_row)
    assert spans[0].startswith("```python\ndef scale_recipe(") and spans[0].endswith("\n```")
    assert spans[1:] == ['`scale_recipe({"flour_g": 200}, 4, 6)`', "`{'flour_g': 300.0}`"]
    for row in SAMPLE:  # human translations keep every code span and URL
        for lang in LANGS[1:]:
            for field in ("prompt", "response"):
                en, tr = row["text"]["en"][field], row["text"][lang][field]
                assert dropped_spans(en, tr) == [], (row["id"], lang, field)
    assert dropped_spans("Use `a` and `a`.", "Nutze `a`.") == ["`a`"]
    assert "def scale_recipe" not in prose(code_row) and "multiplies" in prose(code_row)


def test_round_trip_on_random_markdown_soup():
    """Texts glued from the pieces that trip parsers up; the round trip must hold anyway."""
    pieces = ["`", "```", "~~~", "\n", "\r\n", " ", "  ", "- ", "1. ", "# ", "> ", "|", "[[",
              "]]", "【", "3", "2.5", " kg", "%", "°C", ".", "。", "! ", "word", "Wort", "词",
              "(", ")", "https://x.org/a_(b)", "www.y.com.", "a@b.co", "[[1]]", "［［２］］"]
    rng = random.Random(0)
    for _ in range(400):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 40)))
        for max_chars in (1000, 8):
            segments = segment(text, max_chars)
            assert reassemble(segments, untranslated(segments)) == text, repr(text)
