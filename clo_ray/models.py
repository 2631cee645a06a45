"""Model references and trainable-module selectors.

A sweep names its models as strings; :func:`resolve_model` turns one into a local directory
that ``AutoModelForCausalLM.from_pretrained`` and ``AutoTokenizer.from_pretrained`` load:

- ``builtin:NAME``: built on this machine (see :mod:`clo_ray.builtin_models`), cached;
- a local directory holding ``config.json``;
- a hub id ``owner/name``, for users with hub access (downloaded into the Hugging Face cache,
  so models fetched earlier with ``huggingface-cli download`` are found offline).

CLO trains different parts of the model in different stages (the paper's attention-only
stage, then the full model), so :func:`select_parameters` maps named module sets
(``attention``, ``mlp``, ...) to parameter names. Selection is by name only: the training
code selects before ``deepspeed.initialize``, and ZeRO-3 reshapes every parameter to ``[0]``.

This module imports neither torch nor transformers at import time, so the spec validator
can use :data:`BUILTIN_MODELS` and :func:`is_builtin` cheaply.
"""

from __future__ import annotations

import difflib
import json
import logging
import math
import os
import re
import struct
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from clo_ray.builtin_models import BUILTINS, materialize
from clo_ray.errors import ModelResolutionError, ModuleSelectionError

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
    except RepositoryNotFoundError as err:
        raise ModelResolutionError(
            f"model {ref!r} does not exist on the hub (or is private: log in with HF_TOKEN)"
        ) from err
    except RevisionNotFoundError as err:
        raise ModelResolutionError(f"model {ref!r} has no revision {revision!r}") from err
    except HfHubHTTPError as err:
        raise ModelResolutionError(f"downloading model {ref!r} failed: {err}") from err
    if not (path / "config.json").is_file():
        raise ModelResolutionError(f"hub repo {ref!r} has no config.json: not a transformers model")
    return path


def _check_remote_code(ref: str, path: Path, trust_remote_code: bool) -> None:
    """Refuse a repo whose architecture is only defined by code it ships, unless trusted."""
    config = _read_config(path)
    if trust_remote_code or "auto_map" not in config:
        return
    from transformers import CONFIG_MAPPING

    if config.get("model_type") not in CONFIG_MAPPING:
        raise ModelResolutionError(
            f"model {ref!r} (model_type {config.get('model_type')!r}) needs code shipped in "
            f"its repo; pass trust_remote_code=True if you trust it"
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
_LLAMA_STYLE = ("llama", "mistral", "qwen2")


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
    if config.get("model_type") not in _LLAMA_STYLE:
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


# ---------------------------------------------------------------------------- selectors

MODULE_SETS = ("attention", "mlp", "embeddings", "norms", "lm_head", "all")
# Each parameter belongs to the first set whose pattern it matches (re.search on the full
# name, so wrapper prefixes such as ``module.`` or ``base_model.model.`` do not matter).
_LLAMA_TABLE: tuple[tuple[str, str], ...] = (
    # q/k/v/o weights, and the q/k/v biases that Qwen2 has (and Llama with attention_bias)
    ("attention", r"(^|\.)self_attn\.[qkvo]_proj\.(weight|bias)$"),
    ("mlp", r"(^|\.)mlp\.(gate|up|down)_proj\.(weight|bias)$"),
    ("embeddings", r"(^|\.)embed_tokens\.weight$"),
    ("norms", r"(^|\.)(input_layernorm|post_attention_layernorm|norm)\.weight$"),
    ("lm_head", r"(^|\.)lm_head\.weight$"),
)
ARCHITECTURE_TABLES: dict[str, tuple[tuple[str, str], ...]] = dict.fromkeys(
    _LLAMA_STYLE, _LLAMA_TABLE
)
# Unknown architectures: keyword patterns. Norms come first because some norms live inside
# attention/MLP blocks (BERT's attention.output.LayerNorm) and must not be trained as such.
_FALLBACK_TABLE: tuple[tuple[str, str], ...] = (
    ("norms", r"((?i:norm)|(^|\.)ln_?\w*)\.(weight|bias)$"),
    ("embeddings", r"(embed_tokens|wte|word_embeddings|tok_embeddings|embed_in)\.weight$"),
    ("lm_head", r"(^|\.)(lm_head|embed_out|output)\.weight$"),
    ("attention", r"(attn|attention)"),
    ("mlp", r"(mlp|ffn|feed_forward|fc1|fc2)"),
)
# The block index in a parameter name: Llama ``layers.3.``, BERT ``layer.3.``, GPT-2 ``h.3.``
_LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)\.")


