"""Files shipped inside the package (see PROVENANCE.md in this folder)."""

from __future__ import annotations

from pathlib import Path

ASSETS_DIR = Path(__file__).resolve().parent
PARALLEL_SAMPLE_REF = "builtin:parallel-sample"


def parallel_sample_path() -> Path:
    """The bundled parallel sample: one JSON object per line, English plus six translations."""
    return ASSETS_DIR / "parallel_sample.jsonl"
