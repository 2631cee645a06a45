"""The shared base of the sweep-spec sections, and the run, corpus, translator and models sections.

Every section is a pydantic model per YAML mapping (see :mod:`clo_ray.spec.schema`) that forbids
unknown keys (typos fail loudly). A validator that finds a problem raises it through
:class:`Problems`, which carries the sub-path, the bad value and the allowed values, so
:mod:`clo_ray.spec.schema` can print ``schedules.clo[0].lambda: ... (got 2; allowed: ...)``.
The other sections live in :mod:`clo_ray.spec.training` (schedules, methods, resources,
train), :mod:`clo_ray.spec.search_space` (search) and :mod:`clo_ray.spec.evaluation` (evaluation,
report); they build on the helpers here, never the reverse.
Nothing here imports torch or ray; the model and module-set names come from
:mod:`clo_ray.models.resolve` (imported lazily, it is cheap).
"""

from __future__ import annotations

import os
import re
import string
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from clo_ray.assets import PARALLEL_SAMPLE_REF, PREFERENCE_SAMPLE_REF
from clo_ray.languages import LANGUAGES

# ------------------------------------------------------------------------------ problems


class Problems:
    """Problems found by one validator, all reported at once (not only the first).

    Each is ``(where, message, allowed, value)``: ``where`` is the path below the validated
    object, ``allowed`` a printable list or None, ``value`` ``()`` (not shown) or ``(value,)``.
    """

    def __init__(self) -> None:
        self.items: list[tuple[tuple[str | int, ...], str, str | None, tuple[Any, ...]]] = []

    def add(self, where: Any, message: str, *, allowed: Iterable[Any] | None = None,
            value: Any = ...) -> None:
        where = (where,) if isinstance(where, (str, int)) else tuple(where)
        shown = ", ".join(str(a) for a in allowed) if allowed is not None else None
        self.items.append((where, message, shown, () if value is ... else (value,)))

    def error(self) -> PydanticCustomError:
        return PydanticCustomError(
            "spec", "{spec_message}",
            {"spec_message": self.items[0][1], "spec_problems": tuple(self.items)},
        )

    def raise_if_any(self) -> None:
        if self.items:
            raise self.error()


def problem(message: str, *, where: Any = (), allowed: Iterable[Any] | None = None,
            value: Any = ...) -> PydanticCustomError:
    """One problem as a raisable error (``value`` defaults to the validated input)."""
    found = Problems()
    found.add(where, message, allowed=allowed, value=value)
    return found.error()


class Section(BaseModel):
    """Base of every section: unknown keys are errors, so a typo never silently does nothing;
    numbers are finite (YAML's ``.inf`` / ``.nan`` would pass every ``gt=0`` bound and turn a
    plan's cost or a trial's step count into nonsense)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


def is_set(model: BaseModel, name: str) -> bool:
    """Whether a field differs from its default (a re-validated dump of a spec is the same spec)."""
    return getattr(model, name) != type(model).model_fields[name].default


def module_sets() -> tuple[str, ...]:
    from clo_ray.models.selectors import MODULE_SETS

    return tuple(MODULE_SETS)


def check_module_sets(names: list[str], found: Problems, where: tuple[Any, ...] = ()) -> None:
    """Add a problem for each unknown or repeated module set in ``names``."""
    sets = module_sets()
    for i, name in enumerate(names):
        if name not in sets:
            found.add((*where, i), "unknown module set", allowed=sets, value=name)
        elif name in names[:i]:
            found.add((*where, i), "module set listed twice", value=name)


def template_problem(template: str, required: tuple[str, ...], allowed: tuple[str, ...]) -> str:
    """Why ``template`` is not a usable ``str.format`` template ('' when it is)."""
    try:
        names = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as err:
        return f"not a valid format template ({err}; write a literal brace as {{{{ or }}}})"
    missing = [f"{{{n}}}" for n in required if n not in names]
    unknown = [f"{{{n}}}" for n in names if n not in allowed]
    if missing:
        return f"template must contain {', '.join(missing)}"
    return f"template uses unknown placeholder {', '.join(unknown)}" if unknown else ""


# ------------------------------------------------------------------------------ run, corpus

_SLUG = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
SLUG_RULE = "letters, digits, '.', '_', '-'; starts with a letter or digit; at most 64"
STORAGE_FORMS = ("a local path", "s3://bucket/prefix", "gs://bucket/prefix")


def check_slug(value: str) -> str:
    if not _SLUG.match(value):
        raise problem("not a valid name", allowed=[SLUG_RULE])
    return value


def check_storage_uri(value: str) -> str:
    """A local path, or an ``s3://`` / ``gs://`` URI (what :mod:`clo_ray.storage` reads)."""
    if not value.strip():
        raise problem("empty path", allowed=STORAGE_FORMS)
    scheme, sep, rest = value.partition("://")
    if sep and (scheme not in ("s3", "gs") or not rest.strip("/")):
        raise problem("unsupported storage location", allowed=STORAGE_FORMS)
    return value


