"""Pairwise LLM judge: win rate of a model's answers against an opponent's (the paper's metric).

The CLO paper reports AlpacaEval-style win rates against the SFT model of the same cell,
judged by an LLM, on target-language and English prompts. Here a judge is any callable
``list[str] -> list[str]`` (:func:`make_judge` serves one with vLLM or transformers), so the
arithmetic is testable with a fake and the serving is the generation code's.

Position bias: LLM judges favour one slot. Every question is therefore judged twice, with the
answers in both orders, and the two verdicts (mapped to the model's point of view) combine as:

- win + win -> win; loss + loss -> loss;
- any other parsed combination (win + loss, win + tie, loss + tie, tie + tie) -> tie, which
  counts half: a win needs the judge to agree with itself in both orders;
- either verdict unparseable -> the question is *unparseable*, left out of the rate (one
  order alone cannot cancel position bias) and counted separately.

``win_rate = (wins + 0.5 * ties) / judged`` with ``judged = wins + losses + ties``; None when
nothing could be judged (not 0 or 0.5: there is no measurement). 50% is parity.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from clo_ray.eval.generate import Backend, TransformersGenerator, VllmGenerator, load_generator

Verdict = Literal["A", "B", "tie"]
JudgeGenerate = Callable[[list[str]], Sequence[str | None]]

JUDGE_PROMPT = """You are an impartial judge. Compare two answers to the same question. \
Decide which answer is more helpful, correct and clear for the person who asked. An answer \
written in a different language from the question is worse. Ignore the order of the answers \
and their length.

[Question]
{question}

[Answer A]
{answer_a}

[Answer B]
{answer_b}

Reply with exactly one line in this format: "Verdict: A", "Verdict: B" or "Verdict: tie"."""
# Judges without a chat template read the instruction as plain text, then write the verdict.
JUDGE_PLAIN_TEMPLATE = "{prompt}\n\n"


def judge_prompt(question: str, answer_a: str, answer_b: str) -> str:
    """The judge's instruction for one ordered pair (``str.format`` does not re-read braces
    inside the answers, so code in an answer is safe)."""
    return JUDGE_PROMPT.format(question=question, answer_a=answer_a, answer_b=answer_b)


# ------------------------------------------------------------------------------ parsing

_TOKEN = r"[\[\(\"'“‘<*]*\s*"  # brackets, quotes or bold before a verdict token
_VERDICT = re.compile(  # "Verdict: A", "verdict is B", "Final verdict - tie"
    r"(?i:verdict)\s*(?:(?i:is)\s*)?[:=\-]?\s*" + _TOKEN
    + r"(A|B|a|b|(?i:tie|draw))\b"
    + r"(?!\s*(?i:or|and|/|vs\.?)\s*" + _TOKEN + r"(?:A|B|(?i:tie))\b)")
_BRACKETS = re.compile(r"\[\[\s*(A|B|C|tie|draw)\s*\]\]", re.IGNORECASE)  # MT-bench: C = tie
_BARE = re.compile(r"^[\[\(\"'“‘<*\s]*(a|b|tie|draw|equal)[\]\)\"'”’>*.!\s]*$", re.IGNORECASE)
_NAMED = r"(?:(?:answer|assistant|response|option|output|model)\s*)?"
_BETTER = re.compile(_NAMED + r"\(?\b([AB])\)?\s+(?:is|was|seems)\s+(?:clearly\s+|much\s+)?"
                     r"(?:better|best|superior|preferred|preferable|the\s+winner|stronger)",
                     re.IGNORECASE)
_WORSE = re.compile(_NAMED + r"\(?\b([AB])\)?\s+(?:is|was|seems)\s+(?:clearly\s+|much\s+)?"
                    r"(?:worse|worst|inferior|weaker)", re.IGNORECASE)
_PREFER = re.compile(r"\b(?:prefer|choose|pick|winner\s*:?)\s+" + _NAMED + r"\(?([AB])\b",
                     re.IGNORECASE)
_MENTION = re.compile(r"(?i:answer|assistant|response|option|output)\s*\(?([ABab])\b"
                      r"|(?<![\w'’])([AB])(?![\w'’])")
_TIE = re.compile(r"\b(?:tie|tied|draw|equally|equal|neither)\b", re.IGNORECASE)


def _normalise(text: str) -> str:
    """NFKC (fullwidth "Ａ" -> "A", "：" -> ":"), no zero-width or markdown emphasis, and
    "a tie" -> "tie" so the article is not read as answer A."""
    text = unicodedata.normalize("NFKC", text)
    text = re.sub(r"[\u200b-\u200f\u2060\ufeff]", "", text).replace("**", "").replace("__", "")
    return re.sub(r"\ba\s+(tie|draw)\b", r"\1", text, flags=re.IGNORECASE).strip()


def _token(value: str) -> Verdict:
    value = value.lower()
    return "A" if value == "a" else "B" if value == "b" else "tie"


def _one(found: set[Verdict]) -> Verdict | None:
    return next(iter(found)) if len(found) == 1 else None


def parse_verdict(text: str) -> Verdict | None:
    """The verdict in a judge's reply: "A", "B", "tie", or None when absent or ambiguous.

    In order, the first rule that finds something decides (several *different* verdicts
    under one rule -> None): an explicit "Verdict: X" or "[[X]]" ([[C]] = tie, MT-bench's
    convention); a reply that is only a verdict ("b", "(A)", "Tie."); a stated preference
    ("Answer B is better", "A is worse", "I prefer A"); a tie word ("equally good",
    "neither"); a single answer named ("Answer A"). Mentioning both answers without a
    preference is ambiguous.
    """
    text = _normalise(text or "")
    if not text:
        return None
    explicit = {_token(m) for m in _VERDICT.findall(text)}
    explicit |= {"tie" if m.lower() == "c" else _token(m) for m in _BRACKETS.findall(text)}
    if explicit:
        return _one(explicit)
    if bare := _BARE.match(text):
        return _token(bare.group(1)) if bare.group(1).lower() in ("a", "b") else "tie"
    preferred = {_token(m) for m in _BETTER.findall(text)}
    preferred |= {"B" if m.upper() == "A" else "A" for m in _WORSE.findall(text)}
    preferred |= {_token(m) for m in _PREFER.findall(text)}
    if preferred:
        return _one(preferred)
    if _TIE.search(text):
        return "tie"
    return _one({_token(a or b) for a, b in _MENTION.findall(text)})


# ------------------------------------------------------------------------------ judging


@dataclass(frozen=True)
class JudgeResult:
    """Counts per question (both orders combined; rule in the module docstring).

    ``outcomes[i]``: question i from the model's side, "win" / "loss" / "tie", "unparseable",
    or "failed" when a judge call of either order got no reply (an endpoint that still
    failed after its retries). Failed questions are left out of the rate like unparseable
    ones, and counted apart: they say nothing about the answers.
    """

    win_rate: float | None
    wins: int
    losses: int
    ties: int
    unparseable: int
    n: int
    failed: int = 0
    outcomes: tuple[str, ...] = ()

    def preferences(self) -> list[float]:
        """alpaca_eval's preference of each judged question (1 opponent, 2 model, 1.5 tie)."""
        return [{"win": 2.0, "loss": 1.0, "tie": 1.5}[o] for o in self.outcomes
                if o in ("win", "loss", "tie")]

    def judged_items(self) -> list[int]:
        """Indices of the questions :meth:`preferences` covers, in the same order."""
        return [i for i, o in enumerate(self.outcomes) if o in ("win", "loss", "tie")]


