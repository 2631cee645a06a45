"""What the built-in models are built from, and how their caches are named.

Shared by :mod:`clo_ray.models.builtins` and :mod:`clo_ray.models.m2m100`: both train a
tokenizer on the bundled parallel sample and key their cache by a hash of their recipe and
that sample, so a changed recipe or sample never reuses an old build.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def short_hash(*parts: bytes | str) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.encode() if isinstance(part, str) else part)
        digest.update(b"\0")
    return digest.hexdigest()[:12]


def sample_texts(path: Path) -> Iterator[str]:
    """Every prompt and response of every language in the parallel sample, in file order."""
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            if not line.strip():
                continue
            for side in json.loads(line)["text"].values():
                yield from (str(side[k]) for k in ("prompt", "response") if k in side)


def save_model(model: Any, out: Path) -> None:
    """``model.save_pretrained(out)`` on whichever process builds it.

    transformers 5 writes nothing (no config, no weights) on a ``torch.distributed`` rank
    other than 0 (``should_save_on_this_rank``), and inside a Ray Train worker group the rank
    that wins the build lock may be any: rank 1 once cached a folder with a tokenizer and no
    model. A built-in is one process's own file, so this process writes it.
    """
    model.should_save_on_this_rank = lambda is_main_process: is_main_process
    model.save_pretrained(out)
    if not (out / "config.json").is_file():
        raise RuntimeError(f"saving the built model into {out} wrote no config.json")
