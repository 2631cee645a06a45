"""Trainable-module selectors: which parameters a stage trains, chosen by name.

CLO trains different parts of the model in different stages (the paper's attention-only
stage, then the full model), so :func:`select_parameters` maps named module sets
(``attention``, ``mlp``, ...) to parameter names. Selection is by name only: the training
code selects before ``deepspeed.initialize``, and ZeRO-3 reshapes every parameter to ``[0]``.
Known architectures have exact tables (:data:`ARCHITECTURE_TABLES`); others fall back to
keyword patterns.

Imports neither torch nor transformers, so the spec validator can use :data:`MODULE_SETS`
cheaply (through :mod:`clo_ray.models.resolve`, which re-exports the public names).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Sequence
from typing import Any

from clo_ray.errors import ModuleSelectionError

# Decoders that share Llama's parameter names and layout (also what
# clo_ray.models.resolve.llama_style_parameter_count can count).
LLAMA_STYLE_TYPES = ("llama", "mistral", "qwen2")

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
    LLAMA_STYLE_TYPES, _LLAMA_TABLE
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
