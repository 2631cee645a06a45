import pytest

from clo_ray.errors import LanguageError
from clo_ray.languages import LANGUAGES, PAPER_LANGUAGES, get_language, langid_candidates


def test_paper_languages_and_english_are_registered_with_every_code():
    for code in (*PAPER_LANGUAGES, "en"):
        lang = get_language(code)
        assert lang.code == code
        assert lang.m2m100 and lang.flores and lang.langid
        assert lang.resource in {"high", "medium", "low"}


def test_resource_levels_follow_the_paper():
    levels = {code: LANGUAGES[code].resource for code in PAPER_LANGUAGES}
    assert levels == {"zh": "high", "de": "high", "ko": "medium", "id": "medium",
                      "sw": "low", "yo": "low"}


def test_unknown_code_lists_known_ones():
    with pytest.raises(LanguageError, match="unknown language code 'xx'.*de, en"):
        get_language("xx")


def test_candidates_add_confusables_and_always_english():
    labels = langid_candidates(["id"])
    assert labels[0] == "id"
    assert {"ms", "en"} <= set(labels)


def test_every_langid_label_is_known_to_the_detector():
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    known = set(LanguageIdentifier.from_model_file(MODEL_FILE).labels)
    assert set(langid_candidates()) <= known


def test_candidates_never_narrow_to_the_target():
    assert set(langid_candidates(["sw"])) == set(langid_candidates())
    assert {"id", "yo", "zh"} <= set(langid_candidates(["sw"]))


def test_bengali_is_registered_and_detected():
    """CRPO's fifth language: every code, and language id tells it from Assamese and Hindi."""
    from clo_ray.eval.fidelity import language_fidelity

    bn = get_language("bn")
    assert (bn.script, bn.m2m100, bn.flores, bn.langid) == ("Beng", "bn", "ben_Beng", "bn")
    assert {"bn", "as"} <= set(langid_candidates(["bn"]))
    answers = ["আমি প্রতিদিন সকালে এক কাপ চা খাই এবং খবরের কাগজ পড়ি।",
               "বাংলাদেশের রাজধানী ঢাকা একটি ঘনবসতিপূর্ণ শহর।",
               "मैं हर सुबह चाय पीता हूँ।"]  # the last one is Hindi
    fidelity = language_fidelity(answers, "bn", threshold=0.5)
    assert fidelity.rate == pytest.approx(2 / 3)
