"""Test-wide settings (offline, CPU-only, quiet; set before anything imports transformers)
and shared fixtures."""

import json
import os

import pyarrow as pa
import pytest

for key, value in {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "DS_ACCELERATOR": "cpu",
    "TOKENIZERS_PARALLELISM": "false",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
}.items():
    os.environ.setdefault(key, value)


def sample_translations(language: str, limit: int | None = None) -> pa.Table:
    """The bundled sample as the translate stage's output schema, for one target language.

    Columns: id (content id of the English pair), language, prompt_en, response_en, prompt,
    response (target language), reasons (empty: all accepted).
    """
    from clo_ray.assets import parallel_sample_path
    from clo_ray.data.corpus import content_id

    rows = []
    with open(parallel_sample_path(), encoding="utf-8") as fh:
        for line in fh:
            text = json.loads(line)["text"]
            en, tr = text["en"], text[language]
            rows.append({"id": content_id(en["prompt"], en["response"]), "language": language,
                         "prompt_en": en["prompt"], "response_en": en["response"],
                         "prompt": tr["prompt"], "response": tr["response"], "reasons": []})
    rows = rows[:limit] if limit else rows
    return pa.Table.from_pylist(rows, schema=pa.schema([
        ("id", pa.string()), ("language", pa.string()), ("prompt_en", pa.string()),
        ("response_en", pa.string()), ("prompt", pa.string()), ("response", pa.string()),
        ("reasons", pa.list_(pa.string()))]))


@pytest.fixture
def translations():
    """``translations("sw")``: the sample as translated rows (see sample_translations)."""
    return sample_translations
