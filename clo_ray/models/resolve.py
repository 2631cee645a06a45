"""Model references and parameter counts.

A sweep names its models as strings; :func:`resolve_model` turns one into a local directory
that ``AutoModelForCausalLM.from_pretrained`` and ``AutoTokenizer.from_pretrained`` load:

- ``builtin:NAME``: built on this machine (see :mod:`clo_ray.models.builtins`), cached;
- a local directory holding ``config.json``;
- a hub id ``owner/name``, for users with hub access (downloaded into the Hugging Face cache,
  so models fetched earlier with ``huggingface-cli download`` are found offline).

:func:`parameter_count` sizes a model for plans and reports without loading its weights.
The trainable-module selectors live in :mod:`clo_ray.models.selectors`.

This module imports neither torch nor transformers at import time, so the spec validator
can use :data:`BUILTIN_MODELS` and :func:`is_builtin` cheaply.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import struct
from pathlib import Path
from typing import Any

from clo_ray.errors import ModelResolutionError
from clo_ray.models.builtins import BUILTINS, materialize
from clo_ray.models.selectors import (
    LLAMA_STYLE_TYPES,
)

logger = logging.getLogger(__name__)

BUILTIN_PREFIX = "builtin:"
BUILTIN_MODELS: dict[str, str] = {name: spec.description for name, spec in BUILTINS.items()}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# Weights we never need: hub repos often carry the same weights in several formats (Llama 3
# ships a 16 GB ``original/`` copy); ``.bin`` is fetched only when no safetensors exist.
_HUB_IGNORE = ["original/*", "*.pth", "*.pt", "*.gguf", "*.onnx", "*.msgpack", "*.h5", "*.ot"]


# --------------------------------------------------------------------------- resolution


def is_builtin(ref: str) -> bool:
    """Whether ``ref`` names a built-in model (``builtin:NAME`` with a known NAME)."""
    return ref.startswith(BUILTIN_PREFIX) and ref[len(BUILTIN_PREFIX) :] in BUILTINS


def default_cache_dir() -> Path:
    """Where built-ins are cached: ``$CLO_RAY_CACHE/models``, else ``~/.cache/clo-ray/models``.

    Read at call time, so a Ray worker or a test can point it elsewhere through the env.
    """
    root = os.environ.get("CLO_RAY_CACHE")
    return Path(root) / "models" if root else Path.home() / ".cache" / "clo-ray" / "models"


def resolve_model(
    ref: str,
    *,
    cache_dir: str | Path | None = None,
    revision: str | None = None,
    trust_remote_code: bool = False,
) -> Path:
    """Return a local directory holding the model ``ref`` names (see the module docstring).

    ``cache_dir`` is where built-ins are stored (default :func:`default_cache_dir`);
    ``revision`` applies to hub ids only. Without ``trust_remote_code``, a model whose
    architecture exists only as code inside its repo is refused here, not deep in a worker.
    """
    if not ref.strip():
        raise ModelResolutionError(f"empty model reference; {_ACCEPTED_FORMS}")
    if ref.startswith(BUILTIN_PREFIX):
        _refuse_revision(ref, revision)
        path = _resolve_builtin(ref, Path(cache_dir) if cache_dir else default_cache_dir())
    elif Path(ref).expanduser().exists() or _looks_like_path(ref):
        _refuse_revision(ref, revision)
        path = _resolve_local(ref)
    elif _HUB_ID.match(ref):
        path = _resolve_hub(ref, revision)
    else:
        raise ModelResolutionError(f"cannot resolve model {ref!r}: {_ACCEPTED_FORMS}")
    _check_remote_code(ref, path, trust_remote_code)
    logger.debug("model %r resolved to %s", ref, path)
    return path


def check_model_reference(ref: str, *, revision: str | None = None) -> None:
    """Raise ModelResolutionError unless ``ref`` will resolve, without building or
    downloading anything: a known built-in, a local folder with ``config.json``, or a hub id
    whose ``config.json`` is in the local cache or, with the hub enabled, exists there.

    The sweep calls this before Ray starts, so a typo costs a second, not a translation run.
    """
    if ref.startswith(BUILTIN_PREFIX):
        _refuse_revision(ref, revision)
        if ref[len(BUILTIN_PREFIX):] not in BUILTINS:
            raise ModelResolutionError(f"unknown built-in model {ref!r}; {_ACCEPTED_FORMS}")
    elif Path(ref).expanduser().exists() or _looks_like_path(ref):
        _refuse_revision(ref, revision)
        _resolve_local(ref)
    elif _HUB_ID.match(ref):
        _check_hub(ref, revision)
    else:
        raise ModelResolutionError(f"cannot resolve model {ref!r}: {_ACCEPTED_FORMS}")


def _check_hub(ref: str, revision: str | None) -> None:
    from huggingface_hub import HfApi, try_to_load_from_cache
    from huggingface_hub.errors import (
        GatedRepoError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    cache_dir = _hub_cache_dir()
    if isinstance(try_to_load_from_cache(ref, "config.json", cache_dir=cache_dir,
                                         revision=revision), str):
        return
    if _hub_offline():
        raise ModelResolutionError(
            f"model {ref!r}{f' (revision {revision})' if revision else ''} is not in the "
            f"Hugging Face cache ({cache_dir or 'the default cache'}) and the hub is disabled "
            f"(HF_HUB_OFFLINE). Fix: pre-download it (huggingface-cli download {ref}), give a "
            f"local directory instead, or use a built-in "
            f"({', '.join(BUILTIN_PREFIX + n for n in BUILTINS)})")
    try:
        HfApi().model_info(ref, revision=revision, timeout=20)
    except GatedRepoError:
        return  # exists; the download names the licence step if the token lacks access
    except (RepositoryNotFoundError, RevisionNotFoundError) as err:
        raise _not_on_hub(ref, revision, err) from err
    except Exception as err:  # noqa: BLE001 - HfHubHTTPError, and the client's httpx errors
        raise ModelResolutionError(
            f"model {ref!r} is not in the Hugging Face cache and the hub is unreachable "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
            "pre-download it or set HF_HUB_OFFLINE=1 with a filled cache") from err


_ACCEPTED_FORMS = (
    "accepted forms are builtin:NAME (one of "
    + ", ".join(BUILTIN_PREFIX + name for name in BUILTINS)
    + "), a local directory containing config.json, or a Hugging Face hub id owner/name"
)


def _refuse_revision(ref: str, revision: str | None) -> None:
    """A revision on a built-in or local directory would be silently meaningless: refuse it."""
    if revision is not None:
        raise ModelResolutionError(f"model {ref!r}: revision={revision!r} applies to hub ids only")


def _looks_like_path(ref: str) -> bool:
    return ref.startswith(("/", "./", "../", "~")) or ref.count("/") > 1 or "\\" in ref


def _resolve_builtin(ref: str, cache_dir: Path) -> Path:
    name = ref[len(BUILTIN_PREFIX) :]
    if name not in BUILTINS:
        raise ModelResolutionError(f"unknown built-in model {ref!r}; {_ACCEPTED_FORMS}")
    return materialize(name, cache_dir)


def _resolve_local(ref: str) -> Path:
    path = Path(ref).expanduser().resolve()
    if not path.exists():
        raise ModelResolutionError(
            f"model directory {ref!r} does not exist ({path}); {_ACCEPTED_FORMS}"
        )
    if not path.is_dir():
        raise ModelResolutionError(f"model path {ref!r} is a file, not a model directory")
    if not (path / "config.json").is_file():
        raise ModelResolutionError(
            f"model directory {ref!r} has no config.json, so it is not a Hugging Face model "
            f"directory (save one with model.save_pretrained(dir) and tokenizer.save_pretrained"
            f"(dir)); it holds: {sorted(p.name for p in path.iterdir())[:10]}"
        )
    return path


def _hub_cache_dir() -> Path | None:
    """The hub cache as the env says now (huggingface_hub reads it once, at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "hub"
    return None  # huggingface_hub's default


def _hub_offline() -> bool:
    flags = (os.environ.get(v, "").lower() for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return any(f in {"1", "true", "yes", "on"} for f in flags)


def _resolve_hub(ref: str, revision: str | None) -> Path:
    """Download (or find cached) ``ref``: safetensors only, ``.bin`` only when nothing else."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    def fetch(ignore: list[str]) -> Path:
        return Path(
            snapshot_download(
                ref,
                revision=revision,
                cache_dir=_hub_cache_dir(),
                local_files_only=_hub_offline(),
                ignore_patterns=ignore,
            )
        )

    try:
        path = fetch([*_HUB_IGNORE, "*.bin"])
        if not any(path.glob("*.safetensors")):
            path = fetch(_HUB_IGNORE)
    except LocalEntryNotFoundError as err:
        raise ModelResolutionError(
            f"model {ref!r} is not in the Hugging Face cache and the hub "
            f"{'is disabled (HF_HUB_OFFLINE)' if _hub_offline() else 'is unreachable'}. "
            f"Fix: pre-download it on a machine with hub access (huggingface-cli download "
            f"{ref}) into the cache here, give a local directory instead, or use a built-in "
            f"({', '.join(BUILTIN_PREFIX + n for n in BUILTINS)}). ({err})"
        ) from err
    except GatedRepoError as err:
        raise ModelResolutionError(
            f"model {ref!r} is gated: accept its license on the hub and log in "
            f"(huggingface-cli login or HF_TOKEN)"
        ) from err
    except (RepositoryNotFoundError, RevisionNotFoundError) as err:
        raise _not_on_hub(ref, revision, err) from err
    except HfHubHTTPError as err:
        raise ModelResolutionError(f"downloading model {ref!r} failed: {err}") from err
    if not (path / "config.json").is_file():
        raise ModelResolutionError(f"hub repo {ref!r} has no config.json: not a transformers model")
    return path


def _not_on_hub(ref: str, revision: str | None, err: Exception) -> ModelResolutionError:
    """The hub's answer that a repo or revision does not exist, in our words."""
    from huggingface_hub.errors import RevisionNotFoundError

    if isinstance(err, RevisionNotFoundError):
        return ModelResolutionError(f"model {ref!r} has no revision {revision!r}")
    return ModelResolutionError(
        f"model {ref!r} does not exist on the hub (or is private: log in with HF_TOKEN)")


def _check_remote_code(ref: str, path: Path, trust_remote_code: bool) -> None:
    """Refuse a repo whose architecture is only defined by code it ships, unless trusted."""
    config = _read_config(path)
    if trust_remote_code or "auto_map" not in config:
        return
    from transformers import CONFIG_MAPPING

    if config.get("model_type") not in CONFIG_MAPPING:
        raise ModelResolutionError(
            f"model {ref!r} (model_type {config.get('model_type')!r}) needs code shipped in "
            f"its repo; if you trust that code, set trust_remote_code: true on this model in "
            f"the spec (models[].trust_remote_code; off by default)"
        )


def _read_config(path: Path) -> dict[str, Any]:
    return json.loads((path / "config.json").read_text(encoding="utf-8"))


# -------------------------------------------------------------------------- parameter count

# Published counts (model.num_parameters(), tied weights once) of the paper's models and
# translators, so budgets and reports can size them without a download.
KNOWN_PARAMETER_COUNTS: dict[str, int] = {
    "meta-llama/Llama-2-7b-hf": 6_738_415_616,
    "meta-llama/Llama-2-13b-hf": 13_015_864_320,
    "meta-llama/Meta-Llama-3-8B": 8_030_261_248,
    "mistralai/Mistral-7B-v0.1": 7_241_732_096,
    "Qwen/Qwen2.5-3B": 3_085_938_688,
    "facebook/m2m100_1.2B": 1_239_470_080,
    "facebook/m2m100_418M": 483_905_536,
}


def parameter_count(ref: str) -> int | None:
    """Number of parameters of ``ref``, or None when unknown; never downloads or loads weights.

    Local directories: from safetensors headers when present (exact), else from config.json
    for Llama/Mistral/Qwen2-style configs. Built-ins: from their fixed architecture.
    """
    if ref.startswith(BUILTIN_PREFIX):
        spec = BUILTINS.get(ref[len(BUILTIN_PREFIX) :])
        return llama_style_parameter_count(spec.config) if spec else None
    path = Path(ref).expanduser()
    if (path / "config.json").is_file():
        counted = _safetensors_parameter_count(path)
        return counted if counted is not None else llama_style_parameter_count(_read_config(path))
    if ref in KNOWN_PARAMETER_COUNTS:
        return KNOWN_PARAMETER_COUNTS[ref]
    return _cached_hub_parameter_count(ref) if _HUB_ID.match(ref) else None


def _cached_hub_parameter_count(ref: str) -> int | None:
    """Count from the config.json of a hub model already in the local cache (no download)."""
    from huggingface_hub import try_to_load_from_cache

    config = try_to_load_from_cache(ref, "config.json", cache_dir=_hub_cache_dir())
    if not isinstance(config, str):
        return None
    return llama_style_parameter_count(json.loads(Path(config).read_text(encoding="utf-8")))


def llama_style_parameter_count(config: dict[str, Any]) -> int | None:
    """Parameters of a Llama/Mistral/Qwen2 decoder from its config (None for other types).

    Qwen2 has q/k/v biases; Llama/Mistral have them only when ``attention_bias`` is set.
    """
    if config.get("model_type") not in LLAMA_STYLE_TYPES:
        return None
    hidden, vocab = config["hidden_size"], config["vocab_size"]
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or hidden // heads
    q_out, kv_out = heads * head_dim, kv_heads * head_dim
    attention = hidden * (q_out + 2 * kv_out) + q_out * hidden
    if config["model_type"] == "qwen2" or config.get("attention_bias"):
        attention += q_out + 2 * kv_out + (hidden if config.get("attention_bias") else 0)
    mlp = 3 * hidden * config["intermediate_size"]
    if config.get("mlp_bias"):
        mlp += 2 * config["intermediate_size"] + hidden
    layer = attention + mlp + 2 * hidden  # two RMSNorm weights per layer
    embeddings = vocab * hidden * (1 if config.get("tie_word_embeddings") else 2)
    return embeddings + config["num_hidden_layers"] * layer + hidden  # + final norm


def _safetensors_parameter_count(path: Path) -> int | None:
    """Sum of tensor sizes from safetensors headers (8-byte length + JSON); no weights read."""
    files = sorted(path.glob("*.safetensors"))
    if not files:
        return None
    total = 0
    for file in files:
        with file.open("rb") as fh:
            (length,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(length))
        for name, info in header.items():
            if name != "__metadata__":
                total += math.prod(info["shape"])
    return total