def judge_pairwise(judge_generate: JudgeGenerate, prompts: Sequence[str],
                   answers: Sequence[str], opponent_answers: Sequence[str]) -> JudgeResult:
    """Win rate of ``answers`` over ``opponent_answers`` on ``prompts`` (one judge call with
    2 N prompts: the model's answer as A, then as B). A judge may return None for a prompt
    whose call failed (:class:`clo_ray.eval.judge_endpoint.EndpointJudge`)."""
    if not len(prompts) == len(answers) == len(opponent_answers):
        raise ValueError(f"{len(prompts)} prompts, {len(answers)} answers and "
                         f"{len(opponent_answers)} opponent answers: one of each per prompt")
    n = len(prompts)
    if n == 0:
        return JudgeResult(None, 0, 0, 0, 0, 0)
    triples = list(zip(prompts, answers, opponent_answers, strict=True))
    asks = [judge_prompt(q, a, o) for q, a, o in triples]
    asks += [judge_prompt(q, o, a) for q, a, o in triples]
    replies = judge_generate(asks)
    if len(replies) != 2 * n:
        raise ValueError(f"the judge returned {len(replies)} replies for {2 * n} prompts")
    outcomes = []
    for first, second in zip(replies[:n], replies[n:], strict=True):
        if first is None or second is None:
            outcomes.append("failed")
            continue
        model_first = _outcome(parse_verdict(first), model_is="A")
        model_second = _outcome(parse_verdict(second), model_is="B")
        if model_first is None or model_second is None:
            outcomes.append("unparseable")
        elif model_first == model_second:
            outcomes.append(model_first)  # win + win, loss + loss, tie + tie
        else:
            outcomes.append("tie")
    count = outcomes.count
    judged = count("win") + count("loss") + count("tie")
    rate = (count("win") + 0.5 * count("tie")) / judged if judged else None
    return JudgeResult(rate, count("win"), count("loss"), count("tie"), count("unparseable"),
                       n, count("failed"), tuple(outcomes))


def _outcome(verdict: Verdict | None, *, model_is: Literal["A", "B"]) -> str | None:
    if verdict is None:
        return None
    return "tie" if verdict == "tie" else "win" if verdict == model_is else "loss"


def make_judge(model_dir: str | Path, backend: Backend | str = "auto",
               max_new_tokens: int = 512, *,
               batch_size: int = 8) -> TransformersGenerator | VllmGenerator:
    """A judge callable (prompts -> replies) served by vLLM or transformers, same choice as
    generation: the model is loaded once here and kept for every call until ``close()``.
    Greedy, so verdicts are reproducible."""
    return load_generator(model_dir, max_new_tokens=max_new_tokens,
                          template=JUDGE_PLAIN_TEMPLATE, backend=backend, batch_size=batch_size)