def absolute_local(value: str) -> str:
    """A local path made absolute against the current working directory; URIs and built-ins
    unchanged. Ray's workers run in other directories, so a relative path must not travel."""
    if "://" in value or value.startswith("builtin:"):
        return value
    return os.path.abspath(os.path.expanduser(value))


class RunSection(Section):
    """Where results go: ``<storage>/<name>`` (Ray's ``storage_path`` + experiment name)."""

    name: str
    # relative paths are relative to the working directory (made absolute at load time)
    storage: str = Field("runs", validate_default=True)
    seed: int = Field(0, ge=0)  # data subsets, held-out split, trial seeds
    # pyarrow.fs options for s3:// / gs:// (endpoint_override, region, ...); see clo_ray.storage
    storage_options: dict[str, str | int | float | bool] = {}

    _name = field_validator("name")(check_slug)

    @field_validator("storage")
    @classmethod
    def _storage(cls, value: str) -> str:
        return absolute_local(check_storage_uri(value))

    @field_validator("storage_options")
    @classmethod
    def _no_credentials(cls, value: dict[str, Any]) -> dict[str, Any]:
        # the spec is saved in the run folder and Tune's state: a key there is a leaked key
        from clo_ray.storage import credential_options

        if secret := credential_options(value):
            raise problem("credentials do not belong in the spec (it is written into the run "
                          "folder): give them through the environment (AWS_ACCESS_KEY_ID / "
                          "AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN, an instance role or "
                          "service account), which Ray workers inherit", value=secret)
        return value


CORPUS_FORMATS = ("auto", "alpaca", "sharegpt", "messages", "prompt_response", "oasst1",
                  "parallel", "ultrafeedback", "preference")
BUILTIN_CORPORA = (PARALLEL_SAMPLE_REF, PREFERENCE_SAMPLE_REF)


def check_language(code: str) -> str:
    if code not in LANGUAGES:
        raise problem("unknown language code", allowed=sorted(LANGUAGES))
    return code


class CorpusSection(Section):
    """The English corpus: SFT pairs (the paper: 6,400 top-ranked single-turn oasst1 samples)
    or preferences (CRPO: 3,000 UltraFeedback prompts with chosen and rejected answers)."""

    path: str  # local file/dir, s3:// gs:// URI, or builtin:parallel-sample
    format: Literal[CORPUS_FORMATS] = "auto"  # type: ignore[valid-type]
    source_language: str = "en"
    max_rows: int | None = Field(None, gt=0)  # keep only the first N usable rows

    _language = field_validator("source_language")(check_language)

    @field_validator("path")
    @classmethod
    def _path(cls, value: str) -> str:
        if value.startswith("builtin:") and value not in BUILTIN_CORPORA:
            raise problem("unknown built-in corpus", allowed=list(BUILTIN_CORPORA))
        return absolute_local(check_storage_uri(value))


# ------------------------------------------------------------------------------ translator

TRANSLATE_PLACEHOLDERS = ("text", "target_name", "target_code", "source_name", "source_code")
DEFAULT_TRANSLATE_TEMPLATE = (
    "Translate the following text from {source_name} to {target_name}. Keep code, URLs, "
    "numbers and formatting unchanged. Reply with the translation only.\n\n{text}"
)
_BACKEND_FIELDS = {  # field -> the backends it applies to (checked: catches misplaced knobs)
    "model": ("seq2seq", "causal", "vllm"),
    "path": ("parallel",),
    "prompt_template": ("causal", "vllm"),
    "tensor_parallel_size": ("vllm",),
    "enable_prefix_caching": ("vllm",),
    "max_model_len": ("vllm",),
    "gpu_memory_utilization": ("vllm",),
}


