"""Files shipped inside the package (see PROVENANCE.md in this folder), and the preference
sample derived from one of them."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

ASSETS_DIR = Path(__file__).resolve().parent
PARALLEL_SAMPLE_REF = "builtin:parallel-sample"
PREFERENCE_SAMPLE_REF = "builtin:preference-sample"
_STRIDE = 97  # the rejected answer of row i comes from row i + 97 on (another topic)


def parallel_sample_path() -> Path:
    """The bundled parallel sample: one JSON object per line, English plus six translations."""
    return ASSETS_DIR / "parallel_sample.jsonl"


def preference_sample_rows() -> list[dict]:
    """One parallel preference row per parallel-sample row, in every language of the sample.

    Chosen: the row's own response. Rejected: the response of another row on another topic
    (an off-topic reply in the same language): the first row from ``i + 97`` on, cyclically,
    whose topic differs, so the rows never change. See PROVENANCE.md.
    """
    lines = parallel_sample_path().read_text(encoding="utf-8").splitlines()
    rows = [json.loads(line) for line in lines if line.strip()]
    out = []
    for i, row in enumerate(rows):
        j = (i + _STRIDE) % len(rows)
        while rows[j]["topic"] == row["topic"]:
            j = (j + 1) % len(rows)
        out.append({"id": f"pref-{row['id']}", "topic": row["topic"],
                    "rejected_from": rows[j]["id"],
                    "text": {lang: {"prompt": side["prompt"], "chosen": side["response"],
                                    "rejected": rows[j]["text"][lang]["response"]}
                             for lang, side in row["text"].items()}})
    return out


def preference_sample_path(cache_dir: str | Path | None = None) -> Path:
    """The preference sample as a jsonl file, written once (atomically) under ``cache_dir``
    (default ``$CLO_RAY_CACHE/assets``, else ``~/.cache/clo-ray/assets``) and named by the
    hash of its content, so every process and node reads the same bytes."""
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in preference_sample_rows())
    blob = data.encode("utf-8")
    if cache_dir is None:
        root = os.environ.get("CLO_RAY_CACHE")
        cache_dir = Path(root) / "assets" if root else Path.home() / ".cache" / "clo-ray" / "assets"
    path = Path(cache_dir) / f"preference_sample-{hashlib.sha256(blob).hexdigest()[:12]}.jsonl"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".preference_sample-")
        with os.fdopen(fd, "wb") as handle:
            handle.write(blob)
        os.replace(tmp, path)
    return path


def builtin_corpus_path(ref: str) -> Path | None:
    """The local file of a built-in corpus reference, None for any other path."""
    if ref == PARALLEL_SAMPLE_REF:
        return parallel_sample_path()
    if ref == PREFERENCE_SAMPLE_REF:
        return preference_sample_path()
    return None