def select_parameters(
    model_or_named_params: Any,
    modules: Sequence[str],
    *,
    layers: tuple[int, int] | None = None,
    regex: str | None = None,
    model_type: str | None = None,
) -> list[str]:
    """Names of the parameters to train: the union of ``modules`` sets and ``regex`` matches.

    ``model_or_named_params`` is a model (``named_parameters()`` and ``config.model_type``
    are read), or an iterable of ``(name, param)`` pairs or plain names: only names are used.
    ``layers=(start, end)`` (end exclusive) keeps only parameters inside those transformer
    blocks; embeddings, final norm and lm_head are outside every block and so are dropped
    (layer-wise CLO trains blocks; ask for them without ``layers`` to train them).
    Every selector must match something, or ModuleSelectionError says which and why.
    """
    names = _parameter_names(model_or_named_params)
    model_type = model_type or _model_type_of(model_or_named_params)
    table = ARCHITECTURE_TABLES.get(model_type or "", _FALLBACK_TABLE)
    fallback = table is _FALLBACK_TABLE
    context = _describe(
        f"{model_type or 'unknown'} (regex fallback)" if fallback else model_type, names
    )
    _check_sets(modules)
    if not modules and regex is None:
        raise ModuleSelectionError(f"no module set or regex given; {context}")
    candidates = _in_layers(names, layers, context) if layers is not None else names
    chosen: set[str] = set()
    for module in modules:
        hits = [n for n in candidates if module == "all" or _classify(n, table) == module]
        _require(hits, f"module set {module!r}", layers, context)
        chosen.update(hits)
    if regex is not None:
        pattern = _compile(regex, context)
        hits = [n for n in candidates if pattern.search(n)]
        _require(hits, f"regex {regex!r}", layers, context)
        chosen.update(hits)
    return [n for n in names if n in chosen]


def _describe(model_type: str | None, names: list[str]) -> str:
    """What every selection error says about the model: its type and a few parameter names."""
    picks = names[:4] + names[-2:] if len(names) > 6 else names
    return f"model_type {model_type!r}; example parameter names: {picks}"


def _parameter_names(source: Any) -> list[str]:
    pairs: Iterable[Any] = getattr(source, "named_parameters", lambda: source)()
    names = [item if isinstance(item, str) else item[0] for item in pairs]
    if not names:
        raise ModuleSelectionError("the model has no parameters to select from")
    return names


def _model_type_of(source: Any) -> str | None:
    config = getattr(source, "config", None)
    return getattr(config, "model_type", None)


def _classify(name: str, table: tuple[tuple[str, str], ...]) -> str | None:
    return next((module for module, pattern in table if re.search(pattern, name)), None)


def _check_sets(modules: Sequence[str]) -> None:
    if isinstance(modules, str):  # "attention" would otherwise be read as 9 set names
        raise ModuleSelectionError(f"modules must be a list of set names, got {modules!r}")
    for module in modules:
        if module not in MODULE_SETS:
            close = difflib.get_close_matches(module, MODULE_SETS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ModuleSelectionError(
                f"unknown module set {module!r}{hint}; valid sets: {', '.join(MODULE_SETS)}"
            )


def _compile(regex: str, context: str) -> re.Pattern[str]:
    try:
        return re.compile(regex)
    except re.error as err:
        raise ModuleSelectionError(f"invalid regex {regex!r}: {err}; {context}") from None


def _in_layers(names: list[str], layers: tuple[int, int], context: str) -> list[str]:
    start, end = layers
    if not 0 <= start < end:
        raise ModuleSelectionError(f"layers={layers} must satisfy 0 <= start < end (end exclusive)")
    indices = {n: int(m.group(1)) for n in names if (m := _LAYER_INDEX.search(n))}
    inside = [n for n in names if n in indices and start <= indices[n] < end]
    if not inside:
        present = sorted(set(indices.values()))
        span = f"{present[0]}..{present[-1]}" if present else "none found"
        raise ModuleSelectionError(
            f"layers={layers} matches no transformer block (block indices: {span}); {context}"
        )
    return inside


def _require(hits: list[str], selector: str, layers: tuple[int, int] | None, context: str) -> None:
    if hits:
        return
    why = ""
    if layers is not None:
        why = f" within layers={layers} (embeddings, final norm and lm_head are outside blocks)"
    elif "lm_head" in selector:
        why = " (if the model ties lm_head to its embeddings, there is no lm_head parameter)"
    raise ModuleSelectionError(f"{selector} matched no parameter{why}; {context}")
