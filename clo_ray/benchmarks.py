"""Benchmark registry: which lm-evaluation-harness task measures a benchmark in each language.

The CLO paper and its follow-up (CRPO) check knowledge and comprehension in every target
language with MMMLU and BELEBELE, and in English for retention; Global-MMLU Lite covers the
same languages. A spec names benchmarks (``evaluation.benchmarks: [mmmlu, belebele]``) and
each trial runs its target language's task plus the English counterpart. Task names are
lm-eval 0.4.10+'s (``mmmlu_*`` first appears there); shots are CRPO's (MMMLU 0-shot,
BELEBELE 1-shot) unless the spec sets them.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Benchmark:
    name: str
    tasks: dict[str, str]  # language code -> lm-eval task
    shots: int  # the default number of few-shot examples
    about: str


BENCHMARKS: dict[str, Benchmark] = {b.name: b for b in [
    Benchmark("mmmlu", {"zh": "mmmlu_zh_cn", "de": "mmmlu_de_de", "ko": "mmmlu_ko_kr",
                        "id": "mmmlu_id_id", "sw": "mmmlu_sw_ke", "yo": "mmmlu_yo_ng",
                        "bn": "mmmlu_bn_bd", "en": "mmlu"},
              0, "OpenAI's professionally translated MMLU (English: MMLU itself)"),
    Benchmark("belebele", {"zh": "belebele_zho_Hans", "de": "belebele_deu_Latn",
                           "ko": "belebele_kor_Hang", "id": "belebele_ind_Latn",
                           "sw": "belebele_swh_Latn", "yo": "belebele_yor_Latn",
                           "bn": "belebele_ben_Beng", "en": "belebele_eng_Latn"},
              1, "reading comprehension on FLORES passages (log-likelihood)"),
    Benchmark("global_mmlu", {"zh": "global_mmlu_zh", "de": "global_mmlu_de",
                              "ko": "global_mmlu_ko", "id": "global_mmlu_id",
                              "sw": "global_mmlu_sw", "yo": "global_mmlu_yo",
                              "bn": "global_mmlu_bn", "en": "global_mmlu_en"},
              0, "Global-MMLU Lite (culturally sensitive and agnostic subsets)"),
]}


@dataclass(frozen=True)
class BenchmarkTask:
    """One lm-eval task a trial runs: ``benchmark`` in ``language`` with ``shots`` examples."""

    benchmark: str
    language: str
    task: str
    shots: int


def benchmark_tasks(names: list[str], language: str, shots: dict[str, int] | None = None,
                    *, english: bool = True) -> list[BenchmarkTask]:
    """The tasks of ``names`` for a target ``language`` (then English, for retention).

    Raises KeyError naming the benchmark and language without a task (the spec checks
    this at load time, so a sweep never meets it).
    """
    shots = shots or {}
    out = []
    for name in names:
        bench = BENCHMARKS[name]
        for code in [language, "en"] if english and language != "en" else [language]:
            if code not in bench.tasks:
                raise KeyError(f"benchmark {name!r} has no task for language {code!r} "
                               f"(it has: {', '.join(sorted(bench.tasks))})")
            out.append(BenchmarkTask(name, code, bench.tasks[code], shots.get(name, bench.shots)))
    return out