class QualitySection(Section):
    """Checks on each translation; ``policy`` says what happens to a failing one."""

    langid_threshold: float = Field(0.5, ge=0, le=1)  # min language-id confidence
    # translated chars / source chars; wide because Chinese runs ~0.3x English in characters
    length_ratio: tuple[float, float] = (0.15, 4.0)
    max_repeat_fraction: float = Field(0.3, gt=0, le=1)  # repeated n-grams: degenerate output
    policy: Literal["drop", "retry", "keep_flagged"] = "drop"

    @field_validator("length_ratio")
    @classmethod
    def _ratio(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not 0 < value[0] < value[1]:
            raise problem("needs 0 < min < max", allowed=["[min, max]"])
        return value


class TranslatorSection(Section):
    """How English pairs become target-language pairs (the paper: facebook/m2m100_1.2B).

    ``parallel`` reads existing translations from a file (offline stand-in for a model);
    ``seq2seq`` runs an encoder-decoder (M2M100, NLLB) with transformers; ``causal`` prompts a
    decoder LLM with transformers; ``vllm`` prompts a decoder LLM with vLLM.
    """

    backend: Literal["parallel", "seq2seq", "causal", "vllm"]
    model: str | None = None
    path: str | None = None  # parallel only; default builtin:parallel-sample
    batch_size: int = Field(16, gt=0)
    max_new_tokens: int = Field(512, gt=0)
    num_beams: int = Field(1, gt=0)
    temperature: float = Field(0.0, ge=0)  # 0 = greedy
    top_p: float = Field(1.0, gt=0, le=1)
    prompt_template: str | None = None  # causal/vllm; default DEFAULT_TRANSLATE_TEMPLATE
    tensor_parallel_size: int = Field(1, gt=0)
    # vLLM engine settings (vllm only). Prefix caching: every translation prompt starts with
    # the same instruction, so its KV blocks are computed once per engine. max_model_len: cap
    # the context (memory); a prompt longer than it fails that row only (rejected with reason
    # translator_error), not the language. gpu_memory_utilization: the GPU share vLLM takes.
    enable_prefix_caching: bool = True
    max_model_len: int | None = Field(None, gt=0)
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    gpus_per_actor: float = Field(0.0, ge=0)
    actors: int = Field(1, gt=0)  # translator actor pool size
    segment_max_chars: int = Field(1000, gt=0)  # longer texts are split at paragraphs/sentences
    quality: QualitySection = QualitySection()

    @model_validator(mode="after")
    def _backend_fields(self) -> TranslatorSection:
        found = Problems()
        for name, backends in _BACKEND_FIELDS.items():
            if is_set(self, name) and self.backend not in backends:
                found.add(name, f"does not apply to the {self.backend!r} backend",
                          allowed=[f"backends {', '.join(backends)}"], value=getattr(self, name))
        if self.backend != "parallel" and self.model is None:
            found.add("model", f"required for the {self.backend!r} backend", value=None)
        if self.path is not None:
            try:
                check_storage_uri(self.path)
            except PydanticCustomError:
                found.add("path", "unsupported location", allowed=STORAGE_FORMS, value=self.path)
        if self.prompt_template is not None:
            why = template_problem(self.prompt_template, ("text", "target_name"),
                                   TRANSLATE_PLACEHOLDERS)
            if why:
                found.add("prompt_template", why, value=self.prompt_template,
                          allowed=[f"{{{p}}}" for p in TRANSLATE_PLACEHOLDERS])
        found.raise_if_any()
        if self.backend == "parallel" and self.path is None:
            self.path = PARALLEL_SAMPLE_REF
        if self.path is not None:
            self.path = absolute_local(self.path)
        if self.backend in ("causal", "vllm") and self.prompt_template is None:
            self.prompt_template = DEFAULT_TRANSLATE_TEMPLATE
        return self


# ------------------------------------------------------------------------------ models

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # same rule as clo_ray.models.resolve
MODEL_FORMS = ("builtin:NAME", "a local directory (/..., ./..., ~/...)", "a hub id owner/name")


def model_ref_kind(ref: str) -> str:
    """'builtin', 'local' or 'hub' for a well-formed reference; raises a problem otherwise."""
    from clo_ray.models.resolve import BUILTIN_MODELS

    if ref.startswith("builtin:"):
        if ref.removeprefix("builtin:") not in BUILTIN_MODELS:
            raise problem("unknown built-in model",
                          allowed=[f"builtin:{name}" for name in BUILTIN_MODELS])
        return "builtin"
    if "://" in ref or not ref.strip() or any(c.isspace() for c in ref):
        raise problem("not a model reference", allowed=MODEL_FORMS)
    if ref.startswith(("/", "./", "../", "~")) or ref.count("/") > 1 or Path(ref).is_dir():
        return "local"  # existence is checked where the model is loaded (a cluster node)
    if _HUB_ID.match(ref):
        return "hub"
    raise problem("not a model reference", allowed=MODEL_FORMS)


class ModelSpec(Section):
    """One base model of the grid (the paper trains base, not chat, models)."""

    name: str
    label: str | None = None  # short name for tables and paths; default derived from name
    trust_remote_code: bool = False  # opt-in per model: runs code shipped with the weights
    revision: str | None = None  # hub ids only
    params_b: float | None = Field(None, gt=0)  # billions; overrides the plan's size lookup

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return absolute_local(value) if model_ref_kind(value) == "local" else value

    @model_validator(mode="after")
    def _label(self) -> ModelSpec:
        if self.revision is not None and model_ref_kind(self.name) != "hub":
            raise problem("a revision applies to hub ids only", where="revision",
                          value=self.revision)
        if self.label is None:
            self.label = self.name.removeprefix("builtin:").rstrip("/").rsplit("/", 1)[-1]
        elif not _SLUG.match(self.label):
            raise problem("not a valid label", where="label", allowed=[SLUG_RULE],
                          value=self.label)
        return self
